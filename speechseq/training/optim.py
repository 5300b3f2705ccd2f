"""The optimizer of transformers' ``Trainer`` in optax: AdamW whose weight decay skips what ``Trainer`` skips, its
learning-rate schedules, torch's ``clip_grad_norm_``, and frozen subtrees that get no optimizer state and no gradient.

    tx = optimizer(model_cfg, OptimConfig(learning_rate=3e-4, warmup_steps=500, weight_decay=0.01))
    trainable, frozen = partition(params, ("feature_encoder",))
    opt_state = tx.init(trainable)

Params are the model's nested dicts; a parameter is named by its path ("decoder/layers/self_attn/q/kernel", as in
``speechseq.checkpoints.table``), and decisions that transformers takes by parameter name are taken on the Hugging Face
name the weight table gives that path.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from speechseq.checkpoints.table import flatten, unflatten
from speechseq.config import SpeechSeq2SeqConfig, check_number
from speechseq.errors import ConfigError
from speechseq.model import weight_rules
from speechseq.training import ctc

SCHEDULES = ("linear", "cosine", "constant")
FREEZE = ("feature_encoder", "encoder", "decoder", "all_but_adapter_cross_attention")

# What "all_but_adapter_cross_attention" trains: the parts a warm start initialises fresh (the adapter, every
# decoder layer's cross-attention with its norm, the projection between encoder and decoder widths).
_ADAPTER_CROSS_ATTENTION = ("encoder/adapter/", "decoder/layers/cross_attn/", "decoder/layers/cross_norm/",
                            "enc_to_dec_proj/")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW, schedule, clipping and freezing, with transformers ``TrainingArguments``' meanings and defaults
    (``adam_beta1`` is ``adam_b1`` here, ``lr_scheduler_type`` is ``schedule``).

    ``schedule``: the decay after ``warmup_steps`` of linear warm-up from 0; "linear" and "cosine" reach 0 at
    ``total_steps`` (``get_linear_schedule_with_warmup`` / ``get_cosine_schedule_with_warmup``), "constant" stays at
    ``learning_rate`` (``get_constant_schedule_with_warmup``). Step 0 (the first update) uses ``schedule(0)``, as
    the Trainer does: 0 when there is a warm-up.
    ``weight_decay``: decoupled (AdamW); biases and norm parameters are excluded as ``Trainer`` excludes them.
    ``max_grad_norm``: global-norm clipping as torch's ``clip_grad_norm_``; None turns it off.
    ``freeze``: parts whose params stay fixed, get no optimizer state and no gradient computation: any of
    "feature_encoder" (the conv stack: ``freeze_feature_encoder``), "encoder" (all of ``params["encoder"]``, adapter
    included), "decoder" (all of ``params["decoder"]``; ``enc_to_dec_proj`` belongs to neither), or alone
    "all_but_adapter_cross_attention" (train only the adapter, the decoder's cross-attention and its norm, and
    ``enc_to_dec_proj``)."""

    learning_rate: float = 1e-4
    schedule: str = "linear"
    warmup_steps: int = 0
    total_steps: int = 1000
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    freeze: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_number(self.learning_rate, "optim.learning_rate", integer=False, low=0)
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule: unknown schedule {self.schedule!r}; choose one of {list(SCHEDULES)}")
        check_number(self.warmup_steps, "optim.warmup_steps", low=0)
        check_number(self.total_steps, "optim.total_steps", low=1)
        check_number(self.weight_decay, "optim.weight_decay", integer=False, low=0)
        for name in ("adam_b1", "adam_b2"):  # torch's range: [0, 1)
            if check_number(getattr(self, name), f"optim.{name}", integer=False, low=0, high=1) == 1:
                raise ConfigError(f"optim.{name} should be a finite number in [0, 1), got 1")
        check_number(self.adam_eps, "optim.adam_eps", integer=False, low=0)
        check_number(self.max_grad_norm, "optim.max_grad_norm", integer=False, low=0, above=True, optional=True)
        if isinstance(self.freeze, str) or not all(isinstance(f, str) for f in self.freeze):
            raise ConfigError(f"optim.freeze: expected a list of part names, got {self.freeze!r:.80}")
        object.__setattr__(self, "freeze", tuple(self.freeze))  # a list from a config file, kept hashable
        unknown = [f for f in self.freeze if f not in FREEZE]
        if unknown:
            raise ConfigError(f"optim.freeze: unknown part {unknown[0]!r}; choose from {list(FREEZE)}")
        if "all_but_adapter_cross_attention" in self.freeze and len(self.freeze) > 1:
            raise ConfigError("optim.freeze: 'all_but_adapter_cross_attention' already freezes everything else; "
                              "list it alone")


# ----------------------------------------------------------------------------------------------------------------------
# Learning-rate schedules


def learning_rate_schedule(optim: OptimConfig) -> Callable[[jax.Array], jax.Array]:
    """The learning rate of optimizer step ``count`` (0 for the first update) as transformers' schedules give it:
    int scalar -> float32 scalar. ``lr_lambda`` of ``get_{linear,cosine,constant}_schedule_with_warmup`` (cosine
    with ``num_cycles=0.5``), times ``learning_rate``."""
    lr, warm, total = optim.learning_rate, optim.warmup_steps, optim.total_steps

    def rate(count: jax.Array) -> jax.Array:
        step = jnp.asarray(count, jnp.float32)
        warmup = step / max(1, warm)
        if optim.schedule == "constant":
            decay = jnp.ones_like(step)
        else:
            progress = (step - warm) / max(1, total - warm)
            if optim.schedule == "linear":
                decay = jnp.maximum(0.0, (total - step) / max(1, total - warm))
            else:  # cosine, half a cycle over the decay (past total_steps it rises again, as in transformers)
                decay = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(math.pi * progress)))
        return lr * jnp.where(step < warm, warmup, decay)

    return rate


# ----------------------------------------------------------------------------------------------------------------------
# Weight decay: the Trainer's exclusions


# ``Trainer.get_decay_parameter_names``: no decay for parameters of ``nn.LayerNorm`` modules, nor for names (any
# module level, lower-cased) matching these patterns. Searching the full dotted name is the same test: every pattern
# is anchored at a dot, the start or the end, or not at all.
_NO_DECAY_NAME = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def decay_mask(model_cfg: SpeechSeq2SeqConfig) -> Callable[[Mapping], dict]:
    """A function of a (sub)tree of params -> the same tree of bools, True where AdamW decays the weight, as
    ``Trainer.get_decay_parameter_names`` decides for the Hugging Face parameter the path maps to (the weight table;
    a fused HF tensor decides for all its paths). Our norm layers (``scale`` and ``bias`` of the table's norm
    rules) are the ``nn.LayerNorm`` modules excluded by type; GroupNorm, which transformers does not exclude by
    type, is named ``layer_norm`` in every family here, so its name excludes it. Buffers (``Rule.buffer``: running
    statistics, rotary tables) are not torch parameters, so no optimizer touches them: no decay, and their gradient
    is 0."""
    decays: dict[str, bool] = {}
    for r in weight_rules(model_cfg):
        name = r.names(0)[0].lower()
        for path in r.paths:
            decays[path] = not (r.buffer or path.endswith("/scale") or _NO_DECAY_NAME.search(name))
    decays.update(ctc.DECAYS)  # the training-only CTC head, when the state has one

    def mask(params: Mapping) -> dict:
        return unflatten({path: decays[path] for path in flatten(params)})

    return mask


# ----------------------------------------------------------------------------------------------------------------------
# Freezing


def is_trainable(path: str, freeze: tuple[str, ...]) -> bool:
    """Whether the param at ``path`` is updated under ``freeze`` (see ``OptimConfig.freeze``)."""
    if "all_but_adapter_cross_attention" in freeze:
        return path.startswith(_ADAPTER_CROSS_ATTENTION)
    frozen = {"feature_encoder": "encoder/feature_encoder/", "encoder": "encoder/", "decoder": "decoder/"}
    return not any(path.startswith(frozen[f]) for f in freeze)


def partition(params: Mapping, freeze: tuple[str, ...]) -> tuple[dict, dict]:
    """Split the param tree into (trainable, frozen) trees by ``freeze``; ``merge`` joins them again. A ConfigError
    when a named part has no params (this encoder has no feature encoder) or nothing is left to train."""
    flat = flatten(params)
    for f in freeze:
        if f != "all_but_adapter_cross_attention" and all(is_trainable(p, (f,)) for p in flat):
            raise ConfigError(f"optim.freeze: this model has no {f.replace('_', ' ')} to freeze")
    trainable = {p: v for p, v in flat.items() if is_trainable(p, freeze)}
    if not trainable:
        raise ConfigError(f"optim.freeze: {list(freeze)} leaves no parameter to train")
    return unflatten(trainable), unflatten({p: v for p, v in flat.items() if p not in trainable})


def merge(*trees: Mapping) -> dict:
    """One param tree from disjoint parts (``partition``'s inverse)."""
    return unflatten({p: v for tree in trees for p, v in flatten(tree).items()})


# ----------------------------------------------------------------------------------------------------------------------
# The optimizer


def clip_grad_norm(max_norm: float) -> optax.GradientTransformation:
    """torch's ``clip_grad_norm_``: every gradient times ``min(max_norm / (global_norm + 1e-6), 1)`` (optax's
    ``clip_by_global_norm`` has no 1e-6 and divides instead)."""

    def update(grads: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
        coef = jnp.minimum(max_norm / (optax.tree.norm(grads) + 1e-6), 1.0)
        return jax.tree.map(lambda g: (g * coef).astype(g.dtype), grads), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def optimizer(model_cfg: SpeechSeq2SeqConfig, optim: OptimConfig) -> optax.GradientTransformation:
    """The Trainer's update for the trainable params (``partition``): clip as ``clip_grad_norm_``, then
    ``torch.optim.AdamW`` (decoupled decay, bias-corrected moments, eps outside the square root) with weight decay
    on ``decay_mask``'s params and the learning rate of ``learning_rate_schedule`` (optax counts updates from 0)."""
    adamw = optax.adamw(learning_rate_schedule(optim), b1=optim.adam_b1, b2=optim.adam_b2, eps=optim.adam_eps,
                        weight_decay=optim.weight_decay, mask=decay_mask(model_cfg))
    if optim.max_grad_norm is None:
        return adamw
    return optax.chain(clip_grad_norm(optim.max_grad_norm), adamw)
