"""A CPU kernel for the decode step's weight dots: a few rows of x times a weight packed in 16-wide panels.

XLA CPU's dots for the 1-16 rows of a decode step read their weights at about half of the memory bandwidth that
the same machine gives a plain stream (``benchmarks/README.md``), and the step is those dots. ``few_row_dot.cc``
does them as one contiguous read per panel of 16 outputs, prefetched, on XLA's own thread pool; on the decode
benchmark's machine it runs the decoder's weight dots 1.4x (4 rows) to 1.6x (16 rows) faster than XLA.

It is built once per machine with the system C++ compiler (``$CXX`` or ``c++``, ``-march=native``) against the
XLA FFI headers of the installed jaxlib, kept in ``cache_dir()`` (``$SPEECHSEQ_KERNEL_DIR``, default
``~/.cache/speechseq/kernels``; the file name is a hash of the source, jaxlib's version and the CPU), and called
through ``jax.ffi``. Without a compiler, with ``SPEECHSEQ_NATIVE=0``, on other backends, with several devices or
for other dtypes, the decode step keeps XLA's dots (``layers.core.out_major_dot``): the results agree to float32
rounding. ``status()`` says which and why.

Weights for it are packed once per model, ``pack``: [N, K] (a kernel stored [Dout, Din]) -> [ceil(N / 16), K, 16],
zero-padded; ``panel_dot`` takes x [..., K] and returns [..., N] (or all 16 * panels outputs).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

PANEL = 16
TARGET = "speechseq_few_row_dot"
SOURCE = Path(__file__).with_name("few_row_dot.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": whether the kernel runs here; "why": the reason, for status()


def cache_dir() -> Path:
    """Where built kernels are kept: ``$SPEECHSEQ_KERNEL_DIR``, default ``~/.cache/speechseq/kernels``."""
    return Path(os.environ.get("SPEECHSEQ_KERNEL_DIR") or Path.home() / ".cache" / "speechseq" / "kernels")


def _cpu_identity() -> str:
    """The CPU's model and feature flags (what ``-march=native`` compiles for), so a cache shared between machines
    never hands one a library built for another."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [next((ln for ln in lines if ln.startswith(key)), "") for key in ("model name", "flags", "Features")]
        return "\n".join(keep)
    except OSError:
        return platform.machine() + platform.processor()


def _library_path() -> Path:
    import jaxlib

    key = hashlib.sha256("\0".join([SOURCE.read_text(), jaxlib.__version__, " ".join(FLAGS), _cpu_identity()])
                         .encode()).hexdigest()[:16]
    return cache_dir() / f"few_row_dot-{key}.so"


def _build(path: Path) -> None:
    """Compiles ``SOURCE`` into ``path`` (through a temporary file and a rename: concurrent builds are safe)."""
    compiler = shutil.which(os.environ.get("CXX") or "c++")
    if compiler is None:
        raise FileNotFoundError(f"no C++ compiler ({os.environ.get('CXX') or 'c++'} not on PATH)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"{compiler} failed on {SOURCE.name}: {last}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> tuple[bool, str]:
    if os.environ.get("SPEECHSEQ_NATIVE", "1") == "0":
        return False, "turned off by SPEECHSEQ_NATIVE=0"
    if not hasattr(jax, "ffi") or not hasattr(jax.ffi, "include_dir"):
        return False, f"jax {jax.__version__} has no jax.ffi"
    try:
        path = _library_path()
        if not path.exists():
            _build(path)
        lib = ctypes.CDLL(str(path))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.SpeechseqFewRowDot), platform="cpu")
    except FileNotFoundError as e:
        return False, str(e)
    except Exception as e:  # a failed build or load: XLA's dots still work, so say so once and go on
        warnings.warn(f"speechseq: the CPU decode kernel is unavailable, using XLA's dots: {e}", stacklevel=3)
        return False, str(e)
    return True, f"loaded from {path}"


def available() -> bool:
    """Whether ``panel_dot`` can run here (builds and registers the kernel on first call; thread-safe)."""
    with _lock:
        if "ok" not in _state:
            _state["ok"], _state["why"] = _load()
        return bool(_state["ok"])


def status() -> str:
    """One line: whether the decode step's weight dots use this kernel, and why not if they don't."""
    ok = available()
    return f"few-row dot kernel: {'on' if ok else 'off'} ({_state['why']})"


def use_for(w_t: jax.Array) -> bool:
    """Whether a decode-step weight [Dout, Din] should be packed for ``panel_dot``: float32 on a CPU backend of one
    device, with the kernel available. With several devices the program may be sharded, and XLA's partitioner
    would gather a custom call's operands onto every device; XLA's own dots shard."""
    return (w_t.dtype == jnp.float32 and w_t.ndim == 2 and jax.default_backend() == "cpu"
            and jax.device_count() == 1 and available())


def pack(w_t: jax.Array) -> jax.Array:
    """A weight stored [N, K] ([Dout, Din]) -> panels [ceil(N / 16), K, 16], the last zero-padded. Outside ``jit``
    (the output projection in ``prepare_decoder``) in numpy: XLA takes ~1 s to compile this transpose."""
    n, k = w_t.shape
    panels = -(-n // PANEL)
    if not isinstance(w_t, jax.core.Tracer):
        w = np.zeros((panels * PANEL, k), w_t.dtype)
        w[:n] = np.asarray(w_t)
        return jnp.asarray(np.ascontiguousarray(w.reshape(panels, PANEL, k).transpose(0, 2, 1)))
    w = jnp.pad(w_t, ((0, panels * PANEL - n), (0, 0)))
    return jnp.transpose(w.reshape(panels, PANEL, k), (0, 2, 1))


def panel_dot(x: jax.Array, wp: jax.Array, n: int | None = None) -> jax.Array:
    """x [..., K] float32 times the packed weight wp [P, K, 16] -> [..., n] float32: the first ``n`` outputs (the
    kernel writes no others), or all 16 * P (the padding's are zeros)."""
    rows = x.reshape(-1, x.shape[-1])
    out = jax.ShapeDtypeStruct((rows.shape[0], wp.shape[0] * PANEL if n is None else n), jnp.float32)
    y = jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(rows, wp)
    return y.reshape(*x.shape[:-1], out.shape[1])
