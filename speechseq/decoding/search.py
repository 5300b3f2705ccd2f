"""Greedy, sampling and beam search over a step function, as single ``lax.while_loop`` programs.

The samplers know nothing of the model: ``step(last_tokens [R], position, cache) -> (logits [R, V], cache)`` feeds
one token per row at ``position`` and returns next-token logits. ``reorder(cache, rows [R]) -> cache`` gathers cache
rows after beams are reselected. Shapes: B utterances, K beams, R = B * K rows, Tm = max_length, V vocabulary.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from speechseq.decoding import processors
from speechseq.decoding.config import GenerationConfig

Step = Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
Reorder = Callable[[Any, jax.Array], Any]
NEG = -1.0e9  # transformers' "impossible" beam score


class SearchResult(NamedTuple):
    sequences: jax.Array  # [R, Tm] start token, generated tokens, fill token after EOS
    scores: jax.Array  # [R] beam scores (length-penalised sum of log-probs); zeros for greedy / sampling
    length: jax.Array  # scalar: columns of ``sequences`` that are in use


def _is_eos(gen: GenerationConfig, tokens: jax.Array) -> jax.Array:
    if not gen.eos_token_id:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.array(gen.eos_token_id))


def _start(gen: GenerationConfig, rows: int) -> jax.Array:
    tokens = jnp.full((rows, gen.max_length), gen.fill_token, jnp.int32)
    return tokens.at[:, 0].set(gen.decoder_start_token_id)


def sample(gen: GenerationConfig, step: Step, cache: Any, rows: int, key: jax.Array | None = None) -> SearchResult:
    """Greedy search (``do_sample=False``) or multinomial sampling, one row per sequence."""

    class State(NamedTuple):
        cur_len: jax.Array
        tokens: jax.Array
        cache: Any
        done: jax.Array

    def cond(s: State) -> jax.Array:
        return (s.cur_len < gen.max_length) & ~jnp.all(s.done)

    def body(s: State) -> State:
        last = jax.lax.dynamic_index_in_dim(s.tokens, s.cur_len - 1, axis=1, keepdims=False)
        logits, cache = step(last, s.cur_len - 1, s.cache)
        scores = processors.process(gen, logits.astype(jnp.float32), s.tokens, s.cur_len)
        if gen.do_sample:
            scores = processors.warp(gen, scores)
            nxt = jax.random.categorical(jax.random.fold_in(key, s.cur_len), scores, axis=-1)
        else:
            nxt = jnp.argmax(scores, axis=-1)
        nxt = jnp.where(s.done, gen.fill_token, nxt).astype(jnp.int32)
        tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens, nxt[:, None], s.cur_len, axis=1)
        return State(s.cur_len + 1, tokens, cache, s.done | _is_eos(gen, nxt))

    s = jax.lax.while_loop(cond, body, State(jnp.int32(1), _start(gen, rows), cache, jnp.zeros(rows, bool)))
    return SearchResult(s.tokens, jnp.zeros(rows, jnp.float32), s.cur_len)


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, K, ...], idx [B, J] -> [B, J, ...]."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def beam_search(gen: GenerationConfig, step: Step, reorder: Reorder, cache: Any, batch: int,
                key: jax.Array | None = None) -> SearchResult:
    """transformers' vectorised beam search (``num_beams`` K, ``length_penalty``, ``early_stopping``), returning the
    best ``num_return_sequences`` per utterance: [B * num_return_sequences, Tm]."""
    K, Tm, lp, es = gen.num_beams, gen.max_length, gen.length_penalty, gen.early_stopping
    keep = max(2, 1 + len(gen.eos_token_id)) * K  # candidates kept so that K can go on after some hit EOS
    top_k_mask = jnp.arange(keep) < K
    prompt = 1

    class State(NamedTuple):
        cur_len: jax.Array
        running: jax.Array  # [B, K, Tm]
        running_scores: jax.Array  # [B, K] sum of log-probs
        finished: jax.Array  # [B, K, Tm]
        finished_scores: jax.Array  # [B, K] length-penalised
        finished_len: jax.Array  # [B, K] generated tokens of each finished hypothesis
        is_finished: jax.Array  # [B, K]
        open_: jax.Array  # [B, 1] the best running beam could still beat the worst finished one
        hit: jax.Array  # [B, keep] candidates of the last step that hit a stopping criterion
        cache: Any

    def cond(s: State) -> jax.Array:
        improvement_possible = jnp.any(s.open_)
        exists_open_beam = ~(jnp.all(s.is_finished) & (es is True))
        valid_continuations = ~jnp.all(s.hit)
        first = s.cur_len == prompt
        return (s.cur_len < Tm) & (first | (improvement_possible & exists_open_beam & valid_continuations))

    def body(s: State) -> State:
        cur = s.cur_len
        flat = s.running.reshape(batch * K, Tm)
        last = jax.lax.dynamic_index_in_dim(flat, cur - 1, axis=1, keepdims=False)
        logits, cache = step(last, cur - 1, s.cache)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        logp = processors.process(gen, logp, flat, cur)
        V = logp.shape[-1]
        acc = (logp.reshape(batch, K, V) + s.running_scores[:, :, None]).reshape(batch, K * V)
        if gen.do_sample:
            logw = processors.warp(gen, acc, min_keep=len(gen.eos_token_id) + 1)
            g = jax.random.gumbel(jax.random.fold_in(key, cur), logw.shape)
            idx = processors.top_k(jnp.where(jnp.isneginf(logw), -jnp.inf, logw + g), keep)[1]
            top = jnp.take_along_axis(acc, idx, axis=1)
            order = jnp.argsort(-top, axis=1)
            top, idx = jnp.take_along_axis(top, order, axis=1), jnp.take_along_axis(idx, order, axis=1)
        else:
            top, idx = processors.top_k(acc, keep)  # [B, keep]
        beam, tok = idx // V, (idx % V).astype(jnp.int32)
        cand = _gather(s.running, beam)  # [B, keep, Tm]
        cand = jax.lax.dynamic_update_slice_in_dim(cand, tok[:, :, None], cur, axis=2)
        hit = _is_eos(gen, tok) | (cur + 1 >= Tm)

        # running beams for the next step: best K that did not stop
        run_scores = top + hit.astype(jnp.float32) * NEG
        nxt = jax.lax.top_k(run_scores, K)[1]
        running, running_scores = _gather(cand, nxt), _gather(run_scores, nxt)
        rows = (jnp.arange(batch)[:, None] * K + _gather(beam, nxt)).reshape(-1)

        # finished hypotheses: merge the ones that just stopped (among the top K) with the kept ones
        just = hit & top_k_mask[None, :]
        fin = top / ((cur + 1 - prompt).astype(jnp.float32) ** lp)
        fin = fin + (jnp.all(s.is_finished, axis=-1, keepdims=True) & (es is True)).astype(jnp.float32) * NEG
        fin = fin + (~s.open_).astype(jnp.float32) * NEG
        fin = fin + (~just).astype(jnp.float32) * NEG
        m_scores = jnp.concatenate([s.finished_scores, fin], axis=1)
        best = jax.lax.top_k(m_scores, K)[1]
        finished = _gather(jnp.concatenate([s.finished, cand], axis=1), best)
        finished_scores = _gather(m_scores, best)
        finished_len = _gather(jnp.concatenate([s.finished_len, jnp.broadcast_to(cur + 1 - prompt, hit.shape)],
                                               axis=1), best)
        is_finished = _gather(jnp.concatenate([s.is_finished, just], axis=1), best)

        cur = cur + 1
        if es == "never" and lp > 0.0:
            best_len = jnp.float32(Tm - prompt)
        else:
            best_len = (cur - prompt).astype(jnp.float32)
        best_possible = running_scores[:, :1] / best_len ** lp
        worst = jnp.where(is_finished, jnp.min(finished_scores, axis=1, keepdims=True), NEG)
        open_ = s.open_ & jnp.any(best_possible > worst, axis=-1, keepdims=True)
        return State(cur, running, running_scores, finished, finished_scores, finished_len, is_finished, open_, hit,
                     reorder(cache, rows))

    start = jnp.broadcast_to(_start(gen, 1)[None], (batch, K, Tm))
    init = State(
        cur_len=jnp.int32(prompt),
        running=start,
        running_scores=jnp.zeros((batch, K), jnp.float32).at[:, 1:].set(NEG),
        finished=start,
        finished_scores=jnp.full((batch, K), NEG, jnp.float32),
        finished_len=jnp.zeros((batch, K), jnp.int32),
        is_finished=jnp.zeros((batch, K), bool),
        open_=jnp.ones((batch, 1), bool),
        hit=jnp.zeros((batch, keep), bool),
        cache=cache,
    )
    s = jax.lax.while_loop(cond, body, init)
    R = gen.num_return_sequences
    sequences = s.finished[:, :R].reshape(batch * R, Tm)
    length = prompt + jnp.max(s.finished_len[:, :R])
    return SearchResult(sequences, s.finished_scores[:, :R].reshape(-1), length)
