"""``generate``: encoder, cross-attention K/V and the token loop as one jitted XLA program per shape bucket.

One program per (batch, audio length, GenerationConfig, dtype): the encoder runs once per utterance, the
cross-attention keys/values are computed once per utterance (beams and samples share them), the self-attention
cache is preallocated for ``max_length`` and the loop stops when every sequence is done.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

from speechseq import model as M
from speechseq.config import SpeechSeq2SeqConfig
from speechseq.decoding import plan as decode_plan, search
from speechseq.decoding.config import GenerationConfig
from speechseq.layers.core import explicit_axes

TRACES = {"generate": 0}  # how many times ``generate`` was traced (compiled); tests read it


def generate(cfg: SpeechSeq2SeqConfig, params: Any, input_values: jax.Array, attention_mask: jax.Array | None,
             gen: GenerationConfig, key: jax.Array | None = None, dtype: Any = jnp.float32,
             decoder_params: Any = None, plan: Any = None) -> search.SearchResult:
    """Audio [B, N] (+ mask) -> SearchResult: sequences [B * num_return_sequences, max_length], scores, length.

    Pure: jit it with ``cfg``, ``gen``, ``dtype`` and ``plan`` static (``generate_jit`` does). ``plan``: how the
    decoder runs (``decoding.plan``; None: ``plan.choose`` for the platform of ``input_values``). ``decoder_params``
    is ``plan.prepare(cfg, params, dtype, rows)``, made once and passed to every call to save rearranging the
    decoder weights per call (``DecodeLayouts`` keeps it); without it each call does that itself.

    Shard it by passing sharded arrays (e.g. audio and mask split over a ``"data"`` mesh axis, params replicated):
    the result rows follow the audio's batch sharding. Meshes with explicit axes (``jax.make_mesh``'s default) run
    the search with those axes in auto mode, since its state is made inside the program.
    """
    TRACES["generate"] += 1
    if plan is None:
        plan = decode_plan.choose(platform_of(input_values), input_values.shape[0] * group_size(gen))
    explicit = explicit_axes(input_values)
    if not explicit:
        return _generate(cfg, params, input_values, attention_mask, gen, key, dtype, decoder_params, plan)
    sharding = jax.typeof(input_values).sharding
    batch_axis = sharding.spec[0] if sharding.spec else None
    out = search.SearchResult(*(jax.sharding.NamedSharding(sharding.mesh, spec)
                                for spec in (jax.P(batch_axis, None), jax.P(batch_axis), jax.P())))
    run = jax.sharding.auto_axes(lambda p, x, m, k, d: _generate(cfg, p, x, m, gen, k, dtype, d, plan),
                                 axes=explicit, out_sharding=out)
    return run(params, input_values, attention_mask, key, decoder_params)


def platform_of(x: Any) -> str:
    """The platform ("cpu", "gpu", "tpu") of array ``x``'s devices; JAX's default backend for numpy input or a
    tracer."""
    try:
        return next(iter(x.devices())).platform
    except Exception:  # numpy, tracers, ...
        return jax.default_backend()


def group_size(gen: GenerationConfig) -> int:
    """Decode rows per utterance: beams, or returned samples / sequences."""
    return gen.num_beams if gen.num_beams > 1 else gen.num_return_sequences


def memory_estimate(cfg: SpeechSeq2SeqConfig, gen: GenerationConfig, batch: int, dtype: Any = jnp.float32) -> int:
    """A lower bound on the bytes a ``generate`` call for ``batch`` utterances holds at once, from what grows with
    its rows (batch x beams, or x returned samples): the self-attention cache, the step's float32 logits and
    log-probs, the token tables (running and finished) and, in beam search, the step's self-attention mask over the
    grouped cache (rows x max_length x beams booleans: quadratic in beams). The encoder and the cross-attention,
    shared by an utterance's beams, are left out."""
    dec, group = cfg.decoder, group_size(gen)
    rows, length = batch * group, gen.max_length
    cache = 2 * dec.num_layers * rows * length * dec.hidden_size * jnp.dtype(dtype).itemsize
    logits = 2 * rows * dec.vocab_size * 4
    tokens = 2 * rows * length * 4
    mask = rows * length * group if gen.num_beams > 1 else 0
    return cache + logits + tokens + mask


def _generate(cfg: SpeechSeq2SeqConfig, params: Any, input_values: jax.Array, attention_mask: jax.Array | None,
              gen: GenerationConfig, key: jax.Array | None, dtype: Any, decoder_params: Any,
              plan: Any) -> search.SearchResult:
    dtype = jnp.dtype(dtype)
    enc_out = M.encode(cfg, params, input_values, attention_mask, dtype)
    enc = M.project(cfg, params, enc_out.last_hidden_state, dtype)
    batch = input_values.shape[0]
    group = group_size(gen)
    rows = batch * group
    if decoder_params is None:  # the barrier keeps XLA from folding the new layout back into the step's dots
        dec_p = jax.lax.optimization_barrier(plan.prepare(cfg, params, dtype, rows))
    else:
        dec_p = decoder_params
    cross = plan.cross(cfg, dec_p, enc, dtype)

    def step(last: jax.Array, position: jax.Array, cache: Any, holders: jax.Array | None = None) -> tuple:
        logits, cache = plan.step(cfg, dec_p, last[:, None], cross, enc_out.attention_mask, cache, position, dtype,
                                  holders)
        return logits[:, 0], cache

    if gen.num_beams == 1:  # greedy or sampling: rows never change places
        return search.sample(gen, step, plan.init_cache(cfg, rows, gen.max_length, dtype), rows, key)

    # beam search: a grouped cache that stays in place; reordering beams reorders only the table of which beam slot
    # holds each position's keys (``decode(cache_rows=)``)
    own = jnp.arange(rows, dtype=jnp.int32) % group

    def beam_step(last: jax.Array, position: jax.Array, state: tuple) -> tuple[jax.Array, tuple]:
        cache, holders = state
        logits, cache = step(last, position, cache, holders)
        return logits, (cache, jax.lax.dynamic_update_slice_in_dim(holders, own[:, None], position, axis=1))

    def reorder(state: tuple, idx: jax.Array) -> tuple:
        cache, holders = state
        return cache, holders[idx]

    cache = plan.init_cache(cfg, batch, gen.max_length, dtype, groups=group)
    holders = jnp.zeros((rows, gen.max_length), jnp.int32)
    return search.beam_search(gen, beam_step, reorder, (cache, holders), batch, key)


# XLA CPU's LLVM at optimisation level 1 instead of its default 3, for ``generate``'s program only. Its kernels are
# either library calls (YNNPACK dots and reductions, untouched by the level) or loops XLA's emitters vectorise before
# LLVM sees them, so level 1 runs them as fast (per-op profiles of the decode benchmark's program: the same time
# outside the dots, the same tokens) while its compile takes ~0.5 s less on 2 cores (beam-4: 3.3 -> 2.9 s, greedy
# 3.1 -> 2.6 s, medians of 6 alternating compiles). Level 0 compiles faster still but runs 50-90% slower.
CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def compiler_options(platform: str) -> dict | None:
    """The per-program XLA options ``generate_jit`` compiles with on ``platform`` ("cpu", "gpu", "tpu"):
    ``CPU_COMPILER_OPTIONS`` on CPU, unless ``XLA_FLAGS`` sets an optimisation level itself (the user's choice
    stands); none elsewhere."""
    if platform != "cpu" or "xla_backend_optimization_level" in os.environ.get("XLA_FLAGS", ""):
        return None
    return dict(CPU_COMPILER_OPTIONS)


class PlatformJit:
    """``jax.jit(fn, static_argnames=...)`` with ``compiler_options(platform)`` for the platform of ``fn``'s argument
    ``input_name``, passed by position or keyword (numpy input or a tracer: JAX's default backend); one jitted
    function per platform, each with jit's usual cache, called or lowered (``.lower``) like one."""

    def __init__(self, fn: Callable, static_argnames: tuple[str, ...], input_name: str):
        self._fn, self._static, self._name = fn, static_argnames, input_name
        self._index = list(inspect.signature(fn).parameters).index(input_name)
        self._jits: dict[str, Callable] = {}

    def _jit(self, args: tuple, kwargs: dict) -> Callable:
        platform = platform_of(args[self._index] if len(args) > self._index else kwargs.get(self._name))
        if platform not in self._jits:
            self._jits[platform] = jax.jit(self._fn, static_argnames=self._static,
                                           compiler_options=compiler_options(platform))
        return self._jits[platform]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._jit(args, kwargs)(*args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        return self._jit(args, kwargs).lower(*args, **kwargs)


generate_jit = PlatformJit(generate, ("cfg", "gen", "dtype", "plan"), "input_values")
