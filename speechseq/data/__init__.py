"""Training data: manifests (``read_manifest``) and the deterministic, sharded, resumable batch ``Loader``.

numpy only (no jax import), so the command line can import it at no cost.
"""

from speechseq.data.loader import DEFAULT_LABEL_BUCKETS, REASONS, Loader, single_threaded_blas
from speechseq.data.manifest import AUDIO_EXTENSIONS, Example, read_manifest

__all__ = ["AUDIO_EXTENSIONS", "DEFAULT_LABEL_BUCKETS", "REASONS", "Example", "Loader", "read_manifest",
           "single_threaded_blas"]
