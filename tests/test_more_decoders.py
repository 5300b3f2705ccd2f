"""The decoder families of issue 30 (``hf_factory.MORE_DECODERS``) against transformers 5.25 on tiny perturbed
models: logits and loss on padded batches (tied and untied heads, right-padded decoder inputs), greedy and beam
tokens, convert-then-export bit for bit, and warm start from a standalone checkpoint of the family."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as T

import hf_factory as F
from speechseq import SpeechSeq2Seq
from speechseq.checkpoints.readers import open_checkpoint
from speechseq.config import decoder_config_from_hf
from test_config_roundtrip import DEC_CHANGES, check_written
from test_parity import LOGITS_TOL, LOSS_RTOL, assert_parity, check_labels_parity, right_padded_ids
from test_roundtrip import test_transformers_speechseq_transformers as roundtrip
from test_warm_start import ENCODER_SOURCES, build_encoder, check_joined, check_part, compare_logits, CROSS_ATTENTION

DECODERS = list(F.MORE_DECODERS)
ENC = "w2v-layer-stable"  # 16 wide: the 20-wide decoders need enc_to_dec_proj
GEN_LENGTHS = (1600, 1100, 1400)
START, PAD, NEW = 0, 1, 10
SEEDS = {"trocr-sinusoidal": 1}  # seed 0 decodes one token whatever the audio
BEAM = dict(num_beams=3, num_return_sequences=2, early_stopping=False)

# standalone causal-LM source of each family, as test_warm_start's DECODER_SOURCES: (class, factory variant, where
# the base model sits in its checkpoint, where it sits in SpeechEncoderDecoderModel's decoder, names it ignores)
SOURCES = {
    "marian": (T.MarianForCausalLM, "marian", "model.decoder.", "model.decoder.", ()),
    "pegasus": (T.PegasusForCausalLM, "pegasus", "model.decoder.", "model.decoder.", ()),
    "blenderbot-small": (T.BlenderbotSmallForCausalLM, "blenderbot-small", "model.decoder.", "model.decoder.", ()),
    "xglm": (T.XGLMForCausalLM, "xglm", "model.", "model.", ()),
    "trocr": (T.TrOCRForCausalLM, "trocr", "model.decoder.", "model.decoder.", ()),
    "trocr-sinusoidal": (T.TrOCRForCausalLM, "trocr-sinusoidal", "model.decoder.", "model.decoder.", ()),
    "xlm-roberta": (T.XLMRobertaForCausalLM, "xlm-roberta", "roberta.", "roberta.", ()),
    "electra": (T.ElectraForCausalLM, "electra", "electra.", "electra.", ()),
    "bert-generation": (T.BertGenerationDecoder, "bert-generation", "bert.", "bert.", ()),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _trocr_table_after_from_pretrained(monkeypatch):
    """transformers 5.25 leaves TrOCR's sinusoidal table (a plain tensor attribute, not a buffer) on the meta device
    after ``from_pretrained``, so the reloaded model cannot run; rebuild it as the constructor does."""
    cls = T.models.trocr.modeling_trocr.TrOCRSinusoidalPositionalEmbedding
    forward = cls.forward

    def rebuilt(self, input_ids, cache_length=0):
        if self.weights.is_meta:
            self.weights = self.get_embedding(self.weights.shape[0], self.embedding_dim, self.padding_idx)
        return forward(self, input_ids, cache_length)

    monkeypatch.setattr(cls, "forward", rebuilt)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """(transformers model, speechseq model from its checkpoint) per (decoder, tie)."""
    return F.checkpoint_zoo(tmp_path_factory, lambda dec, tie=True: F.any_seq2seq(ENC, dec, tie=tie))


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("dec", DECODERS)
def test_logits_and_loss(zoo, dec, tie):
    hf, ours = zoo(dec, tie)
    check_labels_parity(hf, ours)


@pytest.mark.parametrize("dec", DECODERS)
def test_right_padded_decoder_inputs(zoo, dec):
    hf, ours = zoo(dec)
    ids, dmask = right_padded_ids()
    x, mask = F.audio_batch((1600, 1100))
    want = F.hf_forward(hf, input_values=x, attention_mask=mask, decoder_input_ids=ids, decoder_attention_mask=dmask)
    assert_parity(ours(x, mask, decoder_input_ids=ids, decoder_attention_mask=dmask), want, with_loss=False)


@pytest.fixture(scope="module")
def gen_pair(tmp_path_factory):
    """(transformers model with loud cross-attention, ours from its checkpoint, an EOS some rows emit early)."""
    cache = {}

    def get(dec: str):
        if dec not in cache:
            hf = F.decoding_seq2seq("w2v-group", dec, seed=SEEDS.get(dec, 0))
            path = tmp_path_factory.mktemp(f"gen-{dec}")
            hf.save_pretrained(path)
            x, mask = F.audio_batch(GEN_LENGTHS)
            free, _ = F.hf_generate(hf, x, mask, max_new_tokens=NEW, pad_token_id=PAD, decoder_start_token_id=START,
                                    eos_token_id=F.VOCAB + 5)  # never emitted: greedy output without EOS
            cache[dec] = hf, SpeechSeq2Seq.from_pretrained(path), F.pick_eos(free)
        return cache[dec]

    return get


@pytest.mark.parametrize("plan", ["cpu", "xla"])
@pytest.mark.parametrize("mode", ["greedy", "beam"])
@pytest.mark.parametrize("dec", DECODERS)
def test_generate(gen_pair, dec, mode, plan, monkeypatch):
    """Both decode plans (the CPU one with its own weight layout, the model's own decoder under XLA's)."""
    monkeypatch.setenv("SPEECHSEQ_DECODE_PLAN", plan)
    hf, loaded, eos = gen_pair(dec)
    ours = SpeechSeq2Seq(loaded.config, loaded.params)  # no decode layout of another plan yet
    x, mask = F.audio_batch(GEN_LENGTHS)
    kwargs = dict(max_new_tokens=NEW, pad_token_id=PAD, decoder_start_token_id=START, eos_token_id=eos,
                  **(BEAM if mode == "beam" else {}))
    want, want_scores = F.hf_generate(hf, x, mask, **kwargs)
    got = ours.generate(x, mask, return_dict=True, **kwargs)
    np.testing.assert_array_equal(got["sequences"], want)
    if mode == "beam":
        np.testing.assert_allclose(got["sequences_scores"], want_scores, rtol=0, atol=1e-4)
    else:  # rows stop at different steps, so EOS handling is exercised
        stops = [int(np.flatnonzero(row[1:] == eos)[0]) if (row[1:] == eos).any() else None for row in want]
        assert len(set(stops)) > 1 and any(s is not None for s in stops), want.tolist()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("dec", DECODERS)
def test_roundtrip(tmp_path, dec, tie):
    roundtrip(tmp_path, ENC, dec, tie)


@pytest.mark.parametrize("dec", DECODERS)
def test_warm_start(tmp_path, dec):
    enc_name = "Wav2Vec2Model"
    encoder = build_encoder(enc_name, tmp_path / "enc")
    cls, variant, *_ = SOURCES[dec]
    cfg = F.decoder_config(variant)
    cfg.is_decoder, cfg.add_cross_attention = False, False  # a plain language model, as published
    decoder = F.perturb(cls(cfg), seed=2)
    decoder.save_pretrained(tmp_path / "dec")
    ours = SpeechSeq2Seq.from_encoder_decoder_pretrained(tmp_path / "enc", tmp_path / "dec", pad_token_id=1)
    state, info = ours.state_dict(), ours.loading_info
    filled = check_part(state, encoder, tmp_path / "enc", ENCODER_SOURCES[enc_name], "encoder", info.unexpected)
    filled |= check_part(state, decoder, tmp_path / "dec", SOURCES[dec], "decoder", info.unexpected)
    fresh = set(state) - filled
    assert sorted(info.missing) == sorted(fresh)
    cross = {n for n in state if any(m in n for m in CROSS_ATTENTION)}
    # the proj (16 -> 20) and the cross-attention are new; families whose layers always carry cross-attention
    # (BART-like) fill it from the source
    assert {"enc_to_dec_proj.weight", "enc_to_dec_proj.bias"} <= fresh <= cross | {"enc_to_dec_proj.weight",
                                                                                   "enc_to_dec_proj.bias"}
    check_joined(ours, tmp_path / "joined")


@pytest.mark.parametrize("dec", DECODERS)
def test_config_writes_back(dec):
    """An unchanged config writes back its dict; replaced structural fields reach the dict and transformers' class."""
    d = F.decoder_config(dec).to_dict()
    cfg = decoder_config_from_hf(d)
    assert cfg.to_dict() == d
    changes = dict(DEC_CHANGES)
    if dec == "marian":  # decoder_vocab_size, a key of its own, would keep the old size (refused on parse)
        del changes["vocab_size"]
    if dec in ("xlm-roberta", "electra", "bert-generation"):
        changes["layer_norm_eps"] = 1e-6
    check_written(dataclasses.replace(cfg, **changes), "decoder")


@pytest.mark.parametrize("dec", ["marian", "pegasus"])
def test_sinusoidal_table_from_a_config(dec):
    """A model from a config starts with the sinusoidal position table transformers computes, not a random one."""
    hf = T.SpeechEncoderDecoderModel(T.SpeechEncoderDecoderConfig.from_encoder_decoder_configs(
        F.any_encoder_config(ENC), F.decoder_config(dec)))
    ours = SpeechSeq2Seq.from_config(hf.config.to_dict())
    name = "decoder.model.decoder.embed_positions.weight"
    assert torch.equal(torch.from_numpy(np.array(ours.state_dict()[name])), hf.state_dict()[name])


def test_marian_mt_checkpoint_without_position_table(tmp_path):
    """MarianMTModel does not save its sinusoidal table: a warm start from it makes transformers' table, and the
    joined model gives transformers' logits."""
    cfg = F.decoder_config("marian")
    cfg.is_decoder, cfg.add_cross_attention = False, False
    F.perturb(T.MarianMTModel(cfg), seed=2).save_pretrained(tmp_path / "dec")
    build_encoder("Wav2Vec2Model", tmp_path / "enc")
    ours = SpeechSeq2Seq.from_encoder_decoder_pretrained(tmp_path / "enc", tmp_path / "dec", pad_token_id=1)
    name = "decoder.model.decoder.embed_positions.weight"
    assert name in ours.loading_info.missing
    want = T.MarianForCausalLM(F.decoder_config("marian")).state_dict()["model.decoder.embed_positions.weight"]
    assert torch.equal(torch.from_numpy(np.array(ours.state_dict()[name])), want)
    ours.save_pretrained(tmp_path / "joined")
    compare_logits(ours, T.SpeechEncoderDecoderModel.from_pretrained(tmp_path / "joined").eval())


# ----------------------------------------------------------------------------------------------------------------------
# Speech2Text2: its class left transformers 5, so the reference is stored, made by transformers 4.46.3 with
# tests/reference/make_speech2text2.py (checkpoints as 4.46 wrote them, its outputs in reference.npz).

S2T2 = Path(__file__).parent / "reference" / "speech2text2"


@pytest.fixture(scope="module")
def s2t2_ref():
    with np.load(S2T2 / "reference.npz") as ref:
        return dict(ref)


@pytest.fixture(scope="module")
def s2t2():
    """speechseq's models from the stored 4.46 checkpoints, per tie."""
    out = {}
    for name in ("tied", "untied"):
        ours = SpeechSeq2Seq.from_pretrained(S2T2 / name)
        assert ours.loading_info.missing == [] and ours.loading_info.unexpected == []
        assert ours.config.decoder.tie_word_embeddings == (name == "tied")
        out[name] = ours
    return out


@pytest.mark.parametrize("tie", ["tied", "untied"])
def test_speech2text2_logits_and_loss(s2t2, s2t2_ref, tie):
    """Padded audio with labels (-100 in one row), and right-padded decoder inputs: transformers 4.46's logits and
    loss."""
    r, ours = s2t2_ref, s2t2[tie]
    got = ours(r["audio"], r["audio_mask"], labels=r["labels"])
    assert F.max_abs_diff(got.logits, r[f"{tie}_logits"]) <= LOGITS_TOL
    assert abs(float(got.loss) - float(r[f"{tie}_loss"])) <= LOSS_RTOL * abs(float(r[f"{tie}_loss"]))
    got = ours(r["audio"], r["audio_mask"], decoder_input_ids=r["decoder_input_ids"],
               decoder_attention_mask=r["decoder_attention_mask"])
    assert F.max_abs_diff(got.logits, r[f"{tie}_padded_logits"]) <= LOGITS_TOL
    assert np.abs(r[f"{tie}_padded_logits"][0] - r[f"{tie}_logits"][0]).max() > 1e-3  # different inputs, not a copy


@pytest.mark.parametrize("plan", ["cpu", "xla"])
@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_speech2text2_generate(s2t2, s2t2_ref, mode, plan, monkeypatch):
    """transformers 4.46's greedy and beam tokens (and beam scores), under both decode plans."""
    monkeypatch.setenv("SPEECHSEQ_DECODE_PLAN", plan)
    r, loaded = s2t2_ref, s2t2["tied"]
    ours = SpeechSeq2Seq(loaded.config, loaded.params)  # no decode layout of another plan yet
    kwargs = dict(max_new_tokens=NEW, pad_token_id=PAD, decoder_start_token_id=START, eos_token_id=int(r["eos"]),
                  **(BEAM if mode == "beam" else {}))
    got = ours.generate(r["gen_audio"], r["gen_audio_mask"], return_dict=True, **kwargs)
    np.testing.assert_array_equal(got["sequences"], r[mode])
    if mode == "beam":
        np.testing.assert_allclose(got["sequences_scores"], r["beam_scores"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("tie", ["tied", "untied"])
def test_speech2text2_roundtrip(s2t2, tmp_path, tie):
    """Export gives back the 4.46 checkpoint bit for bit (names included, the stored sinusoidal table too), and the
    config as 4.46 wrote it."""
    s2t2[tie].save_pretrained(tmp_path)
    with open_checkpoint(S2T2 / tie) as want, open_checkpoint(tmp_path) as got:
        assert sorted(got) == sorted(want)
        for name in want:
            a, b = np.asarray(got[name]), np.asarray(want[name])
            assert a.dtype == b.dtype and np.array_equal(a, b), name
    written, theirs = (json.loads((d / "config.json").read_text()) for d in (tmp_path, S2T2 / tie))
    for key in ("encoder", "decoder", "decoder_start_token_id", "pad_token_id", "model_type"):
        assert written[key] == theirs[key], key



def test_speech2text2_warm_start():
    """A standalone Speech2Text2ForCausalLM checkpoint (4.46's) and a Wav2Vec2Model one join into the model they were
    saved from: every tensor equal but the new enc_to_dec_proj."""
    ours = SpeechSeq2Seq.from_encoder_decoder_pretrained(S2T2 / "encoder", S2T2 / "decoder", pad_token_id=PAD)
    proj = ["enc_to_dec_proj.bias", "enc_to_dec_proj.weight"]
    assert sorted(ours.loading_info.missing) == proj and ours.loading_info.unexpected == []
    state = ours.state_dict()
    with open_checkpoint(S2T2 / "tied") as joined:
        assert sorted(state) == sorted(joined)
        for name in joined:
            if name not in proj:
                assert np.array_equal(np.asarray(state[name]), np.asarray(joined[name])), name
