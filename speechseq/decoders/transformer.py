"""The one text decoder every family maps onto: embeddings, L layers of (self-attn, cross-attn, MLP), LM head.

Families differ only in flags (``DecoderConfig``) and in the HF names of the same tensors (``DecoderNames``).
Parameter tree::

    embed/tokens [V, D], embed/positions [P, D], embed/token_type [Tt, D]?, embed/norm?
    layers/{self_attn,cross_attn}/{q,k,v,o}/{kernel,bias}, layers/{self,cross,mlp}_norm, layers/mlp/{wi,wo}  (stacked L)
    final_norm?, head/transform?, head/transform_norm?, head/kernel [D, V] (untied only), head/bias [V]?
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp

from speechseq import kernels
from speechseq.config import DecoderConfig
from speechseq.errors import InputError
from speechseq.layers.core import (activation, attention, block, dense, dropout, embedding_lookup, fold, layer_drop,
                                   layer_norm, mlp, out_major, out_major_dot, remat as remat_fn,
                                   split_heads)
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


def weight_rules(cfg: DecoderConfig, n: DecoderNames) -> list[Rule]:
    D, L, F, V = cfg.hidden_size, cfg.num_layers, cfg.intermediate_size, cfg.vocab_size
    lin = n.torch_linear
    out = [
        rule((n.tokens, *n.extra_token_names), "embed/tokens", (V, D), ("vocab", "embed")),
        rule(n.positions, "embed/positions", (cfg.max_positions, D), (None, "embed")),
    ]
    if n.token_type:
        out.append(rule(n.token_type, "embed/token_type", (cfg.type_vocab_size, D), (None, "embed")))
    if n.embed_norm:
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
    steps = start + jnp.arange(input_ids.shape[1], dtype=jnp.int32)
    return jnp.broadcast_to(steps + cfg.position_offset, input_ids.shape)


def embed(cfg: DecoderConfig, p: Params, input_ids: jax.Array, pos: jax.Array, dtype: jnp.dtype,
          rng: jax.Array | None = None) -> jax.Array:
    """Token ids [B, T] and position rows [B, T] -> [B, T, D]; with ``rng``, the embedding dropout after the norm."""
    h = embedding_lookup(p["tokens"], input_ids) * cfg.embed_scale + embedding_lookup(p["positions"], pos)
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


def lm_head(cfg: DecoderConfig, p: Params, h: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Hidden states [B, T, D] -> float32 logits [B, T, V]. Takes params as stored or in decode-step layout."""
    head = p["head"] if "head" in p else {}
    if cfg.head_transform:
        h = activation(cfg.head_act)(dense(head["transform"], h, dtype))
        h = layer_norm(head["transform_norm"], h, cfg.layer_norm_eps)
    if "kernel_p" in head:  # decode-step layout for the CPU kernel (``prepare_head``): [ceil(V / 16), D, 16]
        logits = kernels.panel_dot(h.astype(jnp.float32), head["kernel_p"], cfg.vocab_size)
    elif "kernel_t" in head:  # decode-step layout (``prepare_head``): [V, D]
        logits = out_major_dot(h.astype(dtype), head["kernel_t"].astype(dtype)).astype(jnp.float32)
    elif cfg.tie_word_embeddings:
        logits = jnp.einsum("btd,vd->btv", h.astype(dtype), p["embed"]["tokens"].astype(dtype),
                            preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("btd,dv->btv", h.astype(dtype), head["kernel"].astype(dtype),
                            preferred_element_type=jnp.float32)
    if cfg.head_bias:
        logits = logits + head["bias"]
    return logits


def check_ids(cfg: DecoderConfig, input_ids: jax.Array, name: str = "decoder_input_ids") -> None:
    if input_ids.ndim != 2:
        raise InputError(f"{name}: expected rank 2 [batch, tokens], got shape {tuple(input_ids.shape)}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise InputError(f"{name}: expected integer token ids, got dtype {input_ids.dtype}")
    if input_ids.shape[1] > cfg.max_positions - cfg.position_offset:
        raise InputError(f"{name}: {input_ids.shape[1]} tokens exceed the decoder's "
                         f"{cfg.max_positions - cfg.position_offset} positions")


class CrossKV(NamedTuple):
    """Cross-attention keys and values of every layer, computed once per utterance: k, v [L, B, S, N, H]
    (as ``cross_kv`` returns them), or per-layer tuples of k [B, N, H, S] and v [B, N, S, H] (``decode_cross_kv``,
    for decode steps)."""

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]


class KVCache(NamedTuple):
    """Static self-attention cache, written at the current step: keys transposed, k [L, B, N, H, Tmax], and
    v [L, B, N, Tmax, H] (``attention(layout="bnhs")``), or per-layer tuples of k [B, N, H, Tmax] and v [B, N, Tmax, H]
    for params in decode-step layout (``prepare_layer``). Grouped (``init_cache(groups=G)``): Tmax * G positions."""

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]


def cross_kv(cfg: DecoderConfig, p: Params, enc: jax.Array, dtype: jnp.dtype) -> CrossKV:
    """Encoder frames [B, S, D] -> cross-attention keys and values of every layer [L, B, S, N, H]."""
    enc = enc.astype(dtype)

    def one(lp: Params) -> tuple[jax.Array, jax.Array]:
        return (split_heads(dense(lp["k"], enc, dtype), cfg.num_heads),
                split_heads(dense(lp["v"], enc, dtype), cfg.num_heads))

    return CrossKV(*jax.lax.map(one, p["layers"]["cross_attn"]))


def prepare_layer(lp: Params, dtype: jnp.dtype, rows: int | None = None) -> dict:
    """One layer's params (unstacked) laid out for fast one-token decode steps of ``rows`` rows (see ``out_major``).

    Kernels of the step's projections are stored [Dout, Din] in the compute dtype (see ``out_major_dot``) and
    self-attention q/k/v become one fused projection. Cross-attention k/v kernels, which run once per utterance over
    all its frames (``decode_cross_kv``), keep their [Din, Dout] layout, cast to the compute dtype. The decoder's
    layers go into a list of these (``decoding.generate.prepare_decoder``): inside a ``while_loop`` XLA CPU would
    copy each layer's slice out of stacked arrays on every step. ``decode`` with such params takes
    ``decode_cross_kv(...)`` and a cache from ``init_cache(..., per_layer=True)``.
    """
    sa, ca = lp["self_attn"], lp["cross_attn"]
    qkv = {"kernel": jnp.concatenate([sa[n]["kernel"] for n in "qkv"], axis=1)}
    if "bias" in sa["q"]:
        qkv["bias"] = jnp.concatenate([sa[n]["bias"] for n in "qkv"])
    cast = {n: {**ca[n], "kernel": ca[n]["kernel"].astype(dtype)} for n in "kv"}
    return {**lp, "self_attn": {"qkv": out_major(qkv, dtype, rows), "o": out_major(sa["o"], dtype, rows)},
            "cross_attn": {"q": out_major(ca["q"], dtype, rows), "o": out_major(ca["o"], dtype, rows), **cast},
            "mlp": {n: out_major(lp["mlp"][n], dtype, rows) for n in ("wi", "wo")}}


def prepare_head(p: Params, dtype: jnp.dtype, rows: int | None = None) -> dict:
    """Everything but the layers in decode-step layout (the output projection as ``head/kernel_t`` [V, D], tied or
    not, in the compute dtype, or packed for the CPU kernel as ``head/kernel_p``); see ``prepare_layer``."""
    out = {k: v for k, v in p.items() if k != "layers"}
    head = dict(p.get("head", {}))
    tied = "kernel" not in head
    w_t = (p["embed"]["tokens"] if tied else head.pop("kernel").T).astype(dtype)
    head.update({"kernel_p": kernels.pack(w_t)} if kernels.use_for(w_t, rows) else {"kernel_t": w_t})
    if "transform" in head:
        head["transform"] = out_major(head["transform"], dtype, rows)
    out["head"] = head
    return out


def decode_cross_kv(cfg: DecoderConfig, layers: list[Params], enc: jax.Array, dtype: jnp.dtype) -> CrossKV:
    """Encoder frames [B, S, D] -> per-layer tuples of cross-attention k [B, N, H, S] and v [B, N, S, H], the layout
    the decode step reads (``attention(layout="bnhs")``), from the layers in decode-step layout (``prepare_layer``).

    Layer by layer over separate weight arrays, so that every layer's projections and transposes are the same
    computation and XLA compiles their kernels once; taken out of ``cross_kv``'s stacked result, each layer's
    transposes would read at another constant offset and be compiled again (24 kernels for 12 layers)."""
    enc = enc.astype(dtype)
    ks, vs = [], []
    for lp in layers:
        ca = lp["cross_attn"]
        ks.append(jnp.transpose(split_heads(dense(ca["k"], enc, dtype), cfg.num_heads), (0, 2, 3, 1)))
        vs.append(jnp.swapaxes(split_heads(dense(ca["v"], enc, dtype), cfg.num_heads), 1, 2))
    # the barrier keeps XLA from folding the transposes into the step's dots
    return jax.lax.optimization_barrier(CrossKV(tuple(ks), tuple(vs)))


def init_cache(cfg: DecoderConfig, batch: int, max_len: int, dtype: jnp.dtype, per_layer: bool = False,
               groups: int = 1) -> KVCache:
    """Zeroed self-attention cache (see ``KVCache``): k [L, B, N, H, Tmax] and v [L, B, N, Tmax, H], or
    (``per_layer``, for params in decode-step layout) tuples of L [B, N, H, Tmax] and [B, N, Tmax, H] arrays. With
    ``groups`` G > 1 (beam search, ``decode(cache_rows=)``) ``batch`` counts utterances and each holds its G rows
    interleaved: position t of group slot g at index t * G + g of a Tmax * G axis, so one step's keys of all G rows
    are one contiguous write per row of the transposed keys."""
    B, N, H, S = batch, cfg.num_heads, cfg.head_dim, groups * max_len
    shapes = ((B, N, H, S), (B, N, S, H))
    if per_layer:
        return KVCache(*(tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)) for shape in shapes))
    return KVCache(*(jnp.zeros((cfg.num_layers, *shape), dtype) for shape in shapes))


def _attend_grouped(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: jax.Array,
                    layout: str, dropout_rate: float = 0.0, rng: jax.Array | None = None) -> jax.Array:
    """Cross-attention where q has G rows per key row (beams or samples share one utterance's K/V).

    q [B*G, T, N, H], k and v [B, S, N, H] (``layout="bsnh"``) or as ``decode_cross_kv`` gives them (``"bnhs"``),
    mask [B, 1, 1, S] -> [B*G, T, N, H]; no copy of K/V per beam. ``dropout_rate``, ``rng``: see ``attention``.
    """
    B, G = k.shape[0], q.shape[0] // k.shape[0]
    T = q.shape[1]
    out = attention(q.reshape(B, G * T, *q.shape[2:]), k, v, mask, scale, layout, transpose_q=layout != "bsnh",
                    dropout_rate=dropout_rate, rng=rng)
    return out.reshape(B * G, T, *out.shape[2:])


def _write(k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array, start: int | jax.Array,
           groups: int) -> tuple[jax.Array, jax.Array]:
    """New keys and values [B*G, T, N, H] into the caches k [B, N, H, Tmax*G] and v [B, N, Tmax*G, H] at ``start``
    (row b*G+g's position t at index t*G+g): one update per tensor, on the cache's own shape (an update through a
    reshaped view makes XLA copy the whole cache every step instead of writing in place)."""
    R, T, N, H = k.shape
    B, G = R // groups, groups
    k = jnp.transpose(k.reshape(B, G, T, N, H), (0, 3, 4, 2, 1)).reshape(B, N, H, T * G)
    v = jnp.transpose(v.reshape(B, G, T, N, H), (0, 3, 2, 1, 4)).reshape(B, N, T * G, H)
    return (jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, 0, 0, start * G)),
            jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, 0, start * G, 0)))


def _grouped_self_mask(cache_rows: jax.Array, groups: int, start: int | jax.Array, T: int) -> jax.Array:
    """Self-attention mask [B, 1, G*T, Tmax*G] for a grouped cache (see ``decode``; key index t*G+g): a query row
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
    return jnp.swapaxes(holder & causal, 3, 4).reshape(B, 1, G * T, Tmax * G)


# Fixed ids of the random sites (``fold``): the same key gives the same masks at the same place.
_EMBED, _LAYERS = 0, 1  # decoder-wide
_SELF_PROBS, _SELF_OUT, _CROSS_PROBS, _CROSS_OUT, _ACT, _MLP_OUT, _LAYERDROP = range(7)  # per layer


def decode(cfg: DecoderConfig, p: Params, input_ids: jax.Array, cross: CrossKV, enc_mask: jax.Array | None,
           attention_mask: jax.Array | None = None, cache: KVCache | None = None, start: int | jax.Array = 0,
           dtype: jnp.dtype = jnp.float32, cache_rows: jax.Array | None = None,
           rng: jax.Array | None = None, remat: str = "none") -> tuple[jax.Array, KVCache | None]:
    """Decoder over ids [B', T] at steps start..start+T-1 -> (float32 logits [B', T, V], updated cache).

    ``cross`` holds K/V for B utterances (B' = B * beams). Without ``cache`` this is the teacher-forced pass over
    the whole sequence; with it, keys/values are written at ``start`` and attention reads the cache up to there.

    ``cache_rows`` [B', Tmax] int (beam search): the cache is grouped, ``init_cache(groups=G)``, Tmax * G positions
    with B' = B * G rows, and row r = (b, g) writes its keys to group slot g. Entry [r, t] says which slot of its
    utterance holds the key row r sees at position t < ``start`` (its beam's history), so beams that are reordered
    need only this small table reordered, never the cache.

    ``rng`` (a ``jax.random`` key; teacher-forced pass only) turns on transformers' training-mode regularisation:
    dropout after the embeddings (``embed_dropout``), after each attention output and MLP output
    (``hidden_dropout``), on attention probabilities (``attention_dropout``), after the MLP activation
    (``activation_dropout``), and LayerDrop (``layerdrop``). None: eval mode. ``remat``: the layers'
    rematerialisation policy for the backward pass (``layers.core.remat``).
    """
    check_ids(cfg, input_ids)
    prepared = isinstance(p["layers"], list)  # decode-step layout: per-layer params, head-major cross K/V
    if rng is not None and (cache is not None or prepared):
        raise InputError("rng: dropout applies to the teacher-forced pass only, not to cached decode steps")
    T = input_ids.shape[1]
    h = embed(cfg, p["embed"], input_ids, positions(cfg, input_ids, start), dtype, fold(rng, _EMBED))
    query_pos = start + jnp.arange(T)
    key_len = T if cache is None else jax.tree.leaves(cache.k)[0].shape[-1]
    groups = 1 if cache_rows is None else key_len // cache_rows.shape[1]
    if cache_rows is not None:
        if cache is None or attention_mask is not None:
            raise InputError("cache_rows: needs a grouped cache and no decoder attention_mask")
        rows = jax.tree.leaves(cache.k)[0].shape[-4] * groups
        if key_len % cache_rows.shape[1] or rows != input_ids.shape[0] or cache_rows.shape[0] != rows:
            raise InputError(f"cache_rows: shape {tuple(cache_rows.shape)} does not fit a grouped cache of "
                             f"{key_len} positions for {input_ids.shape[0]} rows (expected [rows, positions / groups])")
        self_mask = _grouped_self_mask(cache_rows, groups, start, T)
    else:
        self_mask = (jnp.arange(key_len)[None, :] <= query_pos[:, None])[None, None]
    if attention_mask is not None:
        self_mask = self_mask & (attention_mask[:, None, None, :] != 0)
    cross_mask = None if enc_mask is None else enc_mask[:, None, None, :]
    eps, pre, N = cfg.layer_norm_eps, cfg.pre_norm, cfg.num_heads

    shared = (self_mask, cross_mask, start)  # what every layer reads besides its own params, cache and cross K/V

    def layer(h: jax.Array, xs: tuple, shared: tuple) -> tuple[jax.Array, tuple]:
        lp, scale, ck, cv, kv_cache, i = xs
        self_mask, cross_mask, start = shared
        lr = fold(rng, _LAYERS, i)  # None when rng is (never with a cache, so new_cache is set when there is one)
        new_cache = None

        def self_attn(x: jax.Array) -> jax.Array:
            nonlocal new_cache
            sp = lp["self_attn"]
            if "qkv" in sp:
                q, k, v = jnp.split(split_heads(dense(sp["qkv"], x, dtype), 3 * N), 3, axis=2)
            else:
                q, k, v = (split_heads(dense(sp[n], x, dtype), N) for n in "qkv")
            if kv_cache is not None:  # keys [B, N, H, Tmax * G], values [B, N, Tmax * G, H]
                k, v = _write(*kv_cache, k, v, start, groups)
                new_cache = (k, v)
            if groups > 1:  # the G rows of an utterance attend together over its grouped cache
                q = q.reshape(-1, groups * T, *q.shape[2:])
            # the CPU kernel (``kernels.attend``) only over a grouped cache: fed an ungrouped one (greedy, sampling),
            # XLA copied each layer's cache five times a step (+7 ms per step in the decode benchmark's profile)
            out = attention(q, k, v, self_mask, scale, layout="bsnh" if kv_cache is None else "bnhs",
                            transpose_q=groups > 1, kernel=groups > 1, dropout_rate=cfg.attention_dropout,
                            rng=fold(lr, _SELF_PROBS))
            out = out.reshape(-1, T, out.shape[2] * out.shape[3])
            return dropout(dense(sp["o"], out, dtype), cfg.hidden_dropout, fold(lr, _SELF_OUT))

        def cross_attn(x: jax.Array) -> jax.Array:
            cp = lp["cross_attn"]
            out = _attend_grouped(split_heads(dense(cp["q"], x, dtype), N), ck, cv, cross_mask, scale,
                                  "bnhs" if prepared else "bsnh", cfg.attention_dropout, fold(lr, _CROSS_PROBS))
            return dropout(dense(cp["o"], out.reshape(*out.shape[:2], -1), dtype), cfg.hidden_dropout,
                           fold(lr, _CROSS_OUT))

        def feed_forward(x: jax.Array) -> jax.Array:
            out = mlp(lp["mlp"], x, cfg.hidden_act, dtype, cfg.activation_dropout, fold(lr, _ACT))
            return dropout(out, cfg.hidden_dropout, fold(lr, _MLP_OUT))

        def run(h: jax.Array) -> jax.Array:
            h = block(h, lp["self_norm"], self_attn, pre, eps)
            h = block(h, lp["cross_norm"], cross_attn, pre, eps)
            return block(h, lp["mlp_norm"], feed_forward, pre, eps)

        return layer_drop(run, h, cfg.layerdrop, fold(lr, _LAYERDROP)), new_cache

    scales = layer_scales(cfg)
    if prepared:  # a Python loop over per-layer params: no per-step slicing of stacked arrays
        # one jitted function for every layer: traced once, its later calls found in jit's cache, lowered once
        # (XLA inlines the calls, so the compiled program is the same)
        layer_jit = jax.jit(layer)
        caches = []
        for i, lp in enumerate(p["layers"]):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            h, c = layer_jit(h, (lp, scales[i], cross.k[i], cross.v[i], kv, i), shared)
            caches.append(c)
        new_cache = None if cache is None else (tuple(c[0] for c in caches), tuple(c[1] for c in caches))
    else:
        xs = (p["layers"], scales, cross.k, cross.v, None if cache is None else tuple(cache),
              jnp.arange(cfg.num_layers))
        h, new_cache = jax.lax.scan(remat_fn(lambda h, xs: layer(h, xs, shared), remat), h, xs)
    if cfg.final_norm:
        h = layer_norm(p["final_norm"], h, cfg.layer_norm_eps)
    return lm_head(cfg, p, h, dtype), None if cache is None else KVCache(*new_cache)
