"""CPU kernels for the decode step: the weight dots (a few rows of x times a weight packed in 16-wide panels) and
the attention of a few query rows over the step's K/V.

XLA CPU's dots for the 1-16 rows of a decode step read their weights at about half of the memory bandwidth that
the same machine gives a plain stream (``benchmarks/README.md``), and the step is those dots. ``few_row_dot.cc``
does them as one contiguous read per panel of 16 outputs, prefetched, on XLA's own thread pool; on the decode
benchmark's machine it runs the decoder's weight dots 1.4x (4 rows) to 1.6x (16 rows) faster than XLA. Above
``MAX_ROWS`` rows XLA's GEMM is faster, and ``prepare_decoder(rows=)`` leaves the weights in XLA's layout.
``attend.cc`` reads each (batch, head)'s keys [H, S] and values [S, H] once, front to back, for all its query rows
(``attend``; ``layers.core.attention`` calls it for the decode step's cross-attention and beam search's
self-attention).

They are built once per machine with the system C++ compiler (``$CXX`` or ``c++``, ``-march=native``) against the
XLA FFI headers of the installed jaxlib, kept in ``cache_dir()`` (``$SPEECHSEQ_KERNEL_DIR``, default
``~/.cache/speechseq/kernels``; the file name is a hash of the sources, jaxlib's version and the CPU), and called
through ``jax.ffi``. Without a compiler, with ``SPEECHSEQ_NATIVE=0``, on other backends, with several devices or
for other dtypes, the decode step keeps XLA's ops (``layers.core.out_major_dot``, ``layers.core.attention``): the
results agree to float32 rounding. ``status()`` says which and why.

Weights for the dots are packed once per model, ``pack``: [N, K] (a kernel stored [Dout, Din]) -> [ceil(N / 16),
K, 16], zero-padded; ``panel_dot`` takes x [..., K] and returns [..., N] (or all 16 * panels outputs).
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
# Above this many rows (decode batch x beams) XLA's GEMM beats the kernel (chain of a bert-base step's 74 weight
# dots, benchmarks/README.md: 32 rows 63-69 ms against XLA's 67-77, 64 rows 102-119 against 94-103, 128 rows 170-206
# against 132-141), so ``prepare_decoder(rows=)`` keeps XLA's layout there.
MAX_ROWS = 48
TARGETS = {"speechseq_few_row_dot": "SpeechseqFewRowDot", "speechseq_attend": "SpeechseqAttend"}  # FFI name: symbol
SOURCES = tuple(Path(__file__).with_name(n) for n in ("few_row_dot.cc", "attend.cc", "common.h"))
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fPIC")

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

    key = hashlib.sha256("\0".join([*(f.read_text() for f in SOURCES), jaxlib.__version__, " ".join(FLAGS),
                                     _cpu_identity()]).encode()).hexdigest()[:16]
    return cache_dir() / f"decode-{key}.so"


def _build(path: Path) -> None:
    """Compiles ``SOURCES`` into ``path``: each ``.cc`` to an object at the same time (the FFI headers make each
    take ~5 s), then one link, in a temporary folder beside ``path`` and through a rename (concurrent builds are
    safe, a failed one leaves nothing)."""
    compiler = shutil.which(os.environ.get("CXX") or "c++")
    if compiler is None:
        raise FileNotFoundError(f"no C++ compiler ({os.environ.get('CXX') or 'c++'} not on PATH)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".build-") as tmp:
        units = [f for f in SOURCES if f.suffix == ".cc"]
        objects = [os.path.join(tmp, f"{f.stem}.o") for f in units]
        logs = [os.path.join(tmp, f"{f.stem}.log") for f in units]  # files, not pipes: no compiler waits on us
        jobs: list[subprocess.Popen] = []
        try:
            for f, o, log in zip(units, objects, logs):
                with open(log, "w") as err:
                    jobs.append(subprocess.Popen([compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", "-c", str(f),
                                                  "-o", o], stdout=subprocess.DEVNULL, stderr=err))
            codes = [job.wait(timeout=300) for job in jobs]
        finally:  # a timeout or an interrupt: stop the other compiles before the folder goes
            for job in jobs:
                if job.poll() is None:
                    job.kill()
                    job.wait()
        failed = [(f.name, Path(log).read_text()) for f, log, rc in zip(units, logs, codes) if rc]
        if not failed:
            library = os.path.join(tmp, path.name)
            done = subprocess.run([compiler, *FLAGS, "-shared", *objects, "-o", library], capture_output=True,
                                  text=True, timeout=300)
            if done.returncode:
                failed = [("the link", done.stderr)]
        if failed:
            name, err = failed[0]
            last = (err.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"{compiler} failed on {name}: {last}")
        os.replace(library, path)


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
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
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
    """One line: whether the decode step uses these kernels, and why not if it doesn't."""
    ok = available()
    return f"CPU decode kernels: {'on' if ok else 'off'} ({_state['why']})"


def _runs_here() -> bool:
    """A CPU backend of one device, with the kernels available. With several devices the program may be sharded,
    and XLA's partitioner would gather a custom call's operands onto every device; XLA's own dots shard."""
    return jax.default_backend() == "cpu" and jax.device_count() == 1 and available()


def use_for(w_t: jax.Array, rows: int | None = None) -> bool:
    """Whether a decode-step weight [Dout, Din] should be packed for ``panel_dot``: float32, for steps of at most
    ``MAX_ROWS`` rows (``rows`` None: unknown, few), where the kernels run (``_runs_here``)."""
    return (rows is None or rows <= MAX_ROWS) and w_t.dtype == jnp.float32 and w_t.ndim == 2 and _runs_here()


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
    y = jax.ffi.ffi_call("speechseq_few_row_dot", out, vmap_method="sequential")(rows, wp)
    return y.reshape(*x.shape[:-1], out.shape[1])


def attend_fits(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> bool:
    """Whether ``attend`` takes this attention: float32 q [B, T, N, H], k [B, N, H, S] and v [B, N, S, H], a mask
    (if any) the same for every head, where the kernels run."""
    return (all(a.dtype == jnp.float32 for a in (q, k, v)) and q.ndim == k.ndim == v.ndim == 4
            and (mask is None or (mask.ndim <= 4 and (mask.ndim < 3 or mask.shape[-3] == 1))) and _runs_here())


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float | jax.Array) -> jax.Array:
    """Attention for the decode step's few query rows (``attend.cc``; see ``attend_fits``), as
    ``layers.core.attention`` computes it: q [B, T, N, H], keys k [B, N, H, S], values v [B, N, S, H], mask bool
    broadcastable to [B, 1, T, S] (True = attend) -> [B, T, N, H] float32."""
    B, T, N, H = q.shape
    S = k.shape[-1]
    m = jnp.ones((1, 1, S), jnp.uint8) if mask is None else mask.reshape((1,) * (4 - mask.ndim) + mask.shape)[:, 0]
    m = jnp.broadcast_to(m, (*m.shape[:2], S)).astype(jnp.uint8)  # [1 or B, 1 or T, S]
    out = jax.ffi.ffi_call("speechseq_attend", jax.ShapeDtypeStruct((B * N, T, H), jnp.float32),
                           vmap_method="sequential")(
        jnp.swapaxes(q, 1, 2).reshape(B * N, T, H), k.reshape(B * N, H, S), v.reshape(B * N, S, H), m,
        jnp.asarray(scale, jnp.float32).reshape(()))
    return jnp.swapaxes(out.reshape(B, N, T, H), 1, 2)
