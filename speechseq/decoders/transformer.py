"""The one text decoder every family maps onto: embeddings, L layers of (self-attn, cross-attn, MLP), LM head.

Families differ only in flags (``DecoderConfig``) and in the HF names of the same tensors (``DecoderNames``).
Parameter tree::

    embed/tokens [V, D], embed/positions [P, D]? (absent: sinusoidal), embed/token_type [Tt, D]?, embed/norm?
    layers/{self_attn,cross_attn}/{q,k,v,o}/{kernel,bias}, layers/{self,cross,mlp}_norm, layers/mlp/{wi,wo}  (stacked L)
    final_norm?, head/transform?, head/transform_norm?, head/kernel [D, V] (untied only), head/bias [V]?
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from speechseq.config import DecoderConfig
from speechseq.errors import InputError
from speechseq.layers.core import (activation, attention, block, captured, check_capture, dense, dropout,
                                   embedding_lookup, fold, heads, layer_drop, layer_norm, merge_heads,
                                   remat as remat_fn)
from speechseq.checkpoints.table import Rule, dense as dense_rules, norm as norm_rules, rule

Params = Mapping[str, jax.Array]


@dataclass(frozen=True)
class DecoderNames:
    """HF tensor names of one family, relative to its causal-LM class. ``{base}`` is the base-model prefix,
    ``{i}`` the layer index. Attention is either separate q/k/v/o names or GPT-2's fused ``Conv1D`` names."""

    tokens: str
    positions: str
    layer: str  # "{base}encoder.layer.{i}"
    self_attn: tuple[str, ...]  # (q, k, v, o) or (qkv, o) fused
    cross_attn: tuple[str, ...]  # (q, k, v, o) or (q, kv, o) fused
    self_norm: str
    cross_norm: str
    mlp: tuple[str, str]
    mlp_norm: str
    token_type: str | None = None
    embed_norm: str | None = None
    final_norm: str | None = None
    head_transform: str | None = None
    head_transform_norm: str | None = None
    head_kernel: str = "lm_head.weight"
    head_bias: tuple[str, ...] = ()  # names of the output bias, first is written
    tied_head_bias: tuple[str, ...] = ()  # its names when the word embeddings are tied, if they differ
    spare_head_bias: str | None = None  # BERT's second bias tensor, unused when untied; kept for round trips
    torch_linear: bool = True  # False: GPT-2 Conv1D, weight already [in, out]
    extra_token_names: tuple[str, ...] = ()  # other names the token table is stored under (shared embeddings)
    positions_init: str = "normal"  # how a position table the checkpoint lacks starts (Marian's: "sinusoidal")


def weight_rules(cfg: DecoderConfig, n: DecoderNames) -> list[Rule]:
    D, L, F, V = cfg.hidden_size, cfg.num_layers, cfg.intermediate_size, cfg.vocab_size
    lin = n.torch_linear
    out = [
        rule((n.tokens, *n.extra_token_names), "embed/tokens", (V, D), ("vocab", "embed")),
    ]
    if not cfg.sinusoidal_positions:  # a fixed sinusoidal table is computed, not stored
        out.append(rule(n.positions, "embed/positions", (cfg.max_positions, D), (None, "embed"),
                        init=n.positions_init))
    if n.token_type:
        out.append(rule(n.token_type, "embed/token_type", (cfg.type_vocab_size, D), (None, "embed")))
    if n.embed_norm and cfg.embed_norm:  # TrOCR's is optional
        out += norm_rules(n.embed_norm, "embed/norm", D)

    def attention(names: tuple[str, ...], path: str) -> list[Rule]:
        *proj, o = [f"{n.layer}.{x}" for x in names]
        rules = dense_rules(o, f"{path}/o", D, D, ("heads", "embed"), layers=L, torch_linear=lin)
        if len(proj) == 3:
            for name, hf in zip("qkv", proj):
                rules += dense_rules(hf, f"{path}/{name}", D, D, ("embed", "heads"), layers=L, torch_linear=lin)
            return rules
        fused = proj[-1]  # GPT-2: "c_attn" holds q,k,v (self) or k,v (cross, with q in "q_attn")
        parts = "qkv" if len(proj) == 1 else "kv"
        if len(proj) == 2:
            rules += dense_rules(proj[0], f"{path}/q", D, D, ("embed", "heads"), layers=L, torch_linear=lin)
        rules.append(rule(f"{fused}.weight", [f"{path}/{x}/kernel" for x in parts], (D, D), ("embed", "heads"),
                          layers=L, layout="linear" if lin else "identity"))
        rules.append(rule(f"{fused}.bias", [f"{path}/{x}/bias" for x in parts], (D,), ("heads",), layers=L,
                          init="zeros"))
        return rules

    out += attention(n.self_attn, "layers/self_attn")
    out += norm_rules(f"{n.layer}.{n.self_norm}", "layers/self_norm", D, layers=L)
    out += attention(n.cross_attn, "layers/cross_attn")
    out += norm_rules(f"{n.layer}.{n.cross_norm}", "layers/cross_norm", D, layers=L)
    out += dense_rules(f"{n.layer}.{n.mlp[0]}", "layers/mlp/wi", D, F, ("embed", "mlp"), layers=L, torch_linear=lin)
    out += dense_rules(f"{n.layer}.{n.mlp[1]}", "layers/mlp/wo", F, D, ("mlp", "embed"), layers=L, torch_linear=lin)
    out += norm_rules(f"{n.layer}.{n.mlp_norm}", "layers/mlp_norm", D, layers=L)
    if cfg.final_norm:
        out += norm_rules(n.final_norm, "final_norm", D)
    if cfg.head_transform:
        out += dense_rules(n.head_transform, "head/transform", D, D, ("embed", "embed_out"))
        out += norm_rules(n.head_transform_norm, "head/transform_norm", D)
    if cfg.tie_word_embeddings:
        out.append(rule(n.head_kernel, (), (), ()))  # a tied copy of the token table: known, not loaded
    else:
        out.append(rule(n.head_kernel, "head/kernel", (D, V), ("embed", "vocab"), layout="linear"))
    if cfg.head_bias:
        bias_names = (cfg.tie_word_embeddings and n.tied_head_bias) or n.head_bias
        out.append(rule(bias_names, "head/bias", (V,), ("vocab",), init="zeros"))
        if n.spare_head_bias and not cfg.tie_word_embeddings:
            out.append(rule(n.spare_head_bias, "head/spare_bias", (V,), ("vocab",), init="zeros"))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Compute


def positions(cfg: DecoderConfig, input_ids: jax.Array, start: int | jax.Array = 0) -> jax.Array:
    """Rows of the position table for input_ids [B, T] starting at step ``start``: [B, T]."""
    if cfg.padding_aware_positions:  # RoBERTa: count real tokens, padding sits on row pad_token_id
        real = (input_ids != cfg.pad_token_id).astype(jnp.int32)
        return (jnp.cumsum(real, axis=1) + start) * real + cfg.pad_token_id
    return sequential_positions(cfg, input_ids.shape, start)


def sequential_positions(cfg: DecoderConfig, shape: tuple[int, int], start: int | jax.Array = 0) -> jax.Array:
    """Rows of the position table [B, T] for steps start..start+T-1 whatever the tokens: every family's positions
    without padding-awareness, and those transformers gives ``inputs_embeds`` (which carry no padding to count;
    RoBERTa's ``create_position_ids_from_inputs_embeds``: from row pad_token_id + 1, its ``position_offset``)."""
    steps = start + jnp.arange(shape[1], dtype=jnp.int32)
    return jnp.broadcast_to(steps + cfg.position_offset, shape)


@functools.lru_cache(maxsize=8)
def sinusoidal_table(rows: int, dim: int, padding_idx: int | None) -> np.ndarray:
    """fairseq's (tensor2tensor's) fixed position table [rows, dim] float32, as transformers builds it for XGLM,
    TrOCR and Speech2Text: sin of all frequencies, then cos, a zero column when ``dim`` is odd, row ``padding_idx``
    zero. Computed in float32 in torch's order so the rows equal transformers' buffer."""
    half = dim // 2
    freq = np.exp(np.arange(half, dtype=np.float32) * np.float32(-math.log(10000) / (half - 1)))
    angles = np.arange(rows, dtype=np.float32)[:, None] * freq[None, :]
    table = np.concatenate([np.sin(angles), np.cos(angles)] + ([np.zeros((rows, 1), np.float32)] if dim % 2 else []),
                           axis=1)
    if padding_idx is not None and padding_idx < rows:
        table[padding_idx] = 0.0
    return table


def embed(cfg: DecoderConfig, p: Params, input_ids: jax.Array | None, pos: jax.Array, dtype: jnp.dtype,
          rng: jax.Array | None = None, inputs_embeds: jax.Array | None = None) -> jax.Array:
    """Token ids [B, T] (or ``inputs_embeds`` [B, T, D] in their place, as ``cfg.given_embeds`` says transformers
    takes them) and position rows [B, T] -> [B, T, D]; with ``rng``, the embedding dropout after the norm."""
    table = p.get("positions")
    if cfg.sinusoidal_positions:
        # padding-aware positions (TrOCR's sinusoidal ones) reach row pad_token_id + max tokens, past max_positions
        rows = cfg.max_positions + (cfg.pad_token_id + 1 - cfg.position_offset if cfg.padding_aware_positions else 0)
        table = jnp.asarray(sinusoidal_table(rows, cfg.hidden_size, cfg.pad_token_id))
    if inputs_embeds is None:
        h = embedding_lookup(p["tokens"], input_ids) * cfg.embed_scale
    else:  # in the table's float32, as transformers adds them to its float32 positions
        h = inputs_embeds.astype(jnp.float32) * (cfg.embed_scale if cfg.given_embeds == "scaled" else 1.0)
    pos_h = embedding_lookup(table, pos)
    if cfg.embed_norm_before_positions:  # Blenderbot-small: the norm sees the token embeddings only
        h = layer_norm(p["norm"], h.astype(dtype), cfg.layer_norm_eps) + pos_h.astype(dtype)
    else:
        h = h + pos_h
        if "token_type" in p:
            h = h + p["token_type"][0]
        h = h.astype(dtype)
        if cfg.embed_norm:
            h = layer_norm(p["norm"], h, cfg.layer_norm_eps)
    return dropout(h, cfg.hidden_dropout if cfg.embed_dropout is None else cfg.embed_dropout, rng)


def layer_scales(cfg: DecoderConfig) -> jax.Array:
    """Attention score scale of each layer [L] (GPT-2 may divide by the layer number)."""
    base = cfg.head_dim ** -0.5 if cfg.attn_scale else 1.0
    idx = jnp.arange(cfg.num_layers, dtype=jnp.float32)
    return base / (idx + 1.0) if cfg.attn_scale_by_layer else jnp.full((cfg.num_layers,), base, jnp.float32)


def head_transform(cfg: DecoderConfig, p: Params, h: jax.Array, dtype: jnp.dtype, linear=dense) -> jax.Array:
    """BERT's prediction-head transform (dense, activation, norm) of h [B, T, D], where the config has one; h
    itself otherwise. ``linear``: how a dense layer is computed (``layers.core.dense``, or a decode plan's)."""
    if not cfg.head_transform:
        return h
    h = activation(cfg.head_act)(linear(p["head"]["transform"], h, dtype))
    return layer_norm(p["head"]["transform_norm"], h, cfg.layer_norm_eps)


def lm_head(cfg: DecoderConfig, p: Params, h: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Hidden states [B, T, D] -> float32 logits [B, T, V]: the token table (tied) or ``head/kernel``, + bias."""
    h = head_transform(cfg, p, h, dtype).astype(dtype)
    if cfg.tie_word_embeddings:
        logits = jnp.einsum("btd,vd->btv", h, p["embed"]["tokens"].astype(dtype), preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("btd,dv->btv", h, p["head"]["kernel"].astype(dtype), preferred_element_type=jnp.float32)
    if cfg.head_bias:
        logits = logits + p["head"]["bias"]
    return logits


def check_ids(cfg: DecoderConfig, input_ids: jax.Array, name: str = "decoder_input_ids") -> None:
    if input_ids.ndim != 2:
        raise InputError(f"{name}: expected rank 2 [batch, tokens], got shape {tuple(input_ids.shape)}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise InputError(f"{name}: expected integer token ids, got dtype {input_ids.dtype}")
    if input_ids.shape[1] > cfg.max_positions - cfg.position_offset:
        raise InputError(f"{name}: {input_ids.shape[1]} tokens exceed the decoder's "
                         f"{cfg.max_positions - cfg.position_offset} positions")


# transformers: "You cannot specify both decoder_input_ids and decoder_inputs_embeds at the same time"
BOTH_IDS_AND_EMBEDS = "decoder_inputs_embeds: give decoder_input_ids or decoder_inputs_embeds, not both"


def check_embeds(cfg: DecoderConfig, inputs_embeds: jax.Array, name: str = "decoder_inputs_embeds") -> None:
    """One line for embeddings the decoder cannot take in place of ids: not [B, T, hidden_size] floats, too long,
    or a decoder whose positions transformers reads from the ids alone (``cfg.given_embeds``)."""
    if cfg.given_embeds == "unsupported":
        raise InputError(f"{name}: the {cfg.model_type} decoder places its positions by the token ids (transformers "
                         "fails without them too); give decoder_input_ids")
    if inputs_embeds.ndim != 3 or inputs_embeds.shape[2] != cfg.hidden_size:
        raise InputError(f"{name}: expected [batch, tokens, {cfg.hidden_size}] (the decoder's hidden size), got shape "
                         f"{tuple(inputs_embeds.shape)}")
    if not jnp.issubdtype(inputs_embeds.dtype, jnp.floating):
        raise InputError(f"{name}: expected float values, got dtype {inputs_embeds.dtype}")
    if inputs_embeds.shape[1] > cfg.max_positions - cfg.position_offset:
        raise InputError(f"{name}: {inputs_embeds.shape[1]} tokens exceed the decoder's "
                         f"{cfg.max_positions - cfg.position_offset} positions")


class CrossKV(NamedTuple):
    """Cross-attention keys and values of every layer, computed once per utterance (``cross_kv``): k, v
    [L, B, N, S, H] (a decode plan may hold them in its own layout)."""

    k: Any
    v: Any


class KVCache(NamedTuple):
    """Static self-attention cache, written at the current step: keys transposed, k [L, B, N, H, Tmax], and
    v [L, B, N, Tmax, H] (``attention(layout="bnhs")``). Grouped (``init_cache(groups=G)``): Tmax * G positions.
    (A decode plan may hold it in its own layout.)"""

    k: Any
    v: Any


class CrossFrames(NamedTuple):
    """In place of `CrossKV` for the teacher-forced pass under a remat policy: the encoder frames [B, S, D], from
    which each layer computes its own keys and values inside the layer scan. Rematerialised, they are then
    recomputed in the backward pass rather than kept for every layer ([L, B, N, S, H] twice, and their gradients)."""

    frames: jax.Array


def layer_cross_kv(cfg: DecoderConfig, cp: Params, enc: jax.Array, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """One layer's cross-attention params and encoder frames [B, S, D] -> its keys and values [B, N, S, H]."""
    enc = enc.astype(dtype)
    return heads(cp["k"], enc, cfg.num_heads, dtype), heads(cp["v"], enc, cfg.num_heads, dtype)


def cross_kv(cfg: DecoderConfig, p: Params, enc: jax.Array, dtype: jnp.dtype) -> CrossKV:
    """Encoder frames [B, S, D] -> cross-attention keys and values of every layer [L, B, N, S, H]."""
    return CrossKV(*jax.lax.map(lambda cp: layer_cross_kv(cfg, cp, enc, dtype), p["layers"]["cross_attn"]))


def init_cache(cfg: DecoderConfig, batch: int, max_len: int, dtype: jnp.dtype, groups: int = 1) -> KVCache:
    """Zeroed self-attention cache (see ``KVCache``): k [L, B, N, H, Tmax] and v [L, B, N, Tmax, H]. With ``groups``
    G > 1 (beam search, ``decode(cache_rows=)``) ``batch`` counts utterances and each holds its G rows interleaved:
    position t of group slot g at index t * G + g of a Tmax * G axis, so one step's keys of all G rows are one
    contiguous write per row of the transposed keys."""
    B, N, H, S = batch, cfg.num_heads, cfg.head_dim, groups * max_len
    return KVCache(jnp.zeros((cfg.num_layers, B, N, H, S), dtype), jnp.zeros((cfg.num_layers, B, N, S, H), dtype))


def write_cache(k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array, start: int | jax.Array,
                groups: int) -> tuple[jax.Array, jax.Array]:
    """New keys and values [B*G, T, N, H] into one layer's caches k [B, N, H, Tmax*G] and v [B, N, Tmax*G, H] at
    ``start`` (row b*G+g's position t at index t*G+g): one update per tensor, on the cache's own shape (an update
    through a reshaped view makes XLA copy the whole cache every step instead of writing in place)."""
    R, T, N, H = k.shape
    B, G = R // groups, groups
    k = jnp.transpose(k.reshape(B, G, T, N, H), (0, 3, 4, 2, 1)).reshape(B, N, H, T * G)
    v = jnp.transpose(v.reshape(B, G, T, N, H), (0, 3, 2, 1, 4)).reshape(B, N, T * G, H)
    return (jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, 0, 0, start * G)),
            jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, 0, start * G, 0)))


def grouped_self_mask(cache_rows: jax.Array, groups: int, start: int | jax.Array, T: int) -> jax.Array:
    """Self-attention mask [B, G, 1, T, Tmax*G] for a grouped cache (see ``decode``; key index t*G+g): a query row
    sees, at each earlier position, the key of the row its ``cache_rows`` entry names, and its own keys from
    ``start`` on."""
    R, Tmax = cache_rows.shape
    B, G = R // groups, groups
    t = jnp.arange(Tmax)
    query_pos = start + jnp.arange(T)
    own = jnp.arange(G)[:, None]  # [G, 1]
    rows = jnp.where(t[None, None, :] >= start, own[None], cache_rows.reshape(B, G, Tmax))  # [B, G, Tmax]
    holder = rows[:, :, None, None, :] == jnp.arange(G)[None, None, None, :, None]  # [B, G, 1, G', Tmax]
    causal = (t[None, :] <= query_pos[:, None])[None, None, :, None, :]  # [1, 1, T, 1, Tmax]
    return jnp.swapaxes(holder & causal, 3, 4).reshape(B, G, 1, T, Tmax * G)


class LayerOps(NamedTuple):
    """How a decoder layer computes its attention and dense layers. The model's own (``MODEL_OPS``) serve training,
    teacher forcing and the cached decode step under ``lax.scan``; a decode plan under ``speechseq.decoding`` may
    supply others for its own weight layout, with the same signatures:

    - ``self_attention(cfg, sp, x, kv_cache, mask, scale, start, groups, dtype, rng) -> (out [B', T, D], cache)``:
      x [B', T, D]; ``kv_cache`` (k, v) of this layer or None (teacher forcing; then the returned cache is None);
      mask broadcastable to [B, N, T, S], or [B, G, 1, T, S] with ``groups`` G > 1.
    - ``cross_attention(cfg, cp, x, k, v, mask, scale, dtype, rng) -> out [B', T, D]``: this layer's cross K/V as
      the ``cross`` argument of ``decode`` holds them, for B utterances, each shared by B' / B consecutive rows of
      x (beams, samples); mask [B, 1, 1, S] or None.
    - ``dense(p, x, dtype) -> y``: the feed-forward's dense layers.

    The model's own also take ``return_probs=True`` (``decoder_layer(capture=True)``, transformers'
    ``output_attentions``): then they also return the attention probabilities [B', N, T, S], last.
    """

    self_attention: Callable
    cross_attention: Callable
    dense: Callable


def _self_attention(cfg: DecoderConfig, sp: Params, x: jax.Array, kv_cache: tuple | None, mask: jax.Array,
                    scale: jax.Array, start: int | jax.Array, groups: int, dtype: jnp.dtype,
                    rng: jax.Array | None, return_probs: bool = False) -> tuple:
    N = cfg.num_heads
    q, k, v = (heads(sp[n], x, N, dtype) for n in "qkv")  # [B', N, T, H]
    layout, new_cache = "bnsh", None
    if kv_cache is not None:  # keys [B, N, H, Tmax * G], values [B, N, Tmax * G, H]
        k, v = write_cache(*kv_cache, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), start, groups)
        layout, new_cache = "bnhs", (k, v)
    out = attention(q, k, v, mask, scale, layout, groups, cfg.attention_dropout, rng, return_probs=return_probs)
    if return_probs:
        return merge_heads(sp["o"], out[0], dtype), new_cache, out[1]
    return merge_heads(sp["o"], out, dtype), new_cache


def _cross_attention(cfg: DecoderConfig, cp: Params, x: jax.Array, k: jax.Array, v: jax.Array,
                     mask: jax.Array | None, scale: jax.Array, dtype: jnp.dtype, rng: jax.Array | None,
                     return_probs: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    out = attention(heads(cp["q"], x, cfg.num_heads, dtype), k, v, mask, scale, "bnsh", x.shape[0] // k.shape[0],
                    cfg.attention_dropout, rng, return_probs=return_probs)
    if return_probs:
        return merge_heads(cp["o"], out[0], dtype), out[1]
    return merge_heads(cp["o"], out, dtype)


MODEL_OPS = LayerOps(_self_attention, _cross_attention, dense)

# Fixed ids of the random sites (``fold``): the same key gives the same masks at the same place.
_EMBED, _LAYERS = 0, 1  # decoder-wide
_SELF_PROBS, _SELF_OUT, _CROSS_PROBS, _CROSS_OUT, _ACT, _MLP_OUT, _LAYERDROP = range(7)  # per layer


def decoder_layer(cfg: DecoderConfig, lp: Params, h: jax.Array, scale: jax.Array, ck: Any, cv: Any,
                  kv_cache: tuple | None, index: int | jax.Array, self_mask: jax.Array,
                  cross_mask: jax.Array | None, start: int | jax.Array = 0, groups: int = 1,
                  dtype: jnp.dtype = jnp.float32, rng: jax.Array | None = None,
                  ops: LayerOps = MODEL_OPS, capture: bool = False) -> tuple:
    """One decoder layer: h [B', T, D] -> (h, this layer's updated cache or None). Self-attention, cross-attention
    and the MLP, each a residual block (pre- or post-norm) with transformers' dropouts; LayerDrop over the whole
    layer. ``rng``: the decoder's key (the layer folds in its ``index``); ``ops``: see ``LayerOps``. ``capture``
    (the model's ops, no LayerDrop): a third element, the (self, cross) attention probabilities."""
    eps, pre = cfg.layer_norm_eps, cfg.pre_norm
    lr = fold(rng, _LAYERS, index)
    new_cache = None
    probs = {}
    extra = {"return_probs": True} if capture else {}  # only the model's own ops take it (``LayerOps``)

    def self_attn(x: jax.Array) -> jax.Array:
        nonlocal new_cache
        out, new_cache, *p = ops.self_attention(cfg, lp["self_attn"], x, kv_cache, self_mask, scale, start, groups,
                                                dtype, fold(lr, _SELF_PROBS), **extra)
        probs["self"] = p
        return dropout(out, cfg.hidden_dropout, fold(lr, _SELF_OUT))

    def cross_attn(x: jax.Array) -> jax.Array:
        out = ops.cross_attention(cfg, lp["cross_attn"], x, ck, cv, cross_mask, scale, dtype, fold(lr, _CROSS_PROBS),
                                  **extra)
        if capture:
            out, probs["cross"] = out
        return dropout(out, cfg.hidden_dropout, fold(lr, _CROSS_OUT))

    def feed_forward(x: jax.Array) -> jax.Array:
        act = dropout(activation(cfg.hidden_act)(ops.dense(lp["mlp"]["wi"], x, dtype)), cfg.activation_dropout,
                      fold(lr, _ACT))
        return dropout(ops.dense(lp["mlp"]["wo"], act, dtype), cfg.hidden_dropout, fold(lr, _MLP_OUT))

    def run(h: jax.Array) -> jax.Array:
        h = block(h, lp["self_norm"], self_attn, pre, eps)
        h = block(h, lp["cross_norm"], cross_attn, pre, eps)
        return block(h, lp["mlp_norm"], feed_forward, pre, eps)

    if capture:  # no LayerDrop then (``decode`` checks): ``run`` runs here, not under a cond, and sets ``probs``
        h = run(h)
        return h, new_cache, (probs["self"][0], probs["cross"])
    # with a cache there is no rng (``decode``), so LayerDrop is off and ``run`` sets ``new_cache``
    return layer_drop(run, h, cfg.layerdrop, fold(lr, _LAYERDROP)), new_cache


def step_inputs(cfg: DecoderConfig, p: Params, input_ids: jax.Array | None, enc_mask: jax.Array | None,
                attention_mask: jax.Array | None, key_len: int | None, start: int | jax.Array, dtype: jnp.dtype,
                cache_rows: jax.Array | None = None, cache_utterances: int | None = None,
                rng: jax.Array | None = None, inputs_embeds: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array, jax.Array | None, int]:
    """What every layer of ``decode`` reads besides its own params: (embedded ids [B', T, D], self-attention mask,
    cross-attention mask [B, 1, 1, S] or None, groups). ``key_len``: the cache's positions (None: teacher forcing,
    T keys); ``cache_rows`` and ``cache_utterances`` (a grouped cache's B): see ``decode``; ``inputs_embeds``
    [B', T, D]: in place of ``input_ids`` (see ``decode``)."""
    if input_ids is not None and inputs_embeds is not None:
        raise InputError(BOTH_IDS_AND_EMBEDS)
    if input_ids is None and inputs_embeds is None:
        raise InputError("decoder_input_ids: required (or decoder_inputs_embeds in their place)")
    if inputs_embeds is None:
        check_ids(cfg, input_ids)
        pos = positions(cfg, input_ids, start)
    else:
        check_embeds(cfg, inputs_embeds)
        pos = sequential_positions(cfg, inputs_embeds.shape[:2], start)
    rows_in, T = pos.shape
    h = embed(cfg, p["embed"], input_ids, pos, dtype, fold(rng, _EMBED), inputs_embeds)
    query_pos = start + jnp.arange(T)
    key_len = T if key_len is None else key_len
    groups = 1
    if cache_rows is not None:
        if cache_utterances is None or attention_mask is not None:
            raise InputError("cache_rows: needs a grouped cache and no decoder attention_mask")
        groups = key_len // cache_rows.shape[1]
        rows = cache_utterances * groups
        if key_len % cache_rows.shape[1] or rows != rows_in or cache_rows.shape[0] != rows:
            raise InputError(f"cache_rows: shape {tuple(cache_rows.shape)} does not fit a grouped cache of "
                             f"{key_len} positions for {rows_in} rows (expected [rows, positions / groups])")
        self_mask = grouped_self_mask(cache_rows, groups, start, T)
    else:
        self_mask = (jnp.arange(key_len)[None, :] <= query_pos[:, None])[None, None]
    if attention_mask is not None:
        self_mask = self_mask & (attention_mask[:, None, None, :] != 0)
    cross_mask = None if enc_mask is None else enc_mask[:, None, None, :]
    return h, self_mask, cross_mask, groups


def decode(cfg: DecoderConfig, p: Params, input_ids: jax.Array | None, cross: CrossKV | CrossFrames,
           enc_mask: jax.Array | None,
           attention_mask: jax.Array | None = None, cache: KVCache | None = None, start: int | jax.Array = 0,
           dtype: jnp.dtype = jnp.float32, cache_rows: jax.Array | None = None,
           rng: jax.Array | None = None, remat: str = "none", inputs_embeds: jax.Array | None = None,
           capture: bool = False) -> tuple:
    """Decoder over ids [B', T] at steps start..start+T-1 -> (float32 logits [B', T, V], updated cache).

    ``cross`` holds K/V for B utterances (B' = B * beams), as ``cross_kv`` gives them (or, teacher-forced,
    `CrossFrames`: each layer computes its own). Without ``cache`` this is the teacher-forced pass over the whole
    sequence; with it (``init_cache``), keys/values are written at ``start`` and attention reads the cache up to
    there. The layers run under one ``lax.scan`` over the stacked params.

    ``cache_rows`` [B', Tmax] int (beam search): the cache is grouped, ``init_cache(groups=G)``, Tmax * G positions
    with B' = B * G rows, and row r = (b, g) writes its keys to group slot g. Entry [r, t] says which slot of its
    utterance holds the key row r sees at position t < ``start`` (its beam's history), so beams that are reordered
    need only this small table reordered, never the cache.

    ``rng`` (a ``jax.random`` key; teacher-forced pass only) turns on transformers' training-mode regularisation:
    dropout after the embeddings (``embed_dropout``), after each attention output and MLP output
    (``hidden_dropout``), on attention probabilities (``attention_dropout``), after the MLP activation
    (``activation_dropout``), and LayerDrop (``layerdrop``). None: eval mode. ``remat``: the layers'
    rematerialisation policy for the backward pass (``layers.core.remat``).

    ``inputs_embeds`` [B', T, D] (teacher-forced pass only; ``input_ids`` None): embeddings in place of the token
    lookup, as transformers' ``inputs_embeds``: positions counted from ``start`` whatever the padding (RoBERTa's
    too), then token type, norm and dropout as for ids; scaled by ``embed_scale`` only where transformers scales
    them (``cfg.given_embeds``).

    ``capture`` (teacher-forced pass only): a third element, ``layers.core.Captured`` as transformers' decoders give
    it for ``output_hidden_states`` / ``output_attentions``: the embeddings (the first layer's input), each layer's
    output, the last one after the final norm where the family has one; each layer's self-attention [B', N, T, T]
    and cross-attention [B', N, T, S] probabilities.
    """
    if capture and cache is not None:
        raise InputError("output_attentions / output_hidden_states: the teacher-forced pass only, not cached steps")
    if capture:
        check_capture(cfg.layerdrop, rng, "decoder")
    if rng is not None and cache is not None:
        raise InputError("rng: dropout applies to the teacher-forced pass only, not to cached decode steps")
    if inputs_embeds is not None and cache is not None:
        raise InputError("decoder_inputs_embeds: the teacher-forced pass only; cached decode steps read token ids")
    frames = cross.frames if isinstance(cross, CrossFrames) else None
    if frames is not None and cache is not None:
        raise InputError("CrossFrames: the teacher-forced pass only; cached decode steps read CrossKV")
    key_len = None if cache is None else cache.k.shape[-1]
    h, self_mask, cross_mask, groups = step_inputs(cfg, p, input_ids, enc_mask, attention_mask, key_len, start,
                                                    dtype, cache_rows, None if cache is None else cache.k.shape[1],
                                                    rng, inputs_embeds)

    def layer(h: jax.Array, xs: tuple) -> tuple[jax.Array, tuple | None]:
        lp, scale, ck, cv, kv_cache, i = xs
        if frames is not None:
            ck, cv = layer_cross_kv(cfg, lp["cross_attn"], frames, dtype)
        out = decoder_layer(cfg, lp, h, scale, ck, cv, kv_cache, i, self_mask, cross_mask, start, groups, dtype,
                            rng, capture=capture)
        if capture:  # each layer's output and probabilities as scan outputs (no cache here)
            return out[0], (out[0], *out[2])
        return out

    ck, cv = (None, None) if frames is not None else cross
    xs = (p["layers"], layer_scales(cfg), ck, cv, None if cache is None else tuple(cache),
          jnp.arange(cfg.num_layers))
    first = h
    h, per_layer = jax.lax.scan(remat_fn(layer, remat), h, xs)
    if cfg.final_norm:
        h = layer_norm(p["final_norm"], h, cfg.layer_norm_eps)
    if capture:  # transformers' decoders put last_hidden_state (after the final norm) last
        return lm_head(cfg, p, h, dtype), None, captured(first, per_layer, last=h)
    return lm_head(cfg, p, h, dtype), None if cache is None else KVCache(*per_layer)
