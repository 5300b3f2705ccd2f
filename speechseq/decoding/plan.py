"""Decode plans: how ``generate``'s token loop runs the decoder, chosen once at ``generate``'s entry.

A plan is a static (hashable) object with four methods: ``prepare`` (the decoder's weights in the plan's layout,
made once per model and kept, ``DecodeLayouts``), ``cross`` (cross-attention K/V once per utterance),
``init_cache`` and ``step`` (one token for every row). Two plans:

- ``XlaPlan``, for GPUs and TPUs: the model's own decoder (``decoders.transformer.decode``) with its static cache,
  the layers under one ``lax.scan`` over the stacked params, so compile time does not grow with depth; no copy of
  the weights.
- ``CpuPlan`` (``decoding/cpu.py``), for CPUs: weights in a layout of their own, C++ kernels, an unrolled layer loop.

``SPEECHSEQ_DECODE_PLAN=xla`` or ``=cpu`` overrides the choice (benchmarks, tests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import jax

from speechseq import kernels
from speechseq.config import SpeechSeq2SeqConfig
from speechseq.decoders import transformer
from speechseq.decoders.transformer import CrossKV, KVCache
from speechseq.decoding.cpu import CpuPlan
from speechseq.errors import InputError


@dataclass(frozen=True)
class XlaPlan:
    """The model's own decoder under ``lax.scan`` (see the module's docstring)."""

    name = "xla"

    def prepare(self, cfg: SpeechSeq2SeqConfig, params: Any, dtype: Any, rows: int | None) -> Any:
        return params["decoder"]

    def cross(self, cfg: SpeechSeq2SeqConfig, dec_p: Any, enc: jax.Array, dtype: Any) -> CrossKV:
        return transformer.cross_kv(cfg.decoder, dec_p, enc, dtype)

    def init_cache(self, cfg: SpeechSeq2SeqConfig, batch: int, max_len: int, dtype: Any, groups: int = 1) -> KVCache:
        return transformer.init_cache(cfg.decoder, batch, max_len, dtype, groups)

    def step(self, cfg: SpeechSeq2SeqConfig, dec_p: Any, ids: jax.Array, cross: CrossKV, enc_mask: jax.Array | None,
             cache: KVCache, start: jax.Array, dtype: Any, cache_rows: jax.Array | None = None):
        return transformer.decode(cfg.decoder, dec_p, ids, cross, enc_mask, cache=cache, start=start, dtype=dtype,
                                  cache_rows=cache_rows)


PLANS = ("cpu", "xla")


def choose(platform: str, rows: int) -> XlaPlan | CpuPlan:
    """The plan for decoding ``rows`` rows (batch x beams, or x returned sequences) on ``platform`` ("cpu", "gpu",
    "tpu"): ``CpuPlan`` on CPU (its weights packed for the kernels up to ``kernels.MAX_ROWS`` rows), ``XlaPlan``
    elsewhere; ``SPEECHSEQ_DECODE_PLAN`` overrides."""
    forced = os.environ.get("SPEECHSEQ_DECODE_PLAN", "").strip().lower()
    if forced and forced not in PLANS:
        raise InputError(f"SPEECHSEQ_DECODE_PLAN: {forced!r} is not a decode plan; choose one of {list(PLANS)}")
    if (forced or platform) == "cpu":
        return CpuPlan(packed=rows <= kernels.MAX_ROWS and kernels.available())
    return XlaPlan()
