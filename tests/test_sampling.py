"""Sampling and the search functions without a model: seeds on a real model, empirical token frequencies of
``search.sample`` against the warped softmax, warpers and logits processors against transformers' classes, and a
hand-checked ``beam_search`` over fake fixed log-probs (t5x ``decoding_test`` style)."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers.generation.logits_process as LP

import hf_factory as F
from speechseq import SpeechSeq2Seq
from speechseq.decoding import processors, search
from speechseq.decoding.config import GenerationConfig
from speechseq.decoding.generate import TRACES

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- on a model ---------------------------------------------------------------------------------------------------

X, MASK = F.audio_batch((1600, 1100, 1400))
SAMPLE = dict(do_sample=True, top_k=0, temperature=1.5, max_new_tokens=8, eos_token_id=2, pad_token_id=1,
              decoder_start_token_id=0)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("sampling-model")
    F.decoding_seq2seq("w2v-group", "bert").save_pretrained(path)
    return SpeechSeq2Seq.from_pretrained(path)


def test_same_seed_same_tokens_other_seed_other_tokens(model):
    kwargs = dict(SAMPLE, num_return_sequences=2)
    a = model.generate(X, MASK, seed=0, **kwargs)
    before = TRACES["generate"]
    assert a.shape[0] == 3 * 2 and a.dtype == np.int32 and np.all(a[:, 0] == 0)
    np.testing.assert_array_equal(model.generate(X, MASK, seed=0, **kwargs), a)
    np.testing.assert_array_equal(model.generate(X, MASK, key=jax.random.key(0), **kwargs), a)
    b = model.generate(X, MASK, seed=1, **kwargs)
    assert not np.array_equal(a[:, :min(a.shape[1], b.shape[1])], b[:, :min(a.shape[1], b.shape[1])])
    assert TRACES["generate"] == before  # the key is an argument, not a constant: no recompilation per seed


def test_top_k_1_sampling_is_greedy(model):
    greedy = model.generate(X, MASK, **{**SAMPLE, "do_sample": False})
    sampled = model.generate(X, MASK, seed=3, **{**SAMPLE, "top_k": 1, "temperature": 0.5})
    np.testing.assert_array_equal(sampled, greedy)


# -- token frequencies of search.sample with fixed logits ---------------------------------------------------------

LOGITS = np.array([[2.0, 1.5, 1.0, 0.3, -0.5, -1.0],
                   [-1.0, 0.0, 2.5, 0.2, 2.4, 1.0]], np.float32)  # two rows alternate over the batch
ROWS = 20000


def warp_settings(temperature, top_k, top_p, max_length=2, **kw) -> GenerationConfig:
    return GenerationConfig(max_length=max_length, do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                            decoder_start_token_id=0, pad_token_id=0, **kw)


def hf_warp(scores: np.ndarray, temperature, top_k, top_p, min_keep=1) -> np.ndarray:
    """transformers' warpers in generate's order (temperature, top-k, top-p)."""
    out = torch.from_numpy(np.array(scores, np.float32))
    ids = torch.zeros((out.shape[0], 1), dtype=torch.long)
    if temperature != 1.0:
        out = LP.TemperatureLogitsWarper(temperature)(ids, out)
    if top_k:
        out = LP.TopKLogitsWarper(top_k, min_tokens_to_keep=min_keep)(ids, out)
    if top_p < 1.0:
        out = LP.TopPLogitsWarper(top_p, min_tokens_to_keep=min_keep)(ids, out)
    return out.numpy()


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 4, 1.0),
                                                       (1.0, 0, 0.9), (0.7, 4, 0.9), (1.3, 3, 0.8)])
def test_sampled_frequencies_follow_the_warped_softmax(temperature, top_k, top_p):
    """Two sampled tokens per row from fixed logits (the same at both steps): each column follows the warped
    softmax, and the two draws are independent (a key reused across steps would repeat the first draw)."""
    gen = warp_settings(temperature, top_k, top_p, max_length=3)
    logits = jnp.asarray(np.tile(LOGITS, (ROWS // 2, 1)))

    def step(last, position, cache):
        return logits, cache

    out = search.sample(gen, step, jnp.zeros(()), ROWS, jax.random.key(0))
    tokens = np.asarray(out.sequences)
    assert tokens.shape == (ROWS, 3) and np.all(tokens[:, 0] == 0)
    want = softmax(hf_warp(LOGITS, temperature, top_k, top_p))
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(processors.warp(gen, jnp.asarray(LOGITS)))), want,
                               rtol=1e-5, atol=1e-6)
    for r in range(2):
        for col in (1, 2):
            got = np.bincount(tokens[r::2, col], minlength=LOGITS.shape[1]) / (ROWS // 2)
            assert np.all(got[want[r] == 0] == 0), (got, want[r])  # removed by top-k / top-p: never drawn
            assert np.abs(got - want[r]).max() < 0.02, (col, got, want[r])
        same = np.mean(tokens[r::2, 1] == tokens[r::2, 2])
        assert abs(same - np.sum(want[r] ** 2)) < 0.02, (same, np.sum(want[r] ** 2))
    if top_k or top_p < 1:
        assert np.any(want == 0)  # the case does remove tokens


# -- warpers and processors against transformers' classes -----------------------------------------------------------

WARP_CASES = list(itertools.product([1.0, 0.7, 1.6], [0, 1, 5, 40, 60], [1.0, 0.9, 0.5, 0.05], [1, 3]))


def test_warp_matches_transformers_warpers():
    rng = np.random.default_rng(0)
    scores = rng.normal(0, 2, (16, 50)).astype(np.float32)
    for temperature, top_k, top_p, min_keep in WARP_CASES:
        gen = warp_settings(temperature, top_k, top_p)
        got = np.asarray(processors.warp(gen, jnp.asarray(scores), min_keep=min_keep))
        want = hf_warp(scores, temperature, top_k, top_p, min_keep)
        case = (temperature, top_k, top_p, min_keep)
        np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg=str(case))
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=str(case))


def test_top_k_keeps_ties_like_transformers():
    scores = np.array([[3.0, 1.0, 2.0, 2.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0, 5.0, 1.0]], np.float32)
    for k in (1, 2, 3):
        got = np.asarray(processors.warp(warp_settings(1.0, k, 1.0), jnp.asarray(scores)))
        np.testing.assert_array_equal(got, hf_warp(scores, 1.0, k, 1.0))


def test_chunked_top_k_equals_lax_top_k_with_ties_and_neg_inf():
    """``processors.top_k`` (beam search's and the top-k warper's) must pick what ``lax.top_k`` picks, in its
    order, lower index first on ties: few distinct values and many -inf make ties at every boundary."""
    rng = np.random.default_rng(3)
    chunked = 0
    for n, k in [(9, 1), (17, 3), (183, 6), (244, 8), (1000, 9), (4000, 50), (4097, 8), (122088, 8)]:
        x = rng.integers(-3, 3, (3, n)).astype(np.float32)
        x[rng.random((3, n)) < 0.4] = -np.inf
        x[2, :] = -np.inf  # a row with nothing finite
        x[1, -k:] = 5.0  # the winners in the last (shorter) chunk
        want_values, want_idx = jax.lax.top_k(jnp.asarray(x), k)
        got_values, got_idx = jax.jit(processors.top_k, static_argnums=1)(jnp.asarray(x), k)
        np.testing.assert_array_equal(got_values, want_values, err_msg=f"n={n} k={k}")
        np.testing.assert_array_equal(got_idx, want_idx, err_msg=f"n={n} k={k}")
        chunked += -(-n // (math.isqrt(n - 1) + 1)) > k
    assert chunked >= 6  # most cases take the chunked path, not the fallback


V, T, R = 6, 10, 8
EOS = (1, 4)
HISTORY = np.random.default_rng(1).integers(0, 4, (R, T))  # a small alphabet, so n-grams repeat
SCORES = np.random.default_rng(2).normal(0, 2, (R, V)).astype(np.float32)


def settings(**kw) -> GenerationConfig:
    return GenerationConfig(max_length=T, decoder_start_token_id=0, pad_token_id=0, **kw)


PROCESSOR_CASES = {
    "repetition_penalty": (settings(repetition_penalty=1.3), lambda: [LP.RepetitionPenaltyLogitsProcessor(1.3)]),
    "repetition_penalty_below_1": (settings(repetition_penalty=0.7),
                                   lambda: [LP.RepetitionPenaltyLogitsProcessor(0.7)]),
    **{f"no_repeat_ngram_{n}": (settings(no_repeat_ngram_size=n),
                                lambda n=n: [LP.NoRepeatNGramLogitsProcessor(n)]) for n in (1, 2, 3)},
    "min_length": (settings(min_length=5, eos_token_id=EOS), lambda: [LP.MinLengthLogitsProcessor(5, list(EOS))]),
    "min_new_tokens": (settings(min_new_tokens=3, eos_token_id=EOS),
                       lambda: [LP.MinNewTokensLengthLogitsProcessor(1, 3, list(EOS))]),
    "forced_bos": (settings(forced_bos_token_id=3), lambda: [LP.ForcedBOSTokenLogitsProcessor(3)]),
    "forced_eos": (settings(forced_eos_token_id=EOS), lambda: [LP.ForcedEOSTokenLogitsProcessor(T, list(EOS))]),
    "suppress_tokens": (settings(suppress_tokens=(2, 5)), lambda: [LP.SuppressTokensLogitsProcessor([2, 5])]),
    "begin_suppress_tokens": (settings(begin_suppress_tokens=(2, 5)),
                              lambda: [LP.SuppressTokensAtBeginLogitsProcessor([2, 5], 1)]),
    # transformers suppresses at the step after a forced BOS (begin_index 2), not at the forced step itself
    "begin_suppress_tokens_after_forced_bos": (settings(forced_bos_token_id=3, begin_suppress_tokens=(2, 5)),
                                               lambda: [LP.ForcedBOSTokenLogitsProcessor(3),
                                                        LP.SuppressTokensAtBeginLogitsProcessor([2, 5], 2)]),
    "all_in_order": (settings(repetition_penalty=1.3, no_repeat_ngram_size=2, min_length=4, min_new_tokens=2,
                              eos_token_id=EOS, forced_eos_token_id=(4,), suppress_tokens=(5,)),
                     lambda: [LP.RepetitionPenaltyLogitsProcessor(1.3), LP.NoRepeatNGramLogitsProcessor(2),
                              LP.MinLengthLogitsProcessor(4, list(EOS)),
                              LP.MinNewTokensLengthLogitsProcessor(1, 2, list(EOS)),
                              LP.ForcedEOSTokenLogitsProcessor(T, [4]), LP.SuppressTokensLogitsProcessor([5])]),
}


@pytest.mark.parametrize("case", list(PROCESSOR_CASES))
def test_processors_match_transformers(case):
    gen, make_hf = PROCESSOR_CASES[case]
    process = jax.jit(processors.process, static_argnums=0)
    changed = False
    for cur_len in range(1, T):
        # columns from cur_len on hold junk (not yet generated): the processors must not read them
        got = np.asarray(process(gen, jnp.asarray(SCORES), jnp.asarray(HISTORY, jnp.int32), jnp.int32(cur_len)))
        want = torch.from_numpy(SCORES.copy())
        for proc in make_hf():
            want = proc(torch.from_numpy(HISTORY[:, :cur_len]), want)
        want = want.numpy()
        np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg=f"cur_len={cur_len}")
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=f"cur_len={cur_len}")
        changed |= not np.array_equal(want, SCORES)
    assert changed  # the histories exercise the processor


# -- beam search over fake log-probs ------------------------------------------------------------------------------

START, STOP, A, B, PADTOK = 0, 1, 2, 3, 4
# P(next | last) over [start, eos, A, B, pad]; start and pad are never produced
MARKOV = np.array([
    [0, .1, .5, .4, 0],  # after start
    [0, .2, .4, .4, 0],  # after eos (never continued)
    [0, .3, .33, .37, 0],  # after A
    [0, .9, .05, .05, 0],  # after B
    [0, .2, .4, .4, 0],  # after pad (never continued)
])
LOG_MARKOV = jnp.asarray(np.log(np.maximum(MARKOV, 1e-30)), jnp.float32)


def markov_step(last, position, cache):
    return LOG_MARKOV[last], cache


@pytest.mark.parametrize("length_penalty, scores", [
    (1.0, [np.log(.4 * .9) / 2, np.log(.5 * .37 * .9) / 3]),  # mean log-prob: B-eos beats A-B-eos beats the rest
    (0.0, [np.log(.4 * .9), np.log(.5 * .37 * .9)]),  # sum of log-probs
])
def test_beam_search_hand_checked(length_penalty, scores):
    """Greedy would take A (0.5) first; the best finished hypothesis is start-B-eos (0.4 * 0.9), then
    start-A-B-eos (0.5 * 0.37 * 0.9); start-eos (0.1) and start-A-eos (0.15) lose."""
    gen = GenerationConfig(max_length=6, num_beams=2, num_return_sequences=2, eos_token_id=(STOP,),
                           pad_token_id=PADTOK, decoder_start_token_id=START, length_penalty=length_penalty)
    out = search.beam_search(gen, markov_step, lambda cache, rows: cache, jnp.zeros(()), 1)
    seqs = np.asarray(out.sequences)[:, :int(out.length)]
    np.testing.assert_array_equal(seqs, [[START, B, STOP, PADTOK], [START, A, B, STOP]])
    np.testing.assert_allclose(np.asarray(out.scores), scores, rtol=1e-5)


def test_beam_search_reorders_the_cache():
    """A second-order step reads the token before ``last`` from the cache: the returned scores equal the log-probs
    recomputed along the returned sequences only if ``reorder`` moved every cache row with its beam."""
    batch, K, Vb, Tm = 2, 3, 7, 7
    rng = np.random.default_rng(0)
    table = rng.normal(0, 1.5, (batch, Vb, Vb, Vb)).astype(np.float32)  # [utterance, prev, last, next]
    table[..., START] = -1e4  # the start token is never produced
    logp = np.asarray(jax.nn.log_softmax(table, axis=-1))
    gen = GenerationConfig(max_length=Tm, num_beams=K, num_return_sequences=K, eos_token_id=(STOP,),
                           pad_token_id=START, decoder_start_token_id=START, length_penalty=1.0)
    utterance = jnp.arange(batch * K) // K

    def step(last, position, prev):
        return jnp.asarray(table)[utterance, prev, last], last

    def run(reorder):
        out = search.beam_search(gen, step, reorder, jnp.full((batch * K,), START, jnp.int32), batch)
        return np.asarray(out.sequences), np.asarray(out.scores)

    def rescore(seqs):
        out = []
        for i, row in enumerate(seqs):
            b, total, n = i // K, 0.0, 0
            for t in range(1, Tm):
                prev = row[t - 2] if t >= 2 else START
                total += logp[b, prev, row[t - 1], row[t]]
                n += 1
                if row[t] == STOP:
                    break
            out.append(total / n)
        return np.array(out)

    seqs, got = run(lambda prev, rows: prev[rows])
    np.testing.assert_allclose(got, rescore(seqs), rtol=1e-5)
    seqs_bad, got_bad = run(lambda prev, rows: prev)  # a cache left in place: scores no longer add up
    assert not np.allclose(got_bad, rescore(seqs_bad), rtol=1e-5)
