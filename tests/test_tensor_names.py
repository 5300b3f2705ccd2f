"""Tensor names as transformers 5.25 writes them: speechseq's ``save_pretrained``, ``convert`` then ``export``, and a
warm start write the same tensors under the same names (tied copies left out, as transformers leaves them out).

BERT and RoBERTa heads hold two output biases; tied, transformers ties ``decoder.bias`` to the head's own ``bias``
and writes only ``cls.predictions.bias`` / ``lm_head.bias``."""

from __future__ import annotations

import numpy as np
import pytest
import transformers as T
from safetensors.numpy import load_file

import hf_factory as F
from speechseq import SpeechSeq2Seq
from speechseq.checkpoints.convert import convert, export
from speechseq.checkpoints.readers import write_safetensors

# "w2v-adapter" (24 wide) cannot run in transformers with a 20-wide decoder (see hf_factory.EXTRA_ENCODERS)
ENCODERS = [name for name in F.ENCODERS if name != "w2v-adapter"] + ["w2v-adapter-20"]
# every decoder family tied and untied, each joined to one encoder so that every encoder is used too
CASES = [(ENCODERS[i % len(ENCODERS)], dec, tie)
         for i, (dec, tie) in enumerate((d, t) for d in F.DECODERS for t in (True, False))]
IDS = [f"{enc}-{dec}-{'tied' if tie else 'untied'}" for enc, dec, tie in CASES]


def assert_same_file(got: dict, want: dict) -> None:
    """Same names, and every tensor bit-identical (dtype, shape, bytes)."""
    assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))
    for name, value in want.items():
        assert got[name].dtype == value.dtype and np.array_equal(got[name], value), name


@pytest.fixture(params=CASES, ids=IDS)
def hf_dir(request, tmp_path):
    enc, dec, tie = request.param
    F.any_seq2seq(enc, dec, tie=tie).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_save_pretrained_writes_transformers_names(hf_dir, tmp_path):
    SpeechSeq2Seq.from_pretrained(hf_dir).save_pretrained(tmp_path / "ours")
    assert_same_file(load_file(tmp_path / "ours" / "model.safetensors"), load_file(hf_dir / "model.safetensors"))


def test_convert_then_export_gives_back_the_file(hf_dir, tmp_path):
    convert(hf_dir, tmp_path / "ss", progress=False)
    export(tmp_path / "ss", tmp_path / "back", progress=False)
    assert_same_file(load_file(tmp_path / "back" / "model.safetensors"), load_file(hf_dir / "model.safetensors"))


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("cls,family,head", [(T.BertLMHeadModel, "bert", "cls.predictions"),
                                             (T.BertForMaskedLM, "bert", "cls.predictions"),
                                             (T.RobertaForCausalLM, "roberta", "lm_head")],
                         ids=["BertLMHeadModel", "BertForMaskedLM", "RobertaForCausalLM"])
def test_warm_start_keeps_head_bias_names(tmp_path, cls, family, head, tie):
    """The joined model's file has the names transformers' own warm start writes, and the source's head biases
    arrive under their own names."""
    F.perturb(T.Wav2Vec2Model(F.any_encoder_config("w2v-layer-stable")), seed=1).save_pretrained(tmp_path / "enc")
    cfg = F.decoder_config(family, tie=tie)
    cfg.is_decoder, cfg.add_cross_attention = False, False  # a plain language model, as published
    F.perturb(cls(cfg), seed=2).save_pretrained(tmp_path / "dec")
    source = load_file(tmp_path / "dec" / "model.safetensors")
    assert f"{head}.bias" in source

    SpeechSeq2Seq.from_encoder_decoder_pretrained(tmp_path / "enc", tmp_path / "dec").save_pretrained(tmp_path / "ours")
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    T.SpeechEncoderDecoderModel.from_encoder_decoder_pretrained(tmp_path / "enc", tmp_path / "dec").save_pretrained(
        tmp_path / "theirs")
    theirs = load_file(tmp_path / "theirs" / "model.safetensors")
    assert sorted(ours) == sorted(theirs), sorted(set(ours) ^ set(theirs))
    for name in (f"{head}.bias", f"{head}.decoder.bias"):
        if name in source:
            assert np.array_equal(ours[f"decoder.{name}"], source[name]), name


def test_reads_the_old_head_bias_name(tmp_path):
    """A tied BERT head bias under ``decoder.bias`` (what speechseq wrote before) still loads, and is written back
    under the name transformers writes."""
    F.seq2seq("hubert", "bert").save_pretrained(tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    bias = tensors.pop("decoder.cls.predictions.bias")
    (tmp_path / "old").mkdir()
    write_safetensors(tmp_path / "old" / "model.safetensors", {**tensors, "decoder.cls.predictions.decoder.bias": bias})
    (tmp_path / "old" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    ours = SpeechSeq2Seq.from_pretrained(tmp_path / "old")
    assert ours.loading_info.missing == [] and ours.loading_info.unexpected == []
    ours.save_pretrained(tmp_path / "ours")
    assert_same_file(load_file(tmp_path / "ours" / "model.safetensors"),
                     load_file(tmp_path / "hf" / "model.safetensors"))
