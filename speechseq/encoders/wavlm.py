"""The WavLM speech encoder (``WavLMModel``): wav2vec2's encoder whose self-attention adds a gated relative position
bias. The first layer's table (``rel_attn_embed``, one row per relative-position bucket) gives a bias [heads, S, S]
shared by all layers; each layer scales it per head and query frame by a gate computed from its input
(``gru_rel_pos_linear``, ``gru_rel_pos_const``). Post-norm or stable (pre-norm) layers, adapter as wav2vec2's.
An encoder family as ``registry.EncoderFamily`` describes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from speechseq.checkpoints.table import Rule, dense as dense_rules, rule
from speechseq.config import HFField
from speechseq.encoders import wav2vec2
from speechseq.encoders.wav2vec2 import INPUT_KIND, Params, SelfAttention, frame_mask  # noqa: F401 (the family API)
from speechseq.layers.core import attention, dense, heads, merge_heads


@dataclass(frozen=True)
class WavLMConfig(wav2vec2.Wav2Vec2Config):
    """Wav2Vec2Config with the relative position buckets: ``num_buckets`` (half for each direction) over distances
    up to ``max_bucket_distance`` frames (log-spaced beyond a quarter of the buckets)."""

    num_buckets: int = 320
    max_bucket_distance: int = 800


Config = WavLMConfig

# WavLMConfig's fields: wav2vec2's without feat_proj_layer_norm (its model always has that norm), plus the buckets
FIELDS = tuple(f for f in wav2vec2.FIELDS if f.attr != "feat_proj_layer_norm") + (
    HFField("num_buckets", "num_buckets", 320, dict(low=4)),  # fewer leaves no exact bucket (a log of 0 there)
    HFField("max_bucket_distance", "max_bucket_distance", 800, dict(low=1)),
)
# transformers never skips the first layer with LayerDrop: it makes the position bias
FIXED = dict(feat_proj_layer_norm=True, layerdrop_first_layer=False)


def parse_config(hf: dict, where: str) -> WavLMConfig:
    """A ``WavLMConfig`` dict -> its config (one-line ``ConfigError``s naming ``where`` and the field)."""
    return wav2vec2.parse_config(hf, where, table=FIELDS, fixed=FIXED, cls=WavLMConfig)


def weight_rules(cfg: WavLMConfig) -> list[Rule]:
    """wav2vec2's table plus each layer's gate and the first layer's bucket table."""
    L, N = cfg.num_layers, cfg.num_heads
    att = "{base}encoder.layers.{i}.attention"
    return wav2vec2.weight_rules(cfg) + [
        rule(f"{att}.gru_rel_pos_const", "layers/attn/gate_const", (1, N, 1, 1), (None, None, None, None),
             init="ones", layers=L),
        *dense_rules(f"{att}.gru_rel_pos_linear", "layers/attn/gate", cfg.head_dim, 8, (None, None), layers=L),
        rule("{base}encoder.layers.0.attention.rel_attn_embed.weight", "rel_attn_embed", (cfg.num_buckets, N),
             (None, None)),
    ]


def position_buckets(cfg: WavLMConfig, num_frames: int) -> np.ndarray:
    """The bucket [S, S] of each (query, key) frame pair, as transformers' ``_relative_positions_bucket`` computes it
    (in float32): the sign picks a half, distances below a quarter of the buckets are exact, longer ones log-spaced
    up to ``max_bucket_distance``, the rest in the last bucket."""
    half = cfg.num_buckets // 2
    rel = np.arange(num_frames)[None, :] - np.arange(num_frames)[:, None]  # key - query
    exact = half // 2
    dist = np.abs(rel)
    # float32 throughout, as torch (a Python scalar does not widen a float32 tensor); distances below ``exact`` take
    # the exact branch, so the log of 0 is never used
    scaled = np.log(np.maximum(dist, 1).astype(np.float32) / np.float32(exact))
    scaled = scaled / np.float32(math.log(cfg.max_bucket_distance / exact)) * np.float32(half - exact)
    large = np.minimum((np.float32(exact) + scaled).astype(np.int64), half - 1)
    return (rel > 0) * half + np.where(dist < exact, dist, large)


def position_bias(cfg: WavLMConfig, table: jax.Array, num_frames: int) -> jax.Array:
    """The bucket table [num_buckets, heads] -> bias [heads, S, S] (float32)."""
    return jnp.transpose(table.astype(jnp.float32)[position_buckets(cfg, num_frames)], (2, 0, 1))


def gated_attention(cfg: WavLMConfig, p: Params, num_frames: int, dtype: jnp.dtype) -> SelfAttention:
    """Self-attention with the gated relative position bias (``wav2vec2.encode``'s ``attention``): scores + gate x
    bias, the gate per head and query frame from the layer's input x [B, S, D] split into heads."""
    bias = position_bias(cfg, p["rel_attn_embed"], num_frames)
    N = cfg.num_heads

    def attend(lp: Params, x: jax.Array, mask: jax.Array | None, rng: jax.Array | None,
               return_probs: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        B, S, _ = x.shape
        q, k, v = (heads(lp[n], x, N, dtype) for n in ("q", "k", "v"))
        per_head = jnp.transpose(x.reshape(B, S, N, -1), (0, 2, 1, 3))  # [B, N, S, D/N]
        g = dense(lp["gate"], per_head, dtype).astype(jnp.float32).reshape(B, N, S, 2, 4).sum(-1)
        gate_a, gate_b = jnp.split(jax.nn.sigmoid(g), 2, axis=-1)  # [B, N, S, 1] each
        gate = gate_a * (gate_b * lp["gate_const"].astype(jnp.float32) - 1.0) + 2.0
        out = attention(q, k, v, mask, 1.0 / math.sqrt(q.shape[-1]), dropout_rate=cfg.attention_dropout, rng=rng,
                        bias=gate * bias, return_probs=return_probs)
        if not return_probs:
            return merge_heads(lp["o"], out, dtype)
        # transformers' WavLM attention (torch's multi_head_attention_forward) returns the probabilities averaged
        # over the heads, repeated for each head
        out, probs = out
        return merge_heads(lp["o"], out, dtype), jnp.broadcast_to(probs.mean(1, keepdims=True), probs.shape)

    return attend


def encode(cfg: WavLMConfig, p: Params, input_values: jax.Array, attention_mask: jax.Array | None, *,
           rng: jax.Array | None = None, dtype: jnp.dtype = jnp.float32,
           remat: str = "none", capture: bool = False) -> tuple:
    """``wav2vec2.encode`` with WavLM's attention: audio [B, N] (+ mask [B, N]) -> (frames [B, S, E], frame mask
    [B, S] or None) (+ ``Captured`` with ``capture``)."""
    return wav2vec2.encode(cfg, p, input_values, attention_mask, rng=rng, dtype=dtype, remat=remat,
                           attention=gated_attention, capture=capture)
