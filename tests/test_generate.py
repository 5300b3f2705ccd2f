"""``SpeechSeq2Seq.generate`` against transformers' ``generate``: greedy and beam search token for token (scores
within 1e-4) on tiny models of every encoder variant and decoder family, padded batches of three lengths with EOS in
mid-sequence; generation defaults from ``generation_config.json``; one compilation per shape; guard rails.

Compilation dominates the time here (a few seconds per program on 2 CPU cores), so each model is built and saved
once per module, and each case is one program.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np
import pytest
import transformers as T

import hf_factory as F
from conftest import XLA_DEFAULTS
from speechseq import InputError, SpeechSeq2Seq
from speechseq.decoding.cpu import CpuPlan
from speechseq.decoding.generate import TRACES

LENGTHS = (1600, 1100, 1400)  # padded batch of three lengths
X, MASK = F.audio_batch(LENGTHS)
START, PAD, NEW = 0, 1, 10
# seed 0 gives these models no token at which rows stop at different steps (one decodes 49 whatever the audio)
SEEDS = {("hubert-noprojnorm", "bert"): 1, ("hubert", "gpt2-scaled"): 1}
BEAM = dict(num_beams=3, num_return_sequences=2, early_stopping=False)

ENCODER_VARIANTS = [e for e in [*F.ENCODERS, "w2v-adapter-20"] if e not in ("w2v-group", "hubert", "w2v-adapter")]
# "w2v-adapter" (adapter 24 wide, decoder 20) crashes in transformers itself; "w2v-adapter-20" stands in for it.
# Every decoder family with two encoders, greedy and beam; every other encoder variant with bert, greedy (the search
# does not depend on the encoder). Each case is one compiled program, a few seconds.
FAMILY_CASES = (
    [pytest.param(e, d, mode, id=f"{e}-{d}-{mode}") for d in F.DECODERS for e in ("w2v-group", "hubert")
     for mode in ("greedy", "beam")]
    + [pytest.param(e, "bert", "greedy", id=f"{e}-bert-greedy") for e in ENCODER_VARIANTS]
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Pair(NamedTuple):
    hf: Any  # transformers.SpeechEncoderDecoderModel
    ours: SpeechSeq2Seq
    eos: int  # a token this model emits a few steps in, for some rows only
    path: Any


def hf_generate(hf, x=X, mask=MASK, **kwargs) -> tuple[np.ndarray, np.ndarray | None]:
    return F.hf_generate(hf, x, mask, **kwargs)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """``pair(enc, dec)``: the transformers model, ours loaded from its saved checkpoint, and an EOS token."""
    cache: dict[tuple[str, str], Pair] = {}

    def get(enc: str, dec: str) -> Pair:
        if (enc, dec) not in cache:
            hf = F.decoding_seq2seq(enc, dec, seed=SEEDS.get((enc, dec), 0))
            path = tmp_path_factory.mktemp(f"{enc}-{dec}")
            hf.save_pretrained(path)
            free, _ = hf_generate(hf, max_new_tokens=NEW, pad_token_id=PAD, decoder_start_token_id=START,
                                  eos_token_id=F.VOCAB + 5)  # an id never emitted: greedy output without EOS
            cache[enc, dec] = Pair(hf, SpeechSeq2Seq.from_pretrained(path), F.pick_eos(free), path)
        return cache[enc, dec]

    return get


def settings(p: Pair, **kwargs) -> dict:
    return {"max_new_tokens": NEW, "pad_token_id": PAD, "decoder_start_token_id": START, "eos_token_id": p.eos,
            **kwargs}


def assert_parity(p: Pair, **kwargs) -> np.ndarray:
    """Ours equals transformers for ``settings(p, **kwargs)``; returns the sequences."""
    kwargs = settings(p, **kwargs)
    want, want_scores = hf_generate(p.hf, **kwargs)
    got = p.ours.generate(X, MASK, return_dict=True, **kwargs)
    assert isinstance(got["sequences"], np.ndarray) and got["sequences"].dtype == np.int32
    np.testing.assert_array_equal(got["sequences"], want)
    if want_scores is None:
        assert "sequences_scores" not in got
    else:
        np.testing.assert_allclose(got["sequences_scores"], want_scores, rtol=0, atol=1e-4)
    return want


def stop_steps(seqs: np.ndarray, eos) -> list[int | None]:
    """Column of each row's first EOS (None if none), after checking that only pad follows it."""
    eos = np.atleast_1d(eos)
    steps = []
    for row in seqs:
        hits = np.flatnonzero(np.isin(row[1:], eos))
        if hits.size:
            col = int(hits[0]) + 1
            assert np.all(row[col + 1:] == PAD), f"tokens after EOS in {row.tolist()}"
            steps.append(col)
        else:
            steps.append(None)
    return steps


def assert_eos_mid_sequence(seqs: np.ndarray, eos) -> None:
    """At least one row really stopped early (else the EOS handling is untested) and pad follows every EOS."""
    steps = stop_steps(seqs, eos)
    last = seqs.shape[1] - 1
    assert any(s is not None and s < last for s in steps), f"no row stops before the last column: {seqs.tolist()}"


# -- every encoder variant and decoder family -------------------------------------------------------------------------

@pytest.mark.parametrize("enc, dec, mode", FAMILY_CASES)
def test_generate_matches_transformers(pair, enc, dec, mode):
    p = pair(enc, dec)
    seqs = assert_parity(p, **(BEAM if mode == "beam" else {}))
    assert seqs.shape[0] == len(LENGTHS) * (BEAM["num_return_sequences"] if mode == "beam" else 1)
    assert np.all(seqs[:, 0] == START)
    if mode == "greedy":
        assert_eos_mid_sequence(seqs, p.eos)
        steps = stop_steps(seqs, p.eos)
        assert len(set(steps)) > 1, f"every row stops at the same step: {seqs.tolist()}"
    else:
        stop_steps(seqs, p.eos)  # pad after EOS


@pytest.mark.parametrize("mode", ["greedy", "beam"])
@pytest.mark.parametrize("level", ["shipped", "xla-defaults"])
def test_xla_optimization_levels_match_transformers(pair, mode, level):
    """conftest compiles the suite at XLA_FLAGS=--xla_backend_optimization_level=0 with the older fusion emitters
    (half the compile time); here the program is compiled as users get it, set per program: XLA:CPU's default
    fusion emitters with ``generate_jit``'s CPU options (LLVM level 1) or XLA's default level 3 (a user's own
    ``jax.jit(generate)``), and checked the same way."""
    import jax

    from speechseq.decoding.generate import CPU_COMPILER_OPTIONS, generate

    p = pair("w2v-group", "bart")
    kwargs = settings(p, **(BEAM if mode == "beam" else {}))
    want, want_scores = hf_generate(p.hf, **kwargs)
    gen = p.ours.generation_config(**kwargs)
    options = {**XLA_DEFAULTS, **CPU_COMPILER_OPTIONS} if level == "shipped" else XLA_DEFAULTS
    shipped = jax.jit(generate, static_argnames=("cfg", "gen", "dtype"), compiler_options=options)
    out = shipped(p.ours.config, p.ours.params, X, MASK, gen, None, p.ours.dtype)
    np.testing.assert_array_equal(np.asarray(out.sequences)[:, :int(out.length)], want)
    if mode == "beam":
        np.testing.assert_allclose(np.asarray(out.scores), want_scores, rtol=0, atol=1e-4)
    else:
        assert_eos_mid_sequence(want, p.eos)


def test_generate_jit_compiler_options(monkeypatch):
    """LLVM level 1 on CPU only, and a level the user set in XLA_FLAGS wins; the pre-jitted function picks them by
    the audio's platform (numpy: JAX's default backend)."""
    import jax
    import jax.numpy as jnp

    from speechseq.decoding import generate as G

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert G.compiler_options("cpu") == {"xla_backend_optimization_level": 1} == G.CPU_COMPILER_OPTIONS
    assert G.compiler_options("gpu") is None and G.compiler_options("tpu") is None
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=3")
    assert G.compiler_options("cpu") is None

    seen = []
    monkeypatch.setattr(G, "compiler_options", lambda platform: seen.append(platform))
    fn = G.PlatformJit(lambda cfg, p, x: x * p, ("cfg",), "x")
    assert float(fn(None, 2.0, jnp.float32(3.0))) == 6.0
    assert float(fn(None, 2.0, x=np.float32(4.0))) == 8.0
    assert float(fn.lower(None, 2.0, jnp.float32(1.0)).compile()(2.0, jnp.float32(1.0))) == 2.0
    assert seen == [jax.default_backend()]  # one jitted function for the platform, made once

    # the options reach XLA: one it does not know fails the compile
    monkeypatch.setattr(G, "compiler_options", lambda platform: {"no_such_xla_option": 1})
    with pytest.raises(Exception, match="no_such_xla_option"):
        G.PlatformJit(lambda cfg, p, x: x * p, ("cfg",), "x")(None, 2.0, jnp.float32(3.0))


# -- search settings and logits processors ------------------------------------------------------------------------

OPTIONS_PAIR = ("w2v-group", "bart")  # varied tokens along and across rows


def second_eos(p: Pair) -> int:
    """Another token some row emits (for several EOS ids)."""
    free, _ = hf_generate(p.hf, **settings(p, eos_token_id=F.VOCAB + 5))
    return F.pick_eos(free, exclude=(START, PAD, p.eos))


OPTION_CASES = {
    # id: (keywords, keywords that must each change transformers' result, so that the case is not trivial);
    # several settings share a case because each case is one compiled program
    "beam-nrs4-lp2-early": (dict(num_beams=4, num_return_sequences=4, length_penalty=2.0, early_stopping=True),
                            ["length_penalty", "early_stopping"]),
    "beam-never-2eos-ngram-suppress": (dict(num_beams=3, num_return_sequences=3, early_stopping="never",
                                            eos_token_id="two", no_repeat_ngram_size=2, suppress_tokens=[55]),
                                       ["early_stopping", "eos_token_id", "no_repeat_ngram_size", "suppress_tokens"]),
    "beam-lp0.5-bos-minlen-rep": (dict(num_beams=3, num_return_sequences=3, length_penalty=0.5,
                                       forced_bos_token_id=7, min_length=6, repetition_penalty=1.5),
                                  ["length_penalty", "forced_bos_token_id", "min_length", "repetition_penalty"]),
    "greedy-2eos-bos-minnew-suppress-rep": (dict(eos_token_id="two", forced_bos_token_id=7, min_new_tokens=4,
                                                 suppress_tokens=[55, 23], repetition_penalty=1.5),
                                            ["eos_token_id", "forced_bos_token_id", "min_new_tokens",
                                             "suppress_tokens", "repetition_penalty"]),
    "greedy-minlen-ngram-forcedeos-beginsuppress": (dict(min_length=6, no_repeat_ngram_size=2,
                                                         forced_eos_token_id="eos", begin_suppress_tokens="first"),
                                                    ["min_length", "no_repeat_ngram_size", "forced_eos_token_id",
                                                     "begin_suppress_tokens"]),
}


def resolve(p: Pair, kwargs: dict) -> dict:
    out = dict(kwargs)
    if out.get("eos_token_id") == "two":
        out["eos_token_id"] = [p.eos, second_eos(p)]
    if out.get("forced_eos_token_id") == "eos":
        out["forced_eos_token_id"] = p.eos
    if out.get("begin_suppress_tokens") == "first":  # the first tokens rows 0 and 1 would emit
        free, _ = hf_generate(p.hf, **settings(p))
        out["begin_suppress_tokens"] = [int(free[0, 1]), int(free[1, 1])]
    return out


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_generate_options_match_transformers(pair, case):
    p = pair(*OPTIONS_PAIR)
    kwargs, matter = OPTION_CASES[case]
    kwargs = resolve(p, kwargs)
    want = assert_parity(p, **kwargs)
    base = settings(p, **kwargs)
    _, scores = hf_generate(p.hf, **base)
    for key in matter:  # each setting changes the result (sequences or beam scores)
        without = dict(base)
        without.pop(key)
        other, other_scores = hf_generate(p.hf, **without)
        changed = other.shape != want.shape or not np.array_equal(other, want) or (
            scores is not None and not np.allclose(scores, other_scores))
        assert changed, f"{key} does not change the result of {case}"
    stop_steps(want, kwargs.get("eos_token_id", p.eos))
    if "forced_bos_token_id" in kwargs:
        assert np.all(want[:, 1] == kwargs["forced_bos_token_id"])


def test_begin_suppress_tokens_after_forced_bos_match_transformers(pair):
    """With a forced BOS, transformers suppresses ``begin_suppress_tokens`` at the step after it."""
    p = pair(*OPTIONS_PAIR)
    forced, _ = hf_generate(p.hf, **settings(p, forced_bos_token_id=7))
    suppress = [int(forced[0, 2])]
    want, _ = hf_generate(p.hf, **settings(p, forced_bos_token_id=7, begin_suppress_tokens=suppress))
    assert not np.array_equal(want, forced)  # the setting matters
    assert_parity(p, forced_bos_token_id=7, begin_suppress_tokens=suppress)


def test_generation_config_json_gives_the_defaults(pair, tmp_path):
    """No keywords: everything comes from generation_config.json (the same settings as the hubert-bert beam case,
    so that the program compiled there is reused)."""
    p = pair("hubert", "bert")
    path = tmp_path / "with-generation-config"
    p.hf.save_pretrained(path)
    T.GenerationConfig(**BEAM, max_length=NEW + 1, eos_token_id=p.eos, pad_token_id=PAD,
                       decoder_start_token_id=START).save_pretrained(path)
    hf = T.SpeechEncoderDecoderModel.from_pretrained(path).eval()
    want, want_scores = hf_generate(hf)
    got = SpeechSeq2Seq.from_pretrained(path).generate(X, MASK, return_dict=True)
    np.testing.assert_array_equal(got["sequences"], want)
    np.testing.assert_allclose(got["sequences_scores"], want_scores, rtol=0, atol=1e-4)
    assert want.shape[0] == len(LENGTHS) * BEAM["num_return_sequences"] and want.shape[1] <= NEW + 1


# -- compilation ----------------------------------------------------------------------------------------------------

def test_same_shapes_do_not_recompile(pair):
    p = pair("w2v-group", "bert")
    kwargs = settings(p)
    first = p.ours.generate(X, MASK, **kwargs)
    before = TRACES["generate"]
    again = p.ours.generate(X, MASK, **kwargs)
    np.testing.assert_array_equal(again, first)
    assert TRACES["generate"] == before

    x, mask = F.audio_batch((1500, 1100, 1400))  # another padded length: one new program
    p.ours.generate(x, mask, **kwargs)
    assert TRACES["generate"] == before + 1
    p.ours.generate(x, mask, **kwargs)
    p.ours.generate(X, MASK, **kwargs)
    assert TRACES["generate"] == before + 1


def test_decode_layout_cache_follows_params(pair):
    """The decode-layout copy of the decoder weights that ``generate`` keeps is remade when params change, and the
    pure function without it (preparing per call) gives the same tokens."""
    import jax
    import jax.numpy as jnp

    from speechseq.decoding.generate import generate_jit

    p = pair("w2v-group", "bert")
    model = SpeechSeq2Seq(p.ours.config, p.ours.params)
    kwargs = settings(p)
    first = model.generate(X, MASK, **kwargs)
    gen = model.generation_config(**kwargs)
    pure = generate_jit(model.config, model.params, jnp.asarray(X), jnp.asarray(MASK), gen)
    np.testing.assert_array_equal(np.asarray(pure.sequences)[:, :int(pure.length)], first)

    # other decoder weights: a stale copy would give the old tokens instead of what the pure function gives
    rng = np.random.default_rng(7)
    new = jax.tree.map(lambda x: x + 0.5 * jnp.asarray(rng.standard_normal(x.shape), x.dtype), model.params["decoder"])
    model.params = {**model.params, "decoder": new}
    got = model.generate(X, MASK, **kwargs)
    pure = generate_jit(model.config, model.params, jnp.asarray(X), jnp.asarray(MASK), gen)
    np.testing.assert_array_equal(got, np.asarray(pure.sequences)[:, :int(pure.length)])
    assert not np.array_equal(got, first), "perturbed decoder weights should change the greedy tokens"


def test_first_call_compiles_generate_once_beside_the_layout(pair):
    """The first ``generate`` of a model makes the decode layout in a worker thread while it compiles the program for
    the layout's shapes: the call that follows must find that program (one XLA compile of ``generate``, one trace),
    and its tokens are the pure function's."""
    import jax
    import jax.monitoring
    import jax.numpy as jnp

    from speechseq import kernels
    from speechseq.decoding.generate import generate_jit

    p = pair("w2v-group", "bert")
    model = SpeechSeq2Seq(p.ours.config, p.ours.params)  # no decode layout yet
    kwargs = {**settings(p), "num_beams": 2}  # a bucket no other test compiles
    compiled = []

    def listen(event: str, secs: float, fun_name: str = "", **_) -> None:
        if event.endswith("backend_compile_duration") and fun_name == "jit(generate)":
            compiled.append(secs)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        traces = TRACES["generate"]
        got = model.generate(X, MASK, **kwargs)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert (len(compiled), TRACES["generate"] - traces) == (1, 1)
    # 6 rows: the CPU plan, its weights packed for the kernel if it builds
    assert list(model.decode_layouts.made()) == [CpuPlan(packed=kernels.available())]
    pure = generate_jit(model.config, model.params, jnp.asarray(X), jnp.asarray(MASK),
                        model.generation_config(**kwargs))
    np.testing.assert_array_equal(got, np.asarray(pure.sequences)[:, :int(pure.length)])


@functools.cache
def jitted_parts():
    """The encoder with cross K/V, and the decoder, as compiled programs shared by the tests below: op by op (eager)
    every small op of every step compiled again for each new shape, which made these tests a large share of the
    suite's time."""
    import jax

    from speechseq import model as M
    from speechseq.decoders import transformer
    from speechseq.decoding import cpu

    def encode_cross(cfg, p, x, mask, dtype):  # -> (stacked cross K/V of every layer, frame-level encoder mask,
        enc = M.encode(cfg, p, x, mask, dtype)  # encoder frames projected for the decoder)
        frames = M.project(cfg, p, enc.last_hidden_state, dtype)
        return M.cross_kv(cfg, p, frames, dtype), enc.attention_mask, frames

    return (jax.jit(encode_cross, static_argnums=(0, 4)),
            jax.jit(transformer.decode, static_argnums=0, static_argnames="dtype"),
            jax.jit(cpu.decode_cross_kv, static_argnums=(0, 3)),
            jax.jit(cpu.decode_step, static_argnums=0, static_argnames="dtype"))


@pytest.mark.parametrize("dec", ["bert", "gpt2", "bart"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_step_layout_matches_teacher_forced_pass(pair, dec, dtype, native):
    """One-token steps of the CPU plan (``decoding.cpu``: its own weight layout, per-layer caches) give the logits of
    the teacher-forced pass over stored params, in float32 and in bfloat16 (weights cast once, to the compute
    dtype), with the CPU kernel's weight dots and with XLA's; so do the model's own steps (the XLA plan) over the
    stored (stacked) params with a stacked cache."""
    import jax.numpy as jnp

    from speechseq.decoders import transformer
    from speechseq.decoding import cpu
    from speechseq.decoding.cpu import prepare_decoder

    p = pair("w2v-group", dec)
    cfg, params, dt = p.ours.config, p.ours.params, jnp.dtype(dtype)
    encode_cross, decode, decode_cross_kv, decode_step = jitted_parts()
    cross, enc_mask, frames = encode_cross(cfg, params, jnp.asarray(X), jnp.asarray(MASK), dt)
    ids = np.array([[START, 5, 7, 9, 3], [START, 2, 2, 8, 1], [START, 9, 4, 4, 6]], np.int32)
    want = np.asarray(decode(cfg.decoder, params["decoder"], ids, cross, enc_mask, dtype=dt)[0])

    dec_p = prepare_decoder(cfg, params, dt)
    # float32 on CPU: packed for the CPU kernel (``speechseq.kernels``) where it runs, else [Dout, Din]
    key = "kernel_p" if native == "kernel" and dtype == "float32" else "kernel_t"
    kernels = [x for lp in dec_p["layers"] for x in (lp["self_attn"]["qkv"][key], lp["mlp"]["wi"][key])]
    assert {x.dtype for x in kernels + [dec_p["head"][key]]} == {dt}
    tol = (1e-5 if dtype == "float32" else 3e-2) * np.abs(want).max()
    plans = {"cpu": (dec_p, decode_cross_kv(cfg.decoder, dec_p["layers"], frames, dt),
                     cpu.init_cache(cfg.decoder, len(ids), 8, dt)),
             "xla": (params["decoder"], cross, transformer.init_cache(cfg.decoder, len(ids), 8, dt))}
    for name, (weights, kv, cache) in plans.items():
        for t in range(ids.shape[1]):
            if name == "cpu":
                got, cache = decode_step(cfg.decoder, weights, ids[:, t:t + 1], kv, enc_mask, cache,
                                         jnp.int32(t), dtype=dt)
            else:
                got, cache = decode(cfg.decoder, weights, ids[:, t:t + 1], kv, enc_mask, cache=cache,
                                    start=jnp.int32(t), dtype=dt)
            np.testing.assert_allclose(np.asarray(got[:, 0]), want[:, t], rtol=0, atol=tol,
                                       err_msg=f"step {t}, {name} plan")


@pytest.mark.parametrize("plan", ["cpu", "xla"])
@pytest.mark.parametrize("dec", ["bert", "gpt2", "bart"])
def test_grouped_cache_follows_reordered_beams(pair, dec, plan):
    """Beam search's grouped cache (``decode(cache_rows=)``): beams are reordered at every step by reordering only
    the table of which slot holds each position's keys, never the cache; each row's logits still equal the
    teacher-forced pass over that row's own history. Both decode plans."""
    import jax.numpy as jnp

    from speechseq.decoders import transformer
    from speechseq.decoding import cpu

    p = pair("w2v-group", dec)
    cfg, params = p.ours.config, p.ours.params
    encode_cross, decode, decode_cross_kv, decode_step = jitted_parts()
    cross, enc_mask, frames = encode_cross(cfg, params, jnp.asarray(X), jnp.asarray(MASK), jnp.dtype(jnp.float32))
    B, G, Tmax, steps = len(X), 3, 8, 6
    rng = np.random.default_rng(0)
    seqs = np.full((B * G, 1), START, np.int32)
    holders = jnp.zeros((B * G, Tmax), jnp.int32)
    own = np.arange(B * G, dtype=np.int32) % G
    if plan == "cpu":
        cache = cpu.init_cache(cfg.decoder, B, Tmax, jnp.float32, groups=G)
        dec_p = cpu.prepare_decoder(cfg, params)
        kv = decode_cross_kv(cfg.decoder, dec_p["layers"], frames, jnp.dtype(jnp.float32))
    else:
        cache = transformer.init_cache(cfg.decoder, B, Tmax, jnp.float32, groups=G)
    for t in range(steps):
        if plan == "cpu":
            got, cache = decode_step(cfg.decoder, dec_p, seqs[:, -1:], kv, enc_mask, cache, jnp.int32(t),
                                     dtype=jnp.dtype(jnp.float32), cache_rows=holders)
        else:
            got, cache = decode(cfg.decoder, params["decoder"], seqs[:, -1:], cross, enc_mask, cache=cache,
                                start=jnp.int32(t), cache_rows=holders)
        # the teacher-forced pass over every row's history, padded to one shape (causal: position t sees 0..t)
        padded = np.pad(seqs, ((0, 0), (0, steps - seqs.shape[1])), constant_values=PAD)
        want = np.asarray(decode(cfg.decoder, params["decoder"], padded, cross, enc_mask)[0])
        np.testing.assert_allclose(np.asarray(got[:, 0]), want[:, t], rtol=0, atol=1e-5 * np.abs(want).max(),
                                   err_msg=f"step {t}")
        holders = holders.at[:, t].set(own)
        # each row continues a beam of its utterance
        parents = np.repeat(np.arange(B) * G, G) + rng.integers(0, G, B * G)
        holders = holders[parents]
        seqs = np.concatenate([seqs[parents], rng.integers(1, 30, (B * G, 1), dtype=np.int32)], axis=1)


# -- guard rails ------------------------------------------------------------------------------------------------------

GUARDS = [
    pytest.param(dict(max_new_tokens=40), ["max_length", "41", "40 positions", "at most 39 new tokens"],
                 id="beyond-position-table"),
    pytest.param(dict(num_beams=3, num_return_sequences=4), ["num_return_sequences", "4", "num_beams 3"],
                 id="more-sequences-than-beams"),
    pytest.param(dict(beams=4), ["unknown keyword", "beams"], id="unknown-keyword"),
    pytest.param(dict(early_stopping="sometimes"), ["early_stopping", "'sometimes'", "'never'"],
                 id="bad-early-stopping"),
]


@pytest.mark.parametrize("kwargs, words", GUARDS)
def test_bad_settings_raise_one_line_before_compiling(pair, kwargs, words):
    p = pair("w2v-group", "bert")  # bert: 40 positions
    before = TRACES["generate"]
    with pytest.raises(InputError) as err:
        p.ours.generate(X, MASK, **{**settings(p), **kwargs})
    msg = str(err.value)
    assert "\n" not in msg, msg
    for word in words:
        assert word in msg, msg
    assert TRACES["generate"] == before


@pytest.mark.parametrize("dec", ["bert", "gpt2"])
@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_generate_matches_transformers_with_either_weight_dots(pair, dec, mode, native):
    """The decode step's weight dots in the CPU kernel (``speechseq.kernels``, the default where it builds) and in
    XLA (without a compiler, or ``SPEECHSEQ_NATIVE=0``) give transformers' tokens and beam scores alike."""
    p = pair("w2v-group", dec)
    seqs = assert_parity(p, **(BEAM if mode == "beam" else {}))
    assert np.all(seqs[:, 0] == START)
    # the model's cached decode layout is the one for the dots asked for (a layout made while the kernel was on
    # would send the "xla" run through the kernel)
    head = p.ours.decode_layouts.made()[CpuPlan(packed=native == "kernel")]["head"]
    assert ("kernel_p" if native == "kernel" else "kernel_t") in head


def test_many_rows_keep_xlas_layout(pair, monkeypatch):
    """Steps of more than ``kernels.MAX_ROWS`` rows (batch x beams) keep the weights in XLA's layout, where XLA's
    GEMM beats the kernel; few rows get the kernel's. Both give transformers' tokens, and the model keeps both."""
    from speechseq import kernels
    from speechseq.decoding.cpu import prepare_decoder

    if not kernels.available():
        pytest.skip(kernels.status())
    p = pair("w2v-group", "bert")
    rows = len(LENGTHS) * BEAM["num_beams"]
    monkeypatch.setattr(kernels, "MAX_ROWS", rows - 1)
    model = SpeechSeq2Seq(p.ours.config, p.ours.params)  # no decode layout yet
    heads = {n: prepare_decoder(model.config, model.params, rows=n)["head"] for n in (None, rows - 1, rows)}
    assert ["kernel_p" in h for h in heads.values()] == [True, True, False]
    assert_parity(p._replace(ours=model), **BEAM)  # rows > MAX_ROWS
    assert list(model.decode_layouts.made()) == [CpuPlan(packed=False)]
    assert_parity(p._replace(ours=model))  # greedy: len(LENGTHS) rows
    assert list(model.decode_layouts.made()) == [CpuPlan(packed=False), CpuPlan(packed=True)]


# -- the decode plans -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("enc", ["w2v-group", "hubert"])
@pytest.mark.parametrize("dec", ["bert", "roberta", "gpt2", "bart", "mbart"])
@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_xla_plan_matches_transformers(pair, enc, dec, mode, monkeypatch):
    """The accelerator plan (``decoding.plan.XlaPlan``: the model's own decoder, layers under ``lax.scan``, no
    weight copy), forced on CPU, gives transformers' tokens and beam scores for every encoder x decoder pair."""
    from speechseq.decoding.plan import XlaPlan

    monkeypatch.setenv("SPEECHSEQ_DECODE_PLAN", "xla")
    p = pair(enc, dec)
    model = SpeechSeq2Seq(p.ours.config, p.ours.params)  # no decode layout yet
    assert_parity(p._replace(ours=model), **(BEAM if mode == "beam" else {}))
    (plan, layout), = model.decode_layouts.made().items()
    assert plan == XlaPlan() and layout is model.params["decoder"]  # the params themselves, not a copy


def test_xla_plan_compile_time_does_not_grow_with_depth(pair, monkeypatch):
    """Under the XLA plan a 24-layer decoder's ``generate`` program is the 6-layer one's: the layers are one
    ``lax.scan`` body, compiled once, so the optimised HLO has as many instructions and compiles in about the same
    time. (The CPU plan unrolls them: its program grows with depth.)"""
    import dataclasses
    import time

    import jax
    import jax.numpy as jnp

    from speechseq.decoding.generate import generate_jit
    from speechseq.decoding.plan import XlaPlan

    p = pair("w2v-group", "bert")
    gen = p.ours.generation_config(**settings(p, **BEAM))
    sizes: dict[int, int] = {}
    # CPU seconds of this process spent compiling, not wall time: the suite's other workers share the cores
    times: dict[int, list[float]] = {6: [], 24: []}
    for _ in range(2):
        for layers in times:
            cfg = p.ours.config
            cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, num_layers=layers))
            model = SpeechSeq2Seq.from_config(cfg)
            jax.clear_caches()
            lowered = generate_jit.lower(model.config, model.params, jnp.asarray(X), jnp.asarray(MASK), gen, None,
                                         model.dtype, model.params["decoder"], XlaPlan())
            start = time.process_time()
            compiled = lowered.compile()
            times[layers].append(time.process_time() - start)
            sizes[layers] = sum(" = " in line for line in compiled.as_text().splitlines())
    assert sizes[24] == sizes[6], sizes  # the structural fact, exact
    # the timing it implies, with room for the noise of a shared machine
    assert min(times[24]) <= 1.5 * min(times[6]), times
