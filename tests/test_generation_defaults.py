"""Generation defaults resolved as transformers 5.25 resolves them, checked against its ``generate`` with no
keywords: a checkpoint's ``generation_config.json`` alone when there is one (a field only the decoder's config
carries, such as a BART decoder's ``forced_eos_token_id``, does not apply then), else
``GenerationConfig.from_model_config`` of config.json (top level first, then the decoder's fields). Also what fills
the positions after EOS in beam search when ``pad_token_id`` is 0 (README, decoding).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers as T

import hf_factory as F
from speechseq import SpeechSeq2Seq
from speechseq.decoding import config as G

LENGTHS = (1600, 1100, 1400)
X, MASK = F.audio_batch(LENGTHS)
CLASS_DEFAULTS = {"bart": {"forced_eos_token_id": 2}, "mbart": {"forced_eos_token_id": 2}}  # what the factory unsets


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def hf_generate(model, **kwargs) -> tuple[np.ndarray, np.ndarray | None]:
    return F.hf_generate(model, X, MASK, **kwargs)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(dec)``: a folder with a model saved by transformers 5.25, its decoder config carrying the config
    class's own generation fields (BART's ``forced_eos_token_id=2``) as a model built from defaults does."""
    cache = {}

    def get(dec: str):
        if dec not in cache:
            model = F.decoding_seq2seq("w2v-group", dec)
            for key, value in CLASS_DEFAULTS.get(dec, {}).items():
                setattr(model.config.decoder, key, value)
            model.generation_config = T.GenerationConfig.from_model_config(model.config)
            path = tmp_path_factory.mktemp(f"saved-{dec}")
            model.save_pretrained(path)
            cache[dec] = path
        return cache[dec]

    return get


def variant(src, dst, kind: str):
    """A copy of checkpoint ``src`` with transformers' own generation_config.json ("saved"), without one
    ("no-file"), or with a hand-written one that names no forced EOS ("own-file")."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "generation_config.json" or kind == "saved":
            (dst / f.name).write_bytes(f.read_bytes())
    if kind == "own-file":
        (dst / "generation_config.json").write_text(json.dumps(
            {"decoder_start_token_id": 0, "pad_token_id": 1, "eos_token_id": 2, "max_length": 12}))
    return dst


@pytest.mark.parametrize("mode", ["greedy", "beam"])
@pytest.mark.parametrize("kind", ["saved", "no-file", "own-file"])
@pytest.mark.parametrize("dec", ["bart", "mbart", "bert", "gpt2"])
def test_checkpoint_defaults_match_transformers(saved, tmp_path, dec, kind, mode):
    path = variant(saved(dec), tmp_path / kind, kind)
    hf = T.SpeechEncoderDecoderModel.from_pretrained(path).eval()
    ours = SpeechSeq2Seq.from_pretrained(path)
    kwargs = {"num_beams": 3} if mode == "beam" else {}
    want, want_scores = hf_generate(hf, **kwargs)
    got = ours.generate(X, MASK, return_dict=True, **kwargs)
    np.testing.assert_array_equal(got["sequences"], want)
    if mode == "beam":
        np.testing.assert_allclose(got["sequences_scores"], want_scores, rtol=0, atol=1e-4)
    gen = ours.generation_config(**kwargs)
    assert gen.max_length == (12 if kind == "own-file" else 21)
    forced = dec in CLASS_DEFAULTS and kind != "own-file"
    assert gen.forced_eos_token_id == ((2,) if forced else ())
    if forced and mode == "greedy":  # the forced EOS shows: rows that run to max_length end with it
        assert want.shape[1] == 21 and np.all(want[:, -1] == 2)


def test_from_model_config_order():
    """Top-level fields first, the decoder's fill only what is unset; a generation_config.json replaces both."""
    config = {"max_length": 25, "num_beams": 1, "pad_token_id": None, "foo": 3,
              "decoder": {"num_beams": 4, "max_length": 30, "no_repeat_ngram_size": 3, "pad_token_id": 5,
                          "forced_eos_token_id": 2, "eos_token_id": None}}
    assert G.defaults_from(config, None) == {"max_length": 25, "num_beams": 1, "no_repeat_ngram_size": 3,
                                             "pad_token_id": 5, "forced_eos_token_id": 2}
    assert G.defaults_from(config, {"num_beams": 2, "eos_token_id": None, "_from_model_config": True}) == {
        "num_beams": 2}
    # transformers: a max_new_tokens in generation_config.json wins over any max_length
    gen = G.make(G.defaults_from({}, {"max_new_tokens": 5, "decoder_start_token_id": 0}), 40, max_length=30)
    assert gen.max_length == 6
    # no decoder_start_token_id: bos_token_id starts the decoder, as in transformers' encoder-decoders
    assert G.make({"bos_token_id": 3}, 40).decoder_start_token_id == 3


def test_beam_search_fills_pad_after_eos_when_pad_is_zero(saved):
    """transformers 5.25's beam search fills the positions after EOS with ``pad_token_id or eos_token_id``, so EOS
    when the pad id is 0 (BERT's); its greedy search fills pad. Ours fills pad in both: the tokens up to each EOS and
    the scores are transformers', and pad 0 follows every EOS."""
    model = SpeechSeq2Seq.from_pretrained(saved("bert"))
    hf = T.SpeechEncoderDecoderModel.from_pretrained(saved("bert")).eval()
    free, _ = hf_generate(hf, max_new_tokens=8, eos_token_id=F.VOCAB + 5, pad_token_id=0)
    eos = F.pick_eos(free)
    kwargs = dict(num_beams=3, num_return_sequences=2, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    want, want_scores = hf_generate(hf, **kwargs)
    got = model.generate(X, MASK, return_dict=True, **kwargs)
    seqs = got["sequences"]
    assert seqs.shape == want.shape
    np.testing.assert_allclose(got["sequences_scores"], want_scores, rtol=0, atol=1e-4)
    stopped = 0
    for ours_row, their_row in zip(seqs, want):
        hits = np.flatnonzero(their_row[1:] == eos)
        end = int(hits[0]) + 2 if hits.size else len(their_row)
        np.testing.assert_array_equal(ours_row[:end], their_row[:end])
        assert np.all(ours_row[end:] == 0) and np.all(their_row[end:] == eos)
        stopped += end < len(their_row)
    assert stopped, f"no row ends before the last column: {want.tolist()}"
