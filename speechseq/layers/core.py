"""Dense, norms, activations, attention, dropout and the residual block every transformer layer here is made of.

Params are float32; ``dtype`` is the compute dtype. Norm statistics and softmax are always float32. Randomness comes
from an explicit ``rng`` (a ``jax.random`` key, or None for transformers' eval mode), split per site with ``fold``.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from speechseq import kernels
from speechseq.errors import ConfigError

Params = Mapping[str, jax.Array]

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(f"activation {name!r} is not supported; supported: {sorted(_ACTIVATIONS)}") from None


def check_activation(name: str, where: str) -> str:
    if not isinstance(name, str) or name not in _ACTIVATIONS:
        raise ConfigError(f"{where}: activation {name!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
    return name


def fold(rng: jax.Array | None, *ids: int | jax.Array) -> jax.Array | None:
    """The key of one random site: ``rng`` with each id (a fixed site number, a layer index) folded in, in turn, so
    that the same key always gives the same masks at the same site. None stays None (no randomness)."""
    if rng is None:
        return None
    for i in ids:
        rng = jax.random.fold_in(rng, i)
    return rng


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout, as torch's ``nn.Dropout`` in training mode: each element of ``x`` [...] is zeroed with
    probability ``rate`` and the others scaled by ``1 / (1 - rate)``, so the expectation is unchanged. With ``rng``
    None or ``rate`` 0 it returns ``x`` itself (eval mode). ``rate`` is a config value (static)."""
    if rng is None or rate == 0:
        return x
    if rate >= 1:
        return jnp.zeros_like(x)
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def layer_drop(fn: Callable[[jax.Array], jax.Array], h: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """LayerDrop: ``fn(h)``, or ``h`` unchanged with probability ``rate`` when ``rng`` is given (transformers skips
    a layer in training when ``torch.rand([]) < layerdrop``). One draw for the whole batch, as there; ``lax.cond``,
    so a skipped layer costs nothing, also inside ``lax.scan``."""
    if rng is None or rate == 0:
        return fn(h)
    return jax.lax.cond(jax.random.bernoulli(rng, rate), lambda h: h, fn, h)


REMAT_POLICIES = ("none", "layer", "dots")


def remat(fn: Callable, policy: str) -> Callable:
    """``fn`` (one layer's body) under a rematerialisation policy, by name as MaxText's ``remat_policy``: "none"
    keeps every activation for the backward pass; "layer" keeps only the layer's inputs and recomputes the rest
    (``jax.checkpoint``); "dots" also keeps the results of matmuls without batch dimensions (the projections), so
    only the cheap element-wise work and attention are recomputed."""
    if policy == "none":
        return fn
    if policy == "layer":
        return jax.checkpoint(fn)
    if policy == "dots":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    raise ConfigError(f"remat: unknown policy {policy!r}; choose one of {list(REMAT_POLICIES)}")


def dense(p: Params, x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """[..., Din] @ kernel [Din, Dout] (+ bias) in ``dtype``; or with ``kernel_t`` [Dout, Din] or ``kernel_p``
    (float32 panels for the CPU decode kernel), see ``out_major``."""
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
    """x [..., Din] times a weight stored [Dout, Din] -> [..., Dout], as ``w_t @ x^T`` for a few rows of x.

    For the few rows of a decode step XLA CPU's dot streams a weight at about 25 GB/s in this orientation against
    about 18 GB/s for ``x @ W``. The barriers keep XLA from folding the two tiny transposes into the dot's layouts,
    which would select a slow dot kernel (or copy the weight) instead.
    """
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


def layer_norm(p: Params, x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis with float32 statistics; returns ``x.dtype``."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]
    return y.astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float | jax.Array,
              layout: str = "bsnh", transpose_q: bool = False, kernel: bool = True, dropout_rate: float = 0.0,
              rng: jax.Array | None = None) -> jax.Array:
    """Scaled dot-product attention.

    q [B, T, N, H]; k and v [B, S, N, H] (``layout="bsnh"``), head-major [B, N, S, H] (``"bnsh"``), or ``"bnhs"``:
    k transposed [B, N, H, S] and v [B, N, S, H] (the decode step's cross-attention K/V, ``decode_cross_kv``, and its
    self-attention cache, ``init_cache``: the scores dot then reads K row-major, which XLA CPU's batched few-row dots
    need; measured on 2 CPU cores, cross-attention 10-25% less time for beam search's 4 query rows per utterance and
    neutral for 1, beam-4 self-attention scores ~4x cheaper).
    mask bool broadcastable to [B, N, T, S] (True = attend). Returns [B, T, N, H]. Scores and softmax in float32; a
    fully masked row is uniform, as in transformers.

    In the ``"bnhs"`` layout, float32 on one CPU device, ``speechseq.kernels.attend`` does it (``kernel``, unless
    told not to: it reads each (batch, head)'s K and V once, at about the machine's streaming rate; per-op profile
    of the decode benchmark, cross-attention 4-6 ms a step where XLA's dots and reductions took 8-10 ms). Otherwise
    on CPU one query row per (batch, head) in the ``"bnhs"`` layout (greedy decode steps) is computed as
    multiply-and-reduce (``_attend_one_query``: same numbers up to float rounding, far less compile time);
    sequence-major keys are moved head-major first, and ``transpose_q`` moves q to [B, N, T, H], so that
    both dots are canonical batched matmuls over (B, N): 3x faster for the encoder's self-attention, and faster for
    decode-step attention with several query rows per utterance (beam search). Other
    backends keep XLA's own layout choice for sequence-major keys.

    With ``rng``, the probabilities [B, N, T, S] get ``dropout(dropout_rate)`` (transformers' attention dropout);
    that always takes the batched-dot path.
    """
    if layout not in ("bsnh", "bnsh", "bnhs"):
        raise ValueError(f"attention: layout must be 'bsnh', 'bnsh' or 'bnhs', got {layout!r}")
    fused = rng is None or dropout_rate == 0  # the kernel and the one-row path have no dropout
    if layout == "bnhs" and kernel and fused and kernels.attend_fits(q, k, v, mask):
        return kernels.attend(q, k, v, mask, scale)
    if layout == "bnhs" and q.shape[1] == 1 and fused and jax.default_backend() == "cpu":
        return _attend_one_query(q, k, v, mask, scale)
    if layout == "bsnh" and jax.default_backend() == "cpu":
        # the barriers stop XLA from folding the transposes into the dots (slower kernels on CPU)
        k, v = jax.lax.optimization_barrier((jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)))
        layout = "bnsh"
        transpose_q = True
    qo = "bnth" if transpose_q else "btnh"
    if transpose_q:
        q = jax.lax.optimization_barrier(jnp.swapaxes(q, 1, 2))
    scores = jnp.einsum(f"{qo},{layout}->bnts", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = dropout(jax.nn.softmax(scores, axis=-1).astype(v.dtype), dropout_rate, rng)
    out = jnp.einsum(f"bnts,{'bnsh' if layout == 'bnhs' else layout}->{qo}", probs, v)
    return jnp.swapaxes(jax.lax.optimization_barrier(out), 1, 2) if transpose_q else out


def _attend_one_query(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                      scale: float | jax.Array) -> jax.Array:
    """``attention`` for one query row per (batch, head) and ``layout="bnhs"`` (greedy and sampling decode steps), as
    multiply-and-reduce instead of dots: q [B, 1, N, H], k [B, N, H, S], v [B, N, S, H] -> [B, 1, N, H].

    XLA CPU passes a dot with one row to no library and compiles each one as a kernel of its own: 4 per layer, 48
    for a 12-layer decoder, 0.5-1 s of a greedy program's compile on 2 cores. XLA CPU hands these reductions to
    YNNPACK (library calls, nothing compiled per layer), and per step they take what the 1-row dots took (per-op
    profile of the decode benchmark's greedy step: ~10.4 ms for 12 layers of cross- and self-attention, either way).
    """
    f32 = jnp.float32
    qh = q[:, 0].astype(f32)  # [B, N, H]
    scores = jnp.sum(qh[..., None] * k.astype(f32), axis=2) * scale  # [B, N, S]
    if mask is not None:
        scores = jnp.where(mask[..., 0, :] if mask.ndim >= 2 else mask, scores, jnp.finfo(f32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).astype(f32)
    return jnp.sum(probs[..., None] * v.astype(f32), axis=2).astype(v.dtype)[:, None]  # [B, 1, N, H]


def explicit_axes(x: jax.Array) -> tuple[str, ...]:
    """Names of the mesh axes with explicit sharding (``jax.make_mesh``'s default) that ``x``'s type carries."""
    mesh = jax.typeof(x).sharding.mesh
    return tuple(n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == jax.sharding.AxisType.Explicit)


def embedding_lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """Rows of ``table`` [V, D] at integer ``ids`` [...] -> [..., D] (``jnp.take``). Under a mesh with explicit axes
    the rows are sharded like the ids, which JAX cannot infer for a gather by itself."""
    if explicit_axes(ids):
        sharding = jax.typeof(ids).sharding
        return table.at[ids].get(mode="fill", fill_value=jnp.nan,
                                 out_sharding=sharding.update(spec=jax.P(*sharding.spec, None)))
    return jnp.take(table, ids, axis=0)


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """[B, T, N*H] -> [B, T, N, H]."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def multi_head_attention(p: Params, x: jax.Array, kv: jax.Array, mask: jax.Array | None, num_heads: int,
                         dtype: jnp.dtype, scale: float | jax.Array | None = None, dropout_rate: float = 0.0,
                         rng: jax.Array | None = None) -> jax.Array:
    """Project queries from x [B, T, D] and keys/values from kv [B, S, Dkv], attend, project out: [B, T, D].
    ``dropout_rate`` and ``rng``: dropout on the attention probabilities (see ``attention``)."""
    q = split_heads(dense(p["q"], x, dtype), num_heads)
    k = split_heads(dense(p["k"], kv, dtype), num_heads)
    v = split_heads(dense(p["v"], kv, dtype), num_heads)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    out = attention(q, k, v, mask, scale, dropout_rate=dropout_rate, rng=rng)
    return dense(p["o"], out.reshape(*out.shape[:2], -1), dtype)


def mlp(p: Params, x: jax.Array, act: str, dtype: jnp.dtype, dropout_rate: float = 0.0,
        rng: jax.Array | None = None) -> jax.Array:
    """Feed-forward: wo(dropout(act(wi(x)))). x [B, T, D] -> [B, T, D]; the dropout (``dropout_rate``, with
    ``rng``) is transformers' activation dropout."""
    return dense(p["wo"], dropout(activation(act)(dense(p["wi"], x, dtype)), dropout_rate, rng), dtype)


def block(x: jax.Array, norm_p: Params, fn: Callable[[jax.Array], jax.Array], pre_norm: bool, eps: float) -> jax.Array:
    """Residual sub-layer: ``x + fn(norm(x))`` (pre-norm) or ``norm(x + fn(x))`` (post-norm)."""
    if pre_norm:
        return x + fn(layer_norm(norm_p, x, eps))
    return layer_norm(norm_p, x + fn(x), eps)
