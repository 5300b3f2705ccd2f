"""Dense, norms, activations, attention, dropout and the residual block every transformer layer here is made of.

Params are float32; ``dtype`` is the compute dtype. Norm statistics and softmax are always float32. Randomness comes
from an explicit ``rng`` (a ``jax.random`` key, or None for transformers' eval mode), split per site with ``fold``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from functools import partial
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from speechseq.errors import ConfigError, InputError

Params = Mapping[str, jax.Array]

def _with_derivative(fn: Callable[[jax.Array], jax.Array],
                     derivative: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
    """The element-wise ``fn`` whose gradient is ``derivative(x) * tangent``: the backward pass keeps one array like
    x (the derivative), where autodiff of an erf or tanh formula keeps x and two of its intermediate terms (a
    base-size encoder's feed-forward and conv activations: ~1 GB less for a batch of four 5 s clips)."""
    f = jax.custom_jvp(fn)
    f.defjvp(lambda primals, tangents: (fn(primals[0]), derivative(primals[0]) * tangents[0]))
    return f


def _gelu_derivative(x: jax.Array) -> jax.Array:
    """d/dx of x * Phi(x): Phi(x) + x * phi(x)."""
    return (0.5 * (1 + jax.lax.erf(x * math.sqrt(0.5))) + x * jnp.exp(-0.5 * jnp.square(x)) / math.sqrt(2 * math.pi)
            ).astype(x.dtype)


def _gelu_tanh_derivative(x: jax.Array) -> jax.Array:
    """d/dx of x * (1 + tanh(u)) / 2, u = sqrt(2 / pi) * (x + 0.044715 x^3)."""
    c = math.sqrt(2 / math.pi)
    t = jnp.tanh(c * (x + 0.044715 * x ** 3))
    return (0.5 * (1 + t) + 0.5 * x * (1 - jnp.square(t)) * c * (1 + 3 * 0.044715 * jnp.square(x))).astype(x.dtype)


gelu = _with_derivative(lambda x: jax.nn.gelu(x, approximate=False), _gelu_derivative)
gelu_tanh = _with_derivative(lambda x: jax.nn.gelu(x, approximate=True), _gelu_tanh_derivative)

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu,
    "gelu_python": gelu,  # transformers' erf formula written out (SEW-D's default): the same function
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_fast": gelu_tanh,
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
    None or ``rate`` 0 it returns ``x`` itself (eval mode). ``rate`` is a config value (static).

    Each element's draw is 16 random bits, two from each 32-bit word of ``jax.random.bits``: half the counter-based
    hashing of ``jax.random.bernoulli`` (a 32-bit float an element), which dominates dropout's cost on a CPU. The
    drop probability is ``rate`` rounded to a multiple of 2^-16 (off by at most 7.6e-6)."""
    if rng is None or rate == 0:
        return x
    if rate >= 1:
        return jnp.zeros_like(x)
    words = jax.random.bits(rng, ((x.size + 1) // 2,), jnp.uint32)
    draws = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:x.size].reshape(x.shape)
    keep = draws >= round(rate * 65536)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def layer_drop(fn: Callable[[jax.Array], jax.Array], h: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """LayerDrop: ``fn(h)``, or ``h`` unchanged with probability ``rate`` when ``rng`` is given (transformers skips
    a layer in training when ``torch.rand([]) < layerdrop``). One draw for the whole batch, as there; ``lax.cond``,
    so a skipped layer costs nothing, also inside ``lax.scan``."""
    if rng is None or rate == 0:
        return fn(h)
    return jax.lax.cond(jax.random.bernoulli(rng, rate), lambda h: h, fn, h)


class Captured(NamedTuple):
    """What transformers returns for ``output_hidden_states`` / ``output_attentions`` of one encoder or decoder:
    ``hidden_states`` (the first layer's input, then each layer's output, L + 1 arrays [B, S, D]; the last one as
    the family's transformers class gives it, e.g. after a decoder's final norm), ``attentions`` (each layer's
    self-attention probabilities [B, N, S, S]) and, for a decoder, ``cross_attentions`` [B, N, T, S]."""

    hidden_states: tuple[jax.Array, ...]
    attentions: tuple[jax.Array, ...]
    cross_attentions: tuple[jax.Array, ...] | None = None


def captured(first: jax.Array, per_layer: tuple[jax.Array, ...], last: jax.Array | None = None) -> Captured:
    """``Captured`` from a layer scan's outputs: ``first`` the first layer's input [B, S, D], ``per_layer`` the
    stacked (outputs [L, B, S, D], self-attention probabilities [L, B, N, S, S], cross-attention ones [L, ...]?);
    ``last``: what stands in for the last layer's output (a final norm's result), where transformers puts it."""
    outs, *probs = per_layer
    L = outs.shape[0]
    hidden = (first, *(outs[i] for i in range(L - 1)), outs[L - 1] if last is None else last)
    return Captured(hidden, *(tuple(p[i] for i in range(L)) for p in probs))


def check_capture(layerdrop: float, rng: jax.Array | None, where: str) -> None:
    """A one-line ``InputError`` for per-layer outputs asked with LayerDrop on (training mode): transformers' tuples
    then lack the layers it skipped, a number that changes from call to call and cannot be a static shape here."""
    if rng is not None and layerdrop > 0:
        raise InputError(f"output_hidden_states / output_attentions: the {where}'s LayerDrop ({layerdrop}) in "
                         "training mode skips layers at random; ask for them in eval mode (rng=None) or with layerdrop 0")


# Where the rows of a batch live while a sharded training step is traced (``rows_sharding``), else None.
_ROWS: contextvars.ContextVar[Any] = contextvars.ContextVar("speechseq_rows_sharding", default=None)


@contextlib.contextmanager
def rows_sharding(sharding: Any) -> Iterator[None]:
    """While tracing under this context, every layer's input [B, ...] is kept split by rows as ``sharding`` (a
    ``NamedSharding`` whose spec names the batch's mesh axes first) splits a batch (``keep_rows``). On an FSDP mesh
    that makes XLA gather each layer's weights inside the layer scan (FSDP) instead of gathering the activations
    over the batch (what it picks for small layers otherwise, and what would not fit for large ones)."""
    token = _ROWS.set(sharding)
    try:
        yield
    finally:
        _ROWS.reset(token)


def on_mesh() -> bool:
    """Whether a sharded training step is being traced (``rows_sharding``)."""
    return _ROWS.get() is not None


def keep_rows(x: jax.Array) -> jax.Array:
    """``x`` [B, ...] constrained to the rows sharding of ``rows_sharding`` (``x`` itself outside it)."""
    sharding = _ROWS.get()
    if sharding is None:
        return x
    rows = sharding.spec[0] if len(sharding.spec) else None
    spec = type(sharding.spec)(rows, *(None,) * (x.ndim - 1))
    return jax.lax.with_sharding_constraint(x, type(sharding)(sharding.mesh, spec))


def whole(x: jax.Array) -> jax.Array:
    """``x`` (a weight) gathered whole on every device under ``rows_sharding`` (``x`` itself outside it): for an
    operation XLA would otherwise split by the weight's sharded axis, gathering the batch's rows instead."""
    sharding = _ROWS.get()
    if sharding is None:
        return x
    return jax.lax.with_sharding_constraint(x, type(sharding)(sharding.mesh, type(sharding.spec)()))


REMAT_POLICIES = ("none", "layer", "dots")


def remat(fn: Callable, policy: str) -> Callable:
    """``fn`` (one layer's body, the body of a ``lax.scan``) under a rematerialisation policy, by name as MaxText's
    ``remat_policy``: "none" keeps every activation for the backward pass; "layer" keeps only the layer's inputs and
    recomputes the rest (``jax.checkpoint``); "dots" also keeps the results of matmuls without batch dimensions (the
    projections), so only the cheap element-wise work and attention are recomputed.

    No optimisation barrier (``prevent_cse=False``): the scan already keeps XLA from merging the recomputation with
    the forward pass, as JAX's documentation notes, and the barrier would only limit XLA's fusion.

    The layer's input (the scan's carry [B, S, D]) is kept split by rows under ``rows_sharding`` (``keep_rows``)."""
    inner = fn

    def fn(h: jax.Array, xs: Any) -> Any:
        return inner(keep_rows(h), xs)

    if policy == "none":
        return fn
    if policy == "layer":
        return jax.checkpoint(fn, prevent_cse=False)
    if policy == "dots":
        return jax.checkpoint(fn, prevent_cse=False, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    raise ConfigError(f"remat: unknown policy {policy!r}; choose one of {list(REMAT_POLICIES)}")


def dense(p: Params, x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """[..., Din] @ kernel [Din, Dout] (+ bias) in ``dtype``."""
    y = jnp.dot(x.astype(dtype), p["kernel"].astype(dtype))
    if "bias" in p:
        y = y + p["bias"].astype(dtype)
    return y


def heads(p: Params, x: jax.Array, num_heads: int, dtype: jnp.dtype) -> jax.Array:
    """A projection straight into head-major order: x [B, T, Din] @ kernel [Din, N*H] (+ bias) -> [B, N, T, H].

    The dot writes the head-major result itself, so the attention dots that follow are canonical batched matmuls
    over (B, N) with no transpose between (on 2 CPU cores as fast as XLA's best layout for a base-size encoder's
    self-attention, forward and gradient, where sequence-major q/k/v with the transposes left to XLA ran ~2x slower
    forward)."""
    kernel = p["kernel"].astype(dtype)
    y = jnp.einsum("btd,dnh->bnth", x.astype(dtype), kernel.reshape(kernel.shape[0], num_heads, -1))
    if "bias" in p:
        y = y + p["bias"].astype(dtype).reshape(num_heads, 1, -1)
    return y


def merge_heads(p: Params, x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """The output projection of head-major attention: x [B, N, T, H] @ kernel [N*H, Dout] (+ bias) -> [B, T, Dout]."""
    N, H = x.shape[1], x.shape[3]
    y = jnp.einsum("bnth,nhd->btd", x.astype(dtype), p["kernel"].astype(dtype).reshape(N, H, -1))
    if "bias" in p:
        y = y + p["bias"].astype(dtype)
    return y


def layer_norm(p: Params, x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis with float32 statistics; returns ``x.dtype``."""
    y = standardize(x.astype(jnp.float32), eps) * p["scale"] + p["bias"]
    return y.astype(x.dtype)


@partial(jax.custom_jvp, nondiff_argnums=(1,))
def standardize(x: jax.Array, eps: float) -> jax.Array:
    """(x - mean) / sqrt(var + eps) over the last axis of x [..., D].

    Its gradient keeps only the result and the [..., 1] scale for the backward pass (the textbook LayerNorm
    backward), where autodiff of the formula also keeps x - mean and twice it: two arrays like x less for every norm.
    """
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


@standardize.defjvp
def _standardize_jvp(eps: float, primals: tuple[jax.Array], tangents: tuple[jax.Array]) -> tuple[jax.Array, jax.Array]:
    (x,), (t,) = primals, tangents
    mean = x.mean(-1, keepdims=True)
    scale = jax.lax.rsqrt(jnp.square(x - mean).mean(-1, keepdims=True) + eps)
    y = (x - mean) * scale
    return y, scale * (t - t.mean(-1, keepdims=True) - y * jnp.mean(t * y, -1, keepdims=True))


@jax.custom_jvp
def softmax(x: jax.Array) -> jax.Array:
    """``jax.nn.softmax`` over the last axis whose gradient keeps only the probabilities for the backward pass (which
    the attention's value dot keeps anyway), where this JAX's autodiff keeps the unnormalised exponentials too: one
    [B, N, T, S] array less per attention."""
    return jax.nn.softmax(x, axis=-1)


@softmax.defjvp
def _softmax_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]) -> tuple[jax.Array, jax.Array]:
    y = softmax(primals[0])
    return y, y * (tangents[0] - jnp.sum(y * tangents[0], axis=-1, keepdims=True))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float | jax.Array,
              layout: str = "bnsh", groups: int = 1, dropout_rate: float = 0.0,
              rng: jax.Array | None = None, bias: jax.Array | None = None,
              return_probs: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Scaled dot-product attention, head-major.

    q [B*G, N, T, H]; k [B, N, S, H] (``layout="bnsh"``) or transposed [B, N, H, S] (``"bnhs"``, the layout of the
    decode step's self-attention cache, ``decoders.transformer.init_cache``); v [B, N, S, H]. ``groups`` G > 1:
    G consecutive query rows share one row of keys and values (beams or samples of one utterance), with no copy of
    K/V per row. mask bool (True = attend) broadcastable to [B, N, T, S], or to [B, G, N, T, S] when grouped.
    Returns [B*G, N, T, H]. Scores and softmax in float32; a fully masked row is uniform, as in transformers. With
    ``rng``, the probabilities get ``dropout(dropout_rate)`` (transformers' attention dropout). ``bias``: added to
    the scaled scores before the mask, broadcastable to them (WavLM's gated relative position bias).
    ``return_probs``: also return the probabilities [B*G, N, T, S] the values were weighted by, after the dropout,
    as transformers' eager attention returns them (``output_attentions``).
    """
    if layout not in ("bnsh", "bnhs"):
        raise ValueError(f"attention: layout must be 'bnsh' or 'bnhs', got {layout!r}")
    B, N, T, H = k.shape[0], q.shape[1], q.shape[2], q.shape[3]
    ks = "bnsh" if layout == "bnsh" else "bnhs"
    if groups == 1:
        scores = jnp.einsum(f"bnth,{ks}->bnts", q, k, preferred_element_type=jnp.float32) * scale
    else:
        scores = jnp.einsum(f"bgnth,{ks}->bgnts", q.reshape(B, groups, N, T, H), k,
                            preferred_element_type=jnp.float32) * scale
        if mask is not None and mask.ndim == 4:  # the same for every row of a group
            mask = mask[:, None]
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = dropout(softmax(scores).astype(v.dtype), dropout_rate, rng)
    if groups == 1:
        out = jnp.einsum("bnts,bnsh->bnth", probs, v)
    else:
        out = jnp.einsum("bgnts,bnsh->bgnth", probs, v).reshape(B * groups, N, T, H)
    if return_probs:
        return out, probs.reshape(B * groups, N, T, -1)
    return out


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
                         rng: jax.Array | None = None, return_probs: bool = False
                         ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Project queries from x [B, T, D] and keys/values from kv [B, S, Dkv], attend, project out: [B, T, D].
    mask broadcastable to [B, N, T, S]; ``dropout_rate`` and ``rng``: dropout on the attention probabilities (see
    ``attention``); ``return_probs``: also return them, [B, N, T, S]."""
    q, k, v = (heads(p[n], y, num_heads, dtype) for n, y in (("q", x), ("k", kv), ("v", kv)))
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    out = attention(q, k, v, mask, scale, dropout_rate=dropout_rate, rng=rng, return_probs=return_probs)
    if return_probs:
        return merge_heads(p["o"], out[0], dtype), out[1]
    return merge_heads(p["o"], out, dtype)


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
