"""The Data2VecAudio speech encoder (``Data2VecAudioModel``): wav2vec2's encoder with a LayerNorm in every conv of
the feature encoder, post-norm layers, and as positional embedding a stack of ``num_conv_pos_embeddings`` grouped
convolutions of width ``conv_pos_kernel_size`` (no weight norm), each followed by a LayerNorm without weights and
the feature activation. An encoder family as ``registry.EncoderFamily`` describes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from speechseq.checkpoints.table import Rule, rule
from speechseq.config import INT, HFField
from speechseq.encoders import wav2vec2
from speechseq.encoders.wav2vec2 import INPUT_KIND, TORCH_NORM_EPS, Params, frame_mask, grouped_conv  # noqa: F401
from speechseq.layers.core import activation, standardize


@dataclass(frozen=True)
class Data2VecAudioConfig(wav2vec2.Wav2Vec2Config):
    """Wav2Vec2Config with the positional conv stack's kernel width; ``num_conv_pos_embeddings`` counts its layers."""

    conv_pos_kernel_size: int = 19


Config = Data2VecAudioConfig

# Data2VecAudioConfig's fields: wav2vec2's without the norm options its model fixes, a positional stack of 5 layers
FIELDS = tuple(
    HFField(f.attr, f.key, 5, INT) if f.attr == "num_conv_pos_embeddings" else f
    for f in wav2vec2.FIELDS if f.attr not in ("feat_extract_norm", "stable_layer_norm", "feat_proj_layer_norm")
) + (HFField("conv_pos_kernel_size", "conv_pos_kernel_size", 19, INT),)
FIXED = dict(feat_extract_norm="layer", stable_layer_norm=False, feat_proj_layer_norm=True)


def parse_config(hf: dict, where: str) -> Data2VecAudioConfig:
    """A ``Data2VecAudioConfig`` dict -> its config (one-line ``ConfigError``s naming ``where`` and the field)."""
    return wav2vec2.parse_config(hf, where, table=FIELDS, fixed=FIXED, cls=Data2VecAudioConfig)


def weight_rules(cfg: Data2VecAudioConfig) -> list[Rule]:
    """wav2vec2's table with the positional conv stack in place of its weight-normed conv."""
    D, G, K = cfg.hidden_size, cfg.num_conv_pos_embedding_groups, cfg.conv_pos_kernel_size
    L = cfg.num_conv_pos_embeddings  # layers of the stack
    pos = "{base}encoder.pos_conv_embed.layers.{i}.conv"
    return [r for r in wav2vec2.weight_rules(cfg) if not r.paths[0].startswith("pos_conv/")] + [
        rule(f"{pos}.weight", "pos_conv/kernel", (K, D // G, D), (None, None, "embed"), layout="conv", init="conv",
             layers=L),
        rule(f"{pos}.bias", "pos_conv/bias", (D,), ("embed",), init="zeros", layers=L),
    ]


def positional_convs(cfg: Data2VecAudioConfig, p: Params, h: jax.Array) -> jax.Array:
    """[B, S, D] -> [B, S, D]: each layer a grouped conv (an even kernel drops its last frame, as ``positional_conv``
    explains), a LayerNorm without weights (torch's default eps) and the feature activation."""
    k, act = cfg.conv_pos_kernel_size, activation(cfg.feat_extract_activation)
    for i in range(cfg.num_conv_pos_embeddings):  # a handful of layers: unrolled
        y = grouped_conv(h, p["kernel"][i].astype(h.dtype), (k // 2, (k - 1) // 2), cfg.num_conv_pos_embedding_groups)
        y = standardize((y + p["bias"][i].astype(h.dtype)).astype(jnp.float32), TORCH_NORM_EPS).astype(h.dtype)
        h = act(y)
    return h


def encode(cfg: Data2VecAudioConfig, p: Params, input_values: jax.Array, attention_mask: jax.Array | None, *,
           rng: jax.Array | None = None, dtype: jnp.dtype = jnp.float32,
           remat: str = "none", capture: bool = False) -> tuple:
    """``wav2vec2.encode`` with the positional conv stack: audio [B, N] (+ mask [B, N]) -> (frames [B, S, E],
    frame mask [B, S] or None) (+ ``Captured`` with ``capture``)."""
    return wav2vec2.encode(cfg, p, input_values, attention_mask, rng=rng, dtype=dtype, remat=remat,
                           positional=positional_convs, capture=capture)
