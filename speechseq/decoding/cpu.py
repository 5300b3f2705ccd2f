"""The CPU decode plan: the decoder's weights in a layout of their own for one-token steps, the C++ kernels of
``speechseq.kernels`` where they run, and the layers as a Python loop over per-layer arrays.

On a few CPU cores a decode step is memory-bound: each step streams every decoder weight once for a few rows. So:

- weights of the step's projections are stored [Dout, Din] in the compute dtype (``out_major``): XLA CPU's dot
  streams a weight at about 25 GB/s in this orientation against about 18 GB/s for ``x @ W``; float32 weights are
  packed for ``kernels.panel_dot`` where it runs (up to ``kernels.MAX_ROWS`` rows: faster still);
- self-attention q/k/v become one fused projection; cross-attention K/V are computed once per utterance, per
  layer, keys transposed (``decode_cross_kv``);
- the layers are a list, not stacked arrays: inside a ``while_loop`` XLA CPU would copy each layer's slice out of
  stacked arrays on every step; one jitted layer function is traced once and inlined per layer;
- attention over a grouped cache (beam search) and cross-attention run ``kernels.attend``; one query row per
  (batch, head) is multiply-and-reduce (``_attend_one_query``).

Optimisation barriers keep XLA from folding the transposes these layouts exist for back into the dots. Tokens
equal the model's own decode (``decoders.transformer.decode``, the ``XlaPlan``) up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from speechseq import kernels
from speechseq.config import SpeechSeq2SeqConfig
from speechseq.decoders import transformer
from speechseq.decoders.transformer import CrossKV, KVCache, LayerOps
from speechseq.layers.core import Params, layer_norm, split_heads


def dense(p: Params, x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """A dense layer in any of this plan's layouts: ``kernel_p`` (float32 panels for ``kernels.panel_dot``),
    ``kernel_t`` [Dout, Din] (``out_major_dot``) or the model's own ``kernel`` [Din, Dout]; + bias."""
    if "kernel_p" in p:  # as many outputs as the bias has (a kernel without one fills whole panels)
        y = kernels.panel_dot(x.astype(jnp.float32), p["kernel_p"], p["bias"].shape[0] if "bias" in p else None)
    elif "kernel_t" in p:
        y = out_major_dot(x.astype(dtype), p["kernel_t"].astype(dtype))
    else:
        y = jnp.dot(x.astype(dtype), p["kernel"].astype(dtype))
    if "bias" in p:
        y = y + p["bias"].astype(dtype)
    return y


def out_major_dot(x: jax.Array, w_t: jax.Array) -> jax.Array:
    """x [..., Din] times a weight stored [Dout, Din] -> [..., Dout], as ``w_t @ x^T`` for a few rows of x. The
    barriers keep XLA from folding the two tiny transposes into the dot's layouts, which would select a slow dot
    kernel (or copy the weight) instead."""
    rows = x.reshape(-1, x.shape[-1])
    y = jax.lax.optimization_barrier(w_t @ jax.lax.optimization_barrier(rows.T)).T
    return y.reshape(*x.shape[:-1], w_t.shape[0])


def out_major(p: Params, dtype: jnp.dtype, rows: int | None = None) -> dict:
    """A dense layer's params for decode steps of ``rows`` rows (None: unknown, few): the kernel stored [Dout, Din]
    in ``dtype`` (``kernel_t``), or, where ``speechseq.kernels`` runs (float32 on CPU, ``kernels.use_for``), packed
    for it (``kernel_p`` [ceil(Dout / 16), Din, 16]), if a bias or a Dout that is a multiple of 16 tells ``dense``
    how many outputs there are."""
    w_t = p["kernel"].T.astype(dtype)
    use = kernels.use_for(w_t, rows) and ("bias" in p or w_t.shape[0] % kernels.PANEL == 0)
    q = {"kernel_p": kernels.pack(w_t)} if use else {"kernel_t": w_t}
    if "bias" in p:
        q["bias"] = p["bias"]
    return q


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float | jax.Array,
              transpose_q: bool = False, kernel: bool = True) -> jax.Array:
    """Attention of the decode step: q [B, T, N, H], keys transposed k [B, N, H, S], values v [B, N, S, H], mask
    bool broadcastable to [B, N, T, S] -> [B, T, N, H]; scores and softmax in float32, as ``layers.core.attention``.

    ``kernels.attend`` where it fits (``kernel``: it reads each (batch, head)'s K and V once, at about the machine's
    streaming rate); else one query row per (batch, head) as multiply-and-reduce (``_attend_one_query``); else
    batched dots, with ``transpose_q`` moving q to [B, N, T, H] first so both dots are canonical batched matmuls.
    """
    if kernel and kernels.attend_fits(q, k, v, mask):
        return kernels.attend(q, k, v, mask, scale)
    if q.shape[1] == 1:
        return _attend_one_query(q, k, v, mask, scale)
    qo = "bnth" if transpose_q else "btnh"
    if transpose_q:
        q = jax.lax.optimization_barrier(jnp.swapaxes(q, 1, 2))
    scores = jnp.einsum(f"{qo},bnhs->bnts", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    out = jnp.einsum(f"bnts,bnsh->{qo}", jax.nn.softmax(scores, axis=-1).astype(v.dtype), v)
    return jnp.swapaxes(jax.lax.optimization_barrier(out), 1, 2) if transpose_q else out


def _attend_one_query(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                      scale: float | jax.Array) -> jax.Array:
    """``attention`` for one query row per (batch, head) (greedy and sampling steps), as multiply-and-reduce
    instead of dots: q [B, 1, N, H], k [B, N, H, S], v [B, N, S, H] -> [B, 1, N, H].

    XLA CPU passes a dot with one row to no library and compiles each one as a kernel of its own: 4 per layer, 48
    for a 12-layer decoder, 0.5-1 s of a greedy program's compile on 2 cores. These reductions go to YNNPACK
    (library calls, nothing compiled per layer) and take per step what the 1-row dots took.
    """
    f32 = jnp.float32
    qh = q[:, 0].astype(f32)  # [B, N, H]
    scores = jnp.sum(qh[..., None] * k.astype(f32), axis=2) * scale  # [B, N, S]
    if mask is not None:
        scores = jnp.where(mask[..., 0, :] if mask.ndim >= 2 else mask, scores, jnp.finfo(f32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).astype(f32)
    return jnp.sum(probs[..., None] * v.astype(f32), axis=2).astype(v.dtype)[:, None]  # [B, 1, N, H]


def _self_attention(cfg: Any, sp: Params, x: jax.Array, kv_cache: tuple, mask: jax.Array, scale: jax.Array,
                    start: int | jax.Array, groups: int, dtype: jnp.dtype, rng: None) -> tuple[jax.Array, tuple]:
    N, T = cfg.num_heads, x.shape[1]
    q, k, v = jnp.split(split_heads(dense(sp["qkv"], x, dtype), 3 * N), 3, axis=2)  # [B', T, N, H] each
    k, v = transformer.write_cache(*kv_cache, k, v, start, groups)
    if groups > 1:  # the G rows of an utterance attend together over its grouped cache
        q = q.reshape(-1, groups * T, *q.shape[2:])
        mask = jnp.swapaxes(mask, 1, 2).reshape(mask.shape[0], 1, groups * T, -1)  # [B, G, 1, T, S] -> [B, 1, GT, S]
    # the kernel only over a grouped cache: fed an ungrouped one (greedy, sampling), XLA copied each layer's cache
    # five times a step (+7 ms per step in the decode benchmark's profile)
    out = attention(q, k, v, mask, scale, transpose_q=groups > 1, kernel=groups > 1)
    return dense(sp["o"], out.reshape(-1, T, out.shape[2] * out.shape[3]), dtype), (k, v)


def _cross_attention(cfg: Any, cp: Params, x: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                     scale: jax.Array, dtype: jnp.dtype, rng: None) -> jax.Array:
    q = split_heads(dense(cp["q"], x, dtype), cfg.num_heads)  # [B*G, T, N, H]; K/V per utterance, not per row
    B, T = k.shape[0], q.shape[1]
    out = attention(q.reshape(B, -1, *q.shape[2:]), k, v, mask, scale, transpose_q=True)
    return dense(cp["o"], out.reshape(x.shape[0], T, -1), dtype)


OPS = LayerOps(_self_attention, _cross_attention, dense)


def prepare_layer(lp: Params, dtype: jnp.dtype, rows: int | None = None) -> dict:
    """One layer's params (unstacked) in this plan's layout for decode steps of ``rows`` rows (see ``out_major``):
    step projections out-major (or packed), self-attention q/k/v fused; cross-attention k/v kernels, which run once
    per utterance over all its frames (``decode_cross_kv``), keep their [Din, Dout] layout, cast to ``dtype``."""
    sa, ca = lp["self_attn"], lp["cross_attn"]
    qkv = {"kernel": jnp.concatenate([sa[n]["kernel"] for n in "qkv"], axis=1)}
    if "bias" in sa["q"]:
        qkv["bias"] = jnp.concatenate([sa[n]["bias"] for n in "qkv"])
    cast = {n: {**ca[n], "kernel": ca[n]["kernel"].astype(dtype)} for n in "kv"}
    return {**lp, "self_attn": {"qkv": out_major(qkv, dtype, rows), "o": out_major(sa["o"], dtype, rows)},
            "cross_attn": {"q": out_major(ca["q"], dtype, rows), "o": out_major(ca["o"], dtype, rows), **cast},
            "mlp": {n: out_major(lp["mlp"][n], dtype, rows) for n in ("wi", "wo")}}


def prepare_head(p: Params, dtype: jnp.dtype, rows: int | None = None) -> dict:
    """Everything but the layers in this plan's layout: the output projection, tied or not, as ``head/kernel_t``
    [V, D] in the compute dtype, or packed for the kernel as ``head/kernel_p``; see ``prepare_layer``."""
    out = {k: v for k, v in p.items() if k != "layers"}
    head = dict(p.get("head", {}))
    tied = "kernel" not in head
    w_t = (p["embed"]["tokens"] if tied else head.pop("kernel").T).astype(dtype)
    head.update({"kernel_p": kernels.pack(w_t)} if kernels.use_for(w_t, rows) else {"kernel_t": w_t})
    if "transform" in head:
        head["transform"] = out_major(head["transform"], dtype, rows)
    out["head"] = head
    return out


@partial(jax.jit, static_argnames=("dtype", "rows"))
def _prepare_layer(layers: Any, i: jax.Array, dtype: Any, rows: int | None) -> dict:
    return prepare_layer(jax.tree.map(lambda x: x[i], layers), dtype, rows)


def prepare_decoder(cfg: SpeechSeq2SeqConfig, params: Any, dtype: Any = jnp.float32, rows: int | None = None) -> dict:
    """The decoder's weights in this plan's layout: a list of per-layer params (``prepare_layer``) and the rest
    (``prepare_head``). ``rows``: the steps' rows (batch x beams, or x ``num_return_sequences``), where known; float32
    weights are packed for ``kernels.panel_dot`` up to ``kernels.MAX_ROWS`` rows (None: assumed few), and kept
    out-major for XLA's dots above, where XLA's GEMM is faster.

    Called outside ``jit``, it runs one small compiled program per layer (compiled once for all layers) and the rest
    op by op (a tied output projection already in ``dtype`` is the embedding table itself, not a copy, unless it is
    packed); inside ``generate`` it is part of that program."""
    dtype, p = jnp.dtype(dtype), params["decoder"]
    rows = None if rows is None or rows <= kernels.MAX_ROWS else kernels.MAX_ROWS + 1  # one layout per side
    layers = [_prepare_layer(p["layers"], jnp.int32(i), dtype, rows) for i in range(cfg.decoder.num_layers)]
    return {**prepare_head(p, dtype, rows), "layers": layers}


def decode_cross_kv(cfg: Any, layers: list[Params], enc: jax.Array, dtype: jnp.dtype) -> CrossKV:
    """Encoder frames [B, S, D] -> per-layer tuples of cross-attention k [B, N, H, S] and v [B, N, S, H], from the
    layers in this plan's layout. Layer by layer over separate weight arrays, so that every layer's projections and
    transposes are the same computation and XLA compiles their kernels once (taken out of a stacked result, each
    layer's transposes would read at another constant offset and be compiled again: 24 kernels for 12 layers)."""
    enc = enc.astype(dtype)
    ks, vs = [], []
    for lp in layers:
        ca = lp["cross_attn"]
        ks.append(jnp.transpose(split_heads(dense(ca["k"], enc, dtype), cfg.num_heads), (0, 2, 3, 1)))
        vs.append(jnp.swapaxes(split_heads(dense(ca["v"], enc, dtype), cfg.num_heads), 1, 2))
    # the barrier keeps XLA from folding the transposes into the step's dots
    return jax.lax.optimization_barrier(CrossKV(tuple(ks), tuple(vs)))


def init_cache(cfg: Any, batch: int, max_len: int, dtype: jnp.dtype, groups: int = 1) -> KVCache:
    """``transformer.init_cache``'s cache as per-layer tuples of k [B, N, H, Tmax*G] and v [B, N, Tmax*G, H]."""
    B, N, H, S = batch, cfg.num_heads, cfg.head_dim, groups * max_len
    return KVCache(*(tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
                     for shape in ((B, N, H, S), (B, N, S, H))))


def decode_step(cfg: Any, p: Params, input_ids: jax.Array, cross: CrossKV, enc_mask: jax.Array | None,
                cache: KVCache, start: int | jax.Array, dtype: jnp.dtype,
                cache_rows: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """``transformer.decode`` with a cache, over params from ``prepare_decoder``, K/V from ``decode_cross_kv`` and a
    cache from ``init_cache``: ids [B', T] -> (float32 logits [B', T, V], cache)."""
    h, self_mask, cross_mask, groups = transformer.step_inputs(cfg, p, input_ids, enc_mask, None, cache.k[0].shape[-1],
                                                               start, dtype, cache_rows, cache.k[0].shape[0])
    # one jitted function for every layer: traced once, its later calls found in jit's cache, lowered once (XLA
    # inlines the calls, so the compiled program is the same)
    layer = jax.jit(partial(transformer.decoder_layer, cfg, ops=OPS), static_argnames=("groups", "dtype"))
    scales = transformer.layer_scales(cfg)
    ks, vs = [], []
    for i, lp in enumerate(p["layers"]):
        h, (k, v) = layer(lp, h, scales[i], cross.k[i], cross.v[i], (cache.k[i], cache.v[i]), i, self_mask,
                          cross_mask, start, groups=groups, dtype=dtype)
        ks.append(k)
        vs.append(v)
    if cfg.final_norm:
        h = layer_norm(p["final_norm"], h, cfg.layer_norm_eps)
    head = p["head"]
    h = transformer.head_transform(cfg, p, h, dtype, linear=dense)
    if "kernel_p" in head:
        logits = kernels.panel_dot(h.astype(jnp.float32), head["kernel_p"], cfg.vocab_size)
    else:
        logits = out_major_dot(h.astype(dtype), head["kernel_t"].astype(dtype)).astype(jnp.float32)
    if cfg.head_bias:
        logits = logits + head["bias"]
    return logits, KVCache(tuple(ks), tuple(vs))


@dataclass(frozen=True)
class CpuPlan:
    """The CPU plan (see the module's docstring). ``packed``: weights packed for the kernel (steps of at most
    ``kernels.MAX_ROWS`` rows, kernels available); otherwise out-major for XLA's dots."""

    packed: bool = True
    name = "cpu"

    def prepare(self, cfg: SpeechSeq2SeqConfig, params: Any, dtype: Any, rows: int | None) -> Any:
        return prepare_decoder(cfg, params, dtype, rows)

    def cross(self, cfg: SpeechSeq2SeqConfig, dec_p: Any, enc: jax.Array, dtype: Any) -> CrossKV:
        return decode_cross_kv(cfg.decoder, dec_p["layers"], enc, dtype)

    def init_cache(self, cfg: SpeechSeq2SeqConfig, batch: int, max_len: int, dtype: Any, groups: int = 1) -> KVCache:
        return init_cache(cfg.decoder, batch, max_len, dtype, groups)

    def step(self, cfg: SpeechSeq2SeqConfig, dec_p: Any, ids: jax.Array, cross: CrossKV, enc_mask: jax.Array | None,
             cache: KVCache, start: jax.Array, dtype: Any, cache_rows: jax.Array | None = None):
        return decode_step(cfg.decoder, dec_p, ids, cross, enc_mask, cache, start, dtype, cache_rows)
