"""Test-session settings: keep transformers and huggingface_hub quiet and offline (set before they are imported)."""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402

# Tiny reference models: torch's OpenMP threads only fight XLA for the 2 cores (100x slower generate under load).
torch.set_num_threads(1)
