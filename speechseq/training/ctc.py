"""An auxiliary CTC loss on the encoder's frames, for training only (hybrid CTC/attention, Watanabe et al. 2017,
as ESPnet trains its encoder-decoders): a linear head maps each frame to the decoder's vocabulary, the pad token
is CTC's blank, and the step minimises ``(1 - w) * attention + w * CTC`` (``StepConfig.ctc_weight`` = w). The
monotonic alignment CTC demands makes the encoder's frames line up with the text early in training, which a
cross-attention decoder learning from scratch otherwise finds slowly.

The head lives in the training state's params under ``HEAD`` ("ctc": "kernel" [D, V], "bias" [V], D the
encoder frames' width after ``enc_to_dec_proj``, V the decoder's vocabulary). It is not part of the model:
``model_params`` leaves it out of what is evaluated, saved and exported.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import optax

from speechseq.config import SpeechSeq2SeqConfig
from speechseq.errors import ConfigError

HEAD = "ctc"
DECAYS = {f"{HEAD}/kernel": True, f"{HEAD}/bias": False}  # AdamW weight decay, as the Trainer treats a Linear


def check(model_cfg: SpeechSeq2SeqConfig) -> None:
    """A ConfigError unless the model has a pad token to serve as the blank."""
    if model_cfg.pad_token_id is None:
        raise ConfigError("step.ctc_weight: the model has no pad_token_id to use as CTC's blank")


def init_head(model_cfg: SpeechSeq2SeqConfig, seed: int) -> dict[str, dict[str, jax.Array]]:
    """A fresh head ``{HEAD: {"kernel": [D, V], "bias": [V]}}`` float32: kernel ~ N(0, 0.02) (transformers'
    ``initializer_range`` default), bias 0. Deterministic in ``seed``."""
    check(model_cfg)
    d, v = model_cfg.decoder.hidden_size, model_cfg.decoder.vocab_size
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 0xC7C)
    return {HEAD: {"kernel": 0.02 * jax.random.normal(key, (d, v), jnp.float32), "bias": jnp.zeros((v,), jnp.float32)}}


def head_shapes(model_cfg: SpeechSeq2SeqConfig) -> dict[str, tuple[int, ...]]:
    """The head's param paths and shapes (for shardings, without allocating)."""
    d, v = model_cfg.decoder.hidden_size, model_cfg.decoder.vocab_size
    return {f"{HEAD}/kernel": (d, v), f"{HEAD}/bias": (v,)}


def model_params(params: Mapping) -> dict:
    """The model's params: ``params`` without the CTC head (unchanged when it has none)."""
    return {k: v for k, v in params.items() if k != HEAD}


def _targets(model_cfg: SpeechSeq2SeqConfig, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Labels [B, T] (-100 ignored) -> CTC targets [B, T] int32 and their paddings [B, T] float32 (1 = padding):
    the text tokens moved to the front in order, the special tokens the decoder needs but speech does not say
    (decoder start, BOS, EOS, pad) and -100 dropped."""
    special = labels == -100
    eos = model_cfg.eos_token_id
    ids = {model_cfg.decoder_start_token_id, model_cfg.pad_token_id, model_cfg.decoder.bos_token_id,
           *(eos if isinstance(eos, tuple) else (eos,))}
    for i in ids - {None}:
        special |= labels == i
    order = jnp.argsort(special, axis=1, stable=True)  # kept tokens first, in their order
    special = jnp.take_along_axis(special, order, axis=1)
    targets = jnp.where(special, 0, jnp.take_along_axis(labels, order, axis=1)).astype(jnp.int32)
    return targets, special.astype(jnp.float32)


def ctc_loss_sum(model_cfg: SpeechSeq2SeqConfig, head: Mapping[str, jax.Array], frames: jax.Array,
                 frame_mask: jax.Array | None, labels: jax.Array) -> jax.Array:
    """The CTC negative log-likelihood summed over the batch (float32 scalar), as ``torch.nn.functional.ctc_loss``
    with ``reduction="sum"``, ``zero_infinity=True`` and blank = ``pad_token_id``: frames [B, S, D] (the encoder's,
    after ``enc_to_dec_proj``) with frame mask [B, S] (True = real, None = all), labels [B, T]. A padding row (all
    labels -100), or one with more tokens than frames (no alignment exists), adds 0; a row whose only labels are
    special tokens is an empty transcript (all frames blank)."""
    logits = jnp.einsum("bsd,dv->bsv", frames.astype(jnp.float32), head["kernel"]) + head["bias"]
    frame_pad = jnp.zeros(frames.shape[:2], jnp.float32) if frame_mask is None else 1.0 - frame_mask.astype(
        jnp.float32)
    targets, target_pad = _targets(model_cfg, labels)
    per_row = optax.ctc_loss(logits, frame_pad, targets, target_pad, blank_id=model_cfg.pad_token_id)
    n_targets = jnp.sum(1.0 - target_pad, axis=1)
    # repeated tokens need a blank between them, so a row is feasible when frames >= tokens + repeats
    repeats = jnp.sum((targets[:, 1:] == targets[:, :-1]) * (1.0 - target_pad[:, 1:]), axis=1)
    feasible = jnp.any(labels != -100, axis=1) & (n_targets + repeats <= jnp.sum(1.0 - frame_pad, axis=1))
    return jnp.sum(jnp.where(feasible, per_row, 0.0))

