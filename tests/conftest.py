"""Test-session settings: keep transformers and huggingface_hub quiet and offline (set before they are imported),
and the compilation cache out of the home folder."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# the command line's JAX compilation cache goes to a fresh folder per test session, never the user's ~/.cache
os.environ["SPEECHSEQ_CACHE_DIR"] = tempfile.mkdtemp(prefix="speechseq-test-jax-cache-")
atexit.register(shutil.rmtree, os.environ["SPEECHSEQ_CACHE_DIR"], True)
# the CPU decode kernel (speechseq.kernels) is built once into a folder the test workers share, not ~/.cache
os.environ["SPEECHSEQ_KERNEL_DIR"] = os.path.join(tempfile.gettempdir(), f"speechseq-test-kernels-{os.getuid()}")

# The suite compiles a few hundred small programs, and both settings below cut compile time a lot while
# buying nothing on tiny models: LLVM's optimisation of XLA's CPU kernels is about half of each compile (tiny beam-4
# generate: 5.3 -> 2.6 s), and XLA:CPU's older fusion code generator (LLVM IR emitted per element) compiles the same
# HLO about 1.6x faster than its default MLIR fusion emitters (the whole suite on the 2-core Xeon: 20 min 20 s ->
# 12 min 18 s). Same HLO programs, same checks. Tests that compile as users do pass XLA_DEFAULTS per program, and
# XLA_FLAGS="--xla_backend_optimization_level=3 --xla_cpu_use_fusion_emitters=true" runs the whole suite so.
for flag, value in (("xla_backend_optimization_level", "0"), ("xla_cpu_use_fusion_emitters", "false")):
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --{flag}={value}".strip()
# XLA's own defaults for what the suite changes: tests that compile a program as users get it pass these per program
XLA_DEFAULTS = {"xla_backend_optimization_level": 3, "xla_cpu_use_fusion_emitters": True}

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny reference models: torch's OpenMP threads only fight XLA for the 2 cores (100x slower generate under load).
torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """Tests marked ``first`` (the longest: child processes on simulated devices, 0.5-2 min) go first: pytest-xdist
    hands tests out in collection order, and started last such a test keeps one core busy alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("first") is None)


@pytest.fixture(params=["kernel", "xla"])
def native(request):
    """Runs a test with the decode step's weight dots in the CPU kernel (``speechseq.kernels``) and with XLA's:
    the kernel's availability is decided once per process, so "xla" marks it off and clears JAX's caches (traced
    programs that used it) before and after."""
    import jax

    from speechseq import kernels

    if request.param == "kernel":
        if not kernels.available():
            pytest.skip(kernels.status())
        yield request.param
        return
    saved = dict(kernels._state)
    kernels._state.update(ok=False, why="turned off by the test")
    jax.clear_caches()
    try:
        yield request.param
    finally:
        kernels._state.clear()
        kernels._state.update(saved)
        jax.clear_caches()


# ---- synthesized speech (espeak-ng) ----------------------------------------------------------------------------------

SPEECH_TEXTS = ("hello world", "the quick brown fox", "speech to text in jax", "a b c", "hello", "text to speech",
                "the fox in the world", "quick quick brown", "jax in a world of text", "brown fox jumps",
                "to be or not to be", "speech", "hello jax", "world of speech and text", "the end", "in the box")


def synthesize(text: str, path, rate: int | None = None, voice: str = "en-us", speed: int = 160):
    """``text`` spoken by espeak-ng (``voice``, ``speed`` words/min) into the WAV ``path``: espeak's own 22050 Hz mono
    16-bit, or resampled to ``rate`` by sox (no dither), a resampler independent of the library's soxr. Skips the test
    when espeak-ng (or sox, for ``rate``) is not installed. Returns the path."""
    import subprocess
    from pathlib import Path

    path = Path(path)
    if shutil.which("espeak-ng") is None or (rate and shutil.which("sox") is None):
        pytest.skip("espeak-ng and sox are needed to synthesize speech")
    raw = path.with_suffix(".espeak.wav") if rate else path
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(raw), text], check=True)
    if rate:
        subprocess.run(["sox", "-D", "-V1", str(raw), "-r", str(rate), "-c", "1", "-b", "16", "-e",
                        "signed-integer", str(path)], check=True)
        raw.unlink()
    return path


@pytest.fixture(scope="session")
def speech_clips(tmp_path_factory):
    """[(wav path, text)] for ``SPEECH_TEXTS``, synthesized once per test session at 22050 Hz."""
    folder = tmp_path_factory.mktemp("speech")
    return [(synthesize(text, folder / f"clip{i:02d}.wav"), text) for i, text in enumerate(SPEECH_TEXTS)]


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a whole test module (``hf_factory.one_torch_thread``); a module that compares against
    transformers opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import hf_factory

    with hf_factory.one_torch_thread():
        yield
