"""Shared building blocks. Shape legend used in docstrings and einsum strings:

B batch, T target tokens, S source frames (or keys), N heads, H head dim, D model dim, F feed-forward dim,
C conv channels, K kernel width, L layers, V vocabulary.
"""

from speechseq.layers.core import (  # noqa: F401
    activation,
    attention,
    block,
    dense,
    layer_norm,
    mlp,
    multi_head_attention,
)
