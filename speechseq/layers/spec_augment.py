"""SpecAugment as transformers' wav2vec2 applies it in training (``_compute_mask_indices``, ``_mask_hidden_states``),
with static shapes and a ``jax.random`` key instead of numpy's global generator.

Per axis (time, then feature channels) and per call, one ``epsilon`` ~ U[0, 1) is shared by the batch; each row masks
``max(int(prob * length / span + epsilon), min_masks)`` spans of ``span`` positions (capped so they fit the axis and
the row), their starts drawn without replacement from the row's real length. Masked frames take the learned
``masked_spec_embed`` vector, masked channels are zeroed in every frame.

Shapes: B batch, S frames (or the masked axis), D channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from speechseq.errors import InputError


def _span_count(length: jax.Array, epsilon: jax.Array, size: int, prob: float, span: int,
                min_masks: int) -> jax.Array:
    """transformers' ``compute_num_masked_span``: spans for rows of ``length`` real positions on an axis of ``size``."""
    n = jnp.floor(prob * length.astype(jnp.float32) / span + epsilon).astype(jnp.int32)  # probabilistic rounding
    n = jnp.maximum(n, min_masks)
    n = jnp.where(n * span > size, size // span, n)
    return jnp.where(length - (span - 1) < n, jnp.maximum(length - (span - 1), 0), n)


def compute_mask(key: jax.Array, shape: tuple[int, int], prob: float, span: int, min_masks: int = 0,
                 lengths: jax.Array | None = None, name: str = "mask_length") -> jax.Array:
    """Random spans to mask, [B, S] bool, distributed as ``_compute_mask_indices(shape, prob, span, attention_mask,
    min_masks)``; ``lengths`` [B] int are the rows' real lengths (``attention_mask.sum(-1)``; None: all S).

    ``prob``, ``span`` and ``min_masks`` are static (config values); ``name`` starts the error for a span longer
    than the axis (transformers' ValueError).
    """
    B, S = shape
    if span < 1:
        raise InputError(f"{name}: should be >= 1, got {span}")
    if span > S:
        raise InputError(f"{name}: {span} is longer than the {S} positions it masks")
    # most spans any row can get (epsilon < 1): the static number of draws, of which each row keeps its own count
    most = min(max(int(prob * S / span) + 1, min_masks), S // span)
    if most == 0:
        return jnp.zeros((B, S), bool)
    key_eps, key_starts = jax.random.split(key)
    epsilon = jax.random.uniform(key_eps, ())
    lengths = jnp.full((B,), S, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    count = jnp.minimum(_span_count(lengths, epsilon, S, prob, span, min_masks), most)  # [B]
    # starts without replacement: the `count` highest of random priorities over the row's possible starts
    starts = S - span + 1
    priority = jax.random.bits(key_starts, (B, starts), jnp.uint32) >> 1  # 31 random bits: ties all but impossible
    priority = jnp.where(jnp.arange(starts) < (lengths - span + 1)[:, None], priority.astype(jnp.int32), -1)
    _, first = jax.lax.top_k(priority, most)  # [B, most], highest priority first
    kept = jnp.arange(most) < count[:, None]
    t = jnp.arange(S)[None, None, :]
    mask = jnp.any(kept[:, :, None] & (t >= first[:, :, None]) & (t < first[:, :, None] + span), axis=1)
    # transformers pads a row with no spans with index S - 1 (a padding position, since such a row is shorter than
    # S) whenever some row of this length S could have spans
    none = (count == 0) & (_span_count(jnp.int32(S), epsilon, S, prob, span, min_masks) > 0)
    return mask.at[:, S - 1].set(mask[:, S - 1] | none)


def spec_augment_masks(key: jax.Array, shape: tuple[int, int, int], lengths: jax.Array | None, *,
                       mask_time_prob: float, mask_time_length: int, mask_time_min_masks: int,
                       mask_feature_prob: float, mask_feature_length: int,
                       mask_feature_min_masks: int) -> tuple[jax.Array | None, jax.Array | None]:
    """(time mask [B, S] bool or None, feature mask [B, D] bool or None) for hidden states of ``shape`` [B, S, D],
    drawn as transformers' ``_mask_hidden_states`` in training mode: an axis whose probability is 0 is not masked.
    ``lengths`` [B]: real frames per row (None: every row is S frames)."""
    B, S, D = shape
    key_time, key_feature = jax.random.split(key)
    time = feature = None
    if mask_time_prob > 0:
        time = compute_mask(key_time, (B, S), mask_time_prob, mask_time_length, mask_time_min_masks, lengths,
                            "mask_time_length")
    if mask_feature_prob > 0:
        feature = compute_mask(key_feature, (B, D), mask_feature_prob, mask_feature_length, mask_feature_min_masks,
                               None, "mask_feature_length")
    return time, feature


def apply_masks(h: jax.Array, time_mask: jax.Array | None, feature_mask: jax.Array | None,
                masked_spec_embed: jax.Array | None) -> jax.Array:
    """Hidden states [B, S, D] with masked frames (``time_mask`` [B, S]) replaced by ``masked_spec_embed`` [D], then
    masked channels (``feature_mask`` [B, D]) zeroed in every frame, in transformers' order."""
    if time_mask is not None:
        h = jnp.where(time_mask[:, :, None], masked_spec_embed.astype(h.dtype), h)
    if feature_mask is not None:
        h = jnp.where(feature_mask[:, None, :], jnp.zeros((), h.dtype), h)
    return h

