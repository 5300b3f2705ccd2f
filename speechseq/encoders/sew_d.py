"""The SEW-D speech encoder (``SEWDModel``): SEW (``sew.py``: feature encoder, squeeze, upsampling) whose layers are
DeBERTa-v2's, with disentangled self-attention over relative positions.

Each layer is post-norm like wav2vec2's (``wav2vec2.transformer_layers``) with DeBERTa's names; its attention adds to
the content scores (q . k) a content-to-position term (q . key projection of the relative embedding of the pair's
bucket, "c2p") and a position-to-content term (k . query projection of it, "p2c"), as ``pos_att_type`` lists,
everything divided by sqrt(head_dim * (1 + number of terms)). The relative embeddings (one table for all layers,
``2 * att_span`` rows, LayerNorm'ed when ``norm_rel_ebd`` says "layer_norm") are projected by the layer's own query
and key projections (``share_att_key``) or by ``pos_query_proj`` / ``pos_key_proj``. Pairs further apart than half
of ``position_buckets`` share log-spaced buckets up to ``max_relative_positions``. Unlike SEW, no LayerNorm or
dropout between the squeeze and the layers, and no LayerDrop. An encoder family as ``registry.EncoderFamily``
describes it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from speechseq.checkpoints.table import Rule, dense as dense_rules, norm as norm_rules, rule
from speechseq.config import INT, POSITIVE, HFField
from speechseq.encoders import sew, wav2vec2
from speechseq.encoders.sew import frame_mask  # noqa: F401 (the family API)
from speechseq.encoders.wav2vec2 import INPUT_KIND, Params, SelfAttention  # noqa: F401 (the family API)
from speechseq.errors import ConfigError
from speechseq.layers.core import (attention, captured, dense, dropout, fold, heads, layer_norm, merge_heads,
                                   split_heads)

POS_ATT_TYPES = ("c2p", "p2c")


@dataclass(frozen=True)
class SEWDConfig(sew.SEWConfig):
    """SEWConfig with DeBERTa-v2's relative attention. ``max_relative_positions`` and ``position_buckets`` as in the
    HF dict (< 1: unset); ``att_span`` says what they resolve to."""

    feature_layer_norm_eps: float = 1e-5  # the conv features' LayerNorm (``layer_norm_eps`` is the layers')
    max_position_embeddings: int = 512
    max_relative_positions: int = -1
    position_buckets: int = 256
    relative_attention: bool = True
    share_att_key: bool = True
    pos_att_type: tuple[str, ...] = ("p2c", "c2p")
    norm_rel_ebd: bool = True  # "layer_norm" in the HF field

    @property
    def max_relative(self) -> int:
        """The largest distance of the log buckets (max_position_embeddings when max_relative_positions < 1)."""
        return self.max_relative_positions if self.max_relative_positions >= 1 else self.max_position_embeddings

    @property
    def att_span(self) -> int:
        """Half the rows of the relative embedding table."""
        return self.position_buckets if self.position_buckets > 0 else self.max_relative

    def describe(self) -> str:
        rel = (f", relative attention {'+'.join(self.pos_att_type) or 'none'} over {2 * self.att_span} positions"
               if self.relative_attention else "")
        return super().describe() + rel


Config = SEWDConfig


def _pos_att_type(hf: dict, key: str, where: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """A list of "c2p" / "p2c" (or DeBERTa's "p2c|c2p" string)."""
    value = hf.get(key, default)
    items = value.lower().split("|") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or any(not isinstance(t, str) or t.strip() not in POS_ATT_TYPES
                                                   for t in items):
        raise ConfigError(f"{where}: field '{key}' should be a list of {list(POS_ATT_TYPES)}, got {value!r:.80}")
    return tuple(t.strip() for t in items)


def _norm_rel_ebd(hf: dict, key: str, where: str, default: str) -> bool:
    """"layer_norm" or "none" (DeBERTa's "|"-separated list of the two)."""
    value = hf.get(key, default)
    items = [t.strip() for t in value.lower().split("|")] if isinstance(value, str) else None
    if items is None or any(t not in ("none", "layer_norm") for t in items):
        raise ConfigError(f"{where}: field '{key}' should be 'layer_norm' or 'none', got {value!r:.80}")
    return "layer_norm" in items


def _sew_d_field(f: HFField) -> HFField:
    """SEW's field as SEWDConfig has it: other defaults, and DeBERTa's dropout sites. SEW-D drops after the attention
    output and after the feed-forward (where ``wav2vec2.transformer_layers`` applies ``hidden_dropout``) with the
    rate of ``activation_dropout``, and nowhere after the activation: the typed ``hidden_dropout`` reads that key
    (``activation_dropout`` is fixed to 0; the HF ``hidden_dropout``, unused by SEWDModel, stays in the dict)."""
    if f.attr == "hidden_dropout":
        return HFField("hidden_dropout", "activation_dropout", 0.1)
    defaults = dict(layer_norm_eps=1e-7, hidden_act="gelu_python")
    return dataclasses.replace(f, default=defaults[f.attr]) if f.attr in defaults else f


FIELDS = tuple(_sew_d_field(f) for f in sew.FIELDS if f.attr not in ("activation_dropout", "layerdrop")) + (
    HFField("feature_layer_norm_eps", "feature_layer_norm_eps", 1e-5, POSITIVE),
    HFField("max_position_embeddings", "max_position_embeddings", 512, INT),
    HFField("max_relative_positions", "max_relative_positions", -1, dict(low=None)),
    HFField("position_buckets", "position_buckets", 256, dict(low=None)),
    HFField("relative_attention", "relative_attention", True, None),
    HFField("share_att_key", "share_att_key", True, None),
    HFField("pos_att_type", "pos_att_type", ("p2c", "c2p"), _pos_att_type),
    HFField("norm_rel_ebd", "norm_rel_ebd", "layer_norm", _norm_rel_ebd,
            transform=(bool, lambda on: "layer_norm" if on else "none")),
)


def parse_config(hf: dict, where: str) -> SEWDConfig:
    """A ``SEWDConfig`` dict -> its config (one-line ``ConfigError``s naming ``where`` and the field)."""
    conv = hf.get("conv_kernel_size", 0)
    if not isinstance(conv, int) or conv > 0:  # DeBERTa's conv after the first layer: SEWDConfig has no such field
        raise ConfigError(f"{where}: option conv_kernel_size={hf['conv_kernel_size']!r} is not supported for sew-d "
                          "(supported: 0)")
    fixed = dict(sew.fixed(hf), activation_dropout=0.0, layerdrop=0.0)
    cfg = wav2vec2.parse_config(hf, where, table=FIELDS, fixed=fixed, cls=SEWDConfig)
    mid = cfg.position_buckets // 2
    if cfg.relative_attention and cfg.position_buckets > 0 and (mid == 0 or cfg.max_relative - 1 == mid):
        # the log-spaced buckets divide by log(abs / mid) with mid 0, or by log((max - 1) / mid) = 0
        raise ConfigError(f"{where}: position_buckets {cfg.position_buckets} with max_relative_positions "
                          f"{cfg.max_relative} leave the log-spaced buckets undefined (a division by zero)")
    return cfg


def weight_rules(cfg: SEWDConfig) -> list[Rule]:
    """SEW's table before and after the layers (feature encoder, norm, projection, positional conv, upsampling) and
    DeBERTa-v2's names for the layers, mapped onto ``wav2vec2.transformer_layers``' parameters."""
    D, L, F = cfg.hidden_size, cfg.num_layers, cfg.intermediate_size
    out = [r for r in sew.weight_rules(cfg) if r.paths[0].split("/")[0] not in ("layers", "norm")]
    enc, lay = "{base}encoder.encoder", "{base}encoder.encoder.layer.{i}"
    names = [("q", "attention.self.query_proj"), ("k", "attention.self.key_proj"), ("v", "attention.self.value_proj")]
    if cfg.relative_attention and not cfg.share_att_key:
        names += [(n, f"attention.self.{hf}") for n, hf, kind in (("pos_k", "pos_key_proj", "c2p"),
                                                                   ("pos_q", "pos_query_proj", "p2c"))
                  if kind in cfg.pos_att_type]
    for name, hf in names:
        out += dense_rules(f"{lay}.{hf}", f"layers/attn/{name}", D, D, ("embed", "heads"), layers=L)
    out += dense_rules(f"{lay}.attention.output.dense", "layers/attn/o", D, D, ("heads", "embed"), layers=L)
    out += norm_rules(f"{lay}.attention.output.LayerNorm", "layers/attn_norm", D, layers=L)
    out += dense_rules(f"{lay}.intermediate.dense", "layers/mlp/wi", D, F, ("embed", "mlp"), layers=L)
    out += dense_rules(f"{lay}.output.dense", "layers/mlp/wo", F, D, ("mlp", "embed"), layers=L)
    out += norm_rules(f"{lay}.output.LayerNorm", "layers/mlp_norm", D, layers=L)
    if cfg.relative_attention:
        out.append(rule(f"{enc}.rel_embeddings.weight", "rel_embeddings", (2 * cfg.att_span, D), (None, "embed")))
    if cfg.norm_rel_ebd:  # made whatever relative_attention says
        out += norm_rules(f"{enc}.LayerNorm", "rel_norm", D)
    return out


def relative_positions(cfg: SEWDConfig, num_frames: int) -> np.ndarray:
    """The relative position [S, S] of each (query, key) frame pair, query - key, bucketed as transformers'
    ``make_log_bucket_position`` does (in float32, as torch): exact within half of ``position_buckets``,
    log-spaced beyond, up to ``max_relative_positions``."""
    rel = np.arange(num_frames)[:, None] - np.arange(num_frames)[None, :]
    if cfg.position_buckets <= 0:
        return rel
    mid = cfg.position_buckets // 2
    abs_pos = np.where((rel < mid) & (rel > -mid), mid - 1, np.abs(rel))
    with np.errstate(divide="ignore"):  # log(0) where mid is 1: that branch is not taken
        ratio = np.log(abs_pos.astype(np.float32) / np.float32(mid))
    log_pos = np.ceil(ratio / np.log(np.float32((cfg.max_relative - 1) / mid)) * np.float32(mid - 1)) + mid
    return np.where(abs_pos <= mid, rel, log_pos * np.sign(rel)).astype(np.int64)


def disentangled_attention(cfg: SEWDConfig, p: Params, num_frames: int, dtype: jnp.dtype) -> SelfAttention:
    """DeBERTa-v2's self-attention (``wav2vec2.transformer_layers``' ``attention``): content scores plus the c2p and
    p2c terms, all scaled by 1 / sqrt(head_dim * (1 + len(pos_att_type)))."""
    N, A = cfg.num_heads, cfg.att_span
    scale = 1.0 / math.sqrt(cfg.head_dim * (1 + len(cfg.pos_att_type)))
    terms = cfg.pos_att_type if cfg.relative_attention else ()
    if terms:
        rel = p["rel_embeddings"].astype(jnp.float32)
        if cfg.norm_rel_ebd:
            rel = layer_norm(p["rel_norm"], rel, cfg.layer_norm_eps)
        buckets = relative_positions(cfg, num_frames)
        # c2p: query i reads row bucket(i - j) + A of its projections; p2c: key j reads row -bucket(j - i) + A
        c2p_rows = np.clip(buckets + A, 0, 2 * A - 1)  # [query, key]
        p2c_rows = np.clip(-buckets + A, 0, 2 * A - 1)  # [key, query]

    def attend(lp: Params, x: jax.Array, mask: jax.Array | None, rng: jax.Array | None,
               return_probs: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        q, k, v = (heads(lp[n], x, N, dtype) for n in ("q", "k", "v"))  # [B, N, S, H]
        bias = None
        if terms:
            # the relative embeddings take dropout at the rate of activation_dropout (our hidden_dropout), per layer
            table = dropout(rel, cfg.hidden_dropout, fold(rng, 1)).astype(dtype)

            def project(own: str, shared: str) -> jax.Array:  # the table through a projection, [2A, N, H]
                return split_heads(dense(lp[shared if cfg.share_att_key else own], table, dtype), N)

            bias = 0.0
            if "c2p" in terms:
                scores = jnp.einsum("bnqh,rnh->bnqr", q, project("pos_k", "k"), preferred_element_type=jnp.float32)
                bias = bias + jnp.take_along_axis(scores, jnp.asarray(c2p_rows)[None, None], axis=-1)
            if "p2c" in terms:
                scores = jnp.einsum("bnkh,rnh->bnkr", k, project("pos_q", "q"), preferred_element_type=jnp.float32)
                bias = bias + jnp.swapaxes(jnp.take_along_axis(scores, jnp.asarray(p2c_rows)[None, None], axis=-1),
                                           -1, -2)
            bias = bias * scale
        out = attention(q, k, v, mask, scale, dropout_rate=cfg.attention_dropout, rng=fold(rng, 0), bias=bias,
                        return_probs=return_probs)
        if return_probs:
            return merge_heads(lp["o"], out[0], dtype), out[1]
        return merge_heads(lp["o"], out, dtype)

    return attend


def encode(cfg: SEWDConfig, p: Params, input_values: jax.Array, attention_mask: jax.Array | None, *,
           rng: jax.Array | None = None, dtype: jnp.dtype = jnp.float32,
           remat: str = "none", capture: bool = False) -> tuple:
    """Audio [B, N] (+ sample mask [B, N]) -> (frames [B, S, hidden_size], frame mask [B, S] bool or None), S the
    feature encoder's frame count (+ ``Captured`` with ``capture``, as ``sew.encode``'s: no norm before the layers
    here, so the first entry is the squeezed frames). ``rng``: dropout after the (optional) feature projection, SpecAugment, and the
    layers' dropouts (on attention probabilities, relative embeddings, attention and feed-forward outputs)."""
    h, mask = sew.features(cfg, p, input_values, attention_mask, rng=rng, dtype=dtype, eps=cfg.feature_layer_norm_eps)
    S = h.shape[1]
    h, pooled_mask = sew.squeeze(cfg, p["pos_conv"], h, mask)
    out = wav2vec2.transformer_layers(cfg, p, h, pooled_mask, rng=rng, dtype=dtype, remat=remat,
                                      attention=disentangled_attention, capture=capture)
    if capture:
        return sew.upsample(cfg, p["upsample"], out[0], S, dtype), mask, captured(h, out[1])
    return sew.upsample(cfg, p["upsample"], out, S, dtype), mask
