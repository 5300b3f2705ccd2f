"""Warm start from standalone transformers checkpoints (``from_encoder_decoder_pretrained``): source weights arrive
unchanged, fresh weights are reported, sub-config overrides apply, and the saved result loads in transformers with
the same logits. Also the adapter whose output width differs from both the encoder's and the decoder's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as T
from safetensors import safe_open

import hf_factory as F
from speechseq import SpeechSeq2Seq

CROSS_ATTENTION = ("crossattention", "ln_cross_attn", "encoder_attn")
LOGITS_TOL = 1e-4

# standalone source: (transformers class, factory variant, where the base model sits in its checkpoint,
#                     where it sits inside SpeechEncoderDecoderModel's encoder/decoder, checkpoint names it ignores)
ENCODER_SOURCES = {
    "Wav2Vec2Model": (T.Wav2Vec2Model, "w2v-layer-stable", "", "", ()),
    "Wav2Vec2ForCTC": (T.Wav2Vec2ForCTC, "w2v-group", "wav2vec2.", "", ("lm_head.",)),
    "HubertModel": (T.HubertModel, "hubert", "", "", ()),
}
DECODER_SOURCES = {
    "BertModel": (T.BertModel, "bert", "", "bert.", ("pooler.",)),
    "BertLMHeadModel": (T.BertLMHeadModel, "bert", "bert.", "bert.", ()),
    "BertForMaskedLM": (T.BertForMaskedLM, "bert", "bert.", "bert.", ()),
    "RobertaForCausalLM": (T.RobertaForCausalLM, "roberta", "roberta.", "roberta.", ()),
    "GPT2Model": (T.GPT2Model, "gpt2", "", "transformer.", ()),
    "GPT2LMHeadModel": (T.GPT2LMHeadModel, "gpt2-scaled", "transformer.", "transformer.", ()),
    "BartModel": (T.BartModel, "bart", "decoder.", "model.decoder.", ("encoder.",)),
    "BartForConditionalGeneration": (T.BartForConditionalGeneration, "bart-scaled", "model.decoder.",
                                     "model.decoder.", ("model.encoder.", "final_logits_bias")),
    "BartForCausalLM": (T.BartForCausalLM, "bart", "model.decoder.", "model.decoder.", ()),
    "MBartForCausalLM": (T.MBartForCausalLM, "mbart", "model.decoder.", "model.decoder.", ()),
}
# each decoder source is joined to one encoder source, so that every encoder source is used too
PAIRS = [(list(ENCODER_SOURCES)[i % len(ENCODER_SOURCES)], dec) for i, dec in enumerate(DECODER_SOURCES)]


def build_encoder(name: str, path: Path, **overrides) -> torch.nn.Module:
    cls, variant, *_ = ENCODER_SOURCES[name]
    model = F.perturb(cls(F.any_encoder_config(variant, **overrides)), seed=1)
    model.save_pretrained(path)
    return model


def build_decoder(name: str, path: Path, hidden: int = 20) -> torch.nn.Module:
    cls, family, *_ = DECODER_SOURCES[name]
    cfg = F.decoder_config(family, hidden)
    cfg.is_decoder, cfg.add_cross_attention = False, False  # a plain language model, as published
    model = F.perturb(cls(cfg), seed=2)
    model.save_pretrained(path)
    return model


def rename(name: str, source_base: str, target_base: str, role: str) -> str:
    """A source checkpoint name -> its name in the SpeechEncoderDecoderModel state dict."""
    if name.startswith(source_base):
        return f"{role}.{target_base}{name[len(source_base):]}"
    return f"{role}.{name}"  # heads at the root of a causal-LM class


def check_part(ours: dict, source: torch.nn.Module, path: Path, spec: tuple, role: str, unexpected: list) -> set:
    """Every source tensor arrives unchanged under its seq2seq name, is a tied alias of one that does (BERT's two
    head biases, BART's shared table, GPT-2's lm_head), or is one the spec says is ignored, which is then reported
    unexpected when the checkpoint holds it. Returns the seq2seq names filled from the source."""
    _, _, source_base, target_base, ignored = spec
    state = source.state_dict()
    filled, arrived = set(), set()
    for name, value in state.items():
        target = rename(name, source_base, target_base, role)
        if name.startswith(ignored):
            assert target not in ours, name
        elif target in ours:
            assert torch.equal(torch.from_numpy(np.array(ours[target])), value), name
            filled.add(target)
            arrived.add(value.data_ptr())
    for name, value in state.items():
        if not name.startswith(ignored) and rename(name, source_base, target_base, role) not in ours:
            assert value.data_ptr() in arrived, f"{name} was dropped"
    with safe_open(path / "model.safetensors", "pt") as f:
        ignored_in_file = {f"{role}.{n}" for n in f.keys() if n.startswith(ignored)}
    assert {n for n in unexpected if n.startswith(role + ".")} == ignored_in_file
    return filled


def load_state(model: torch.nn.Module, state: dict) -> torch.nn.Module:
    """Load speechseq's state dict into a transformers model; only tied aliases of loaded tensors may be absent."""
    result = model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=False)
    assert result.unexpected_keys == []
    params = model.state_dict()
    loaded = {params[k].data_ptr() for k in state}
    assert all(params[k].data_ptr() in loaded for k in result.missing_keys), result.missing_keys
    return model.eval()


def check_encoder_warm_start(encoder: torch.nn.Module, spec: tuple, tmp_path: Path) -> list:
    """A standalone transformers encoder, saved and warm-started with a BERT decoder: every encoder tensor comes
    from it (``check_part`` with ``spec``), what is fresh is what ``loading_info.missing`` lists, and the joined
    checkpoint loads in transformers with nothing missing, the same tensors and the same logits. Returns
    ``loading_info.unexpected`` (for the caller's check of the heads it reports)."""
    encoder.save_pretrained(tmp_path / "enc")
    decoder = build_decoder("BertLMHeadModel", tmp_path / "dec")
    ours = SpeechSeq2Seq.from_encoder_decoder_pretrained(tmp_path / "enc", tmp_path / "dec", pad_token_id=1)
    assert ours.config.encoder.model_type == encoder.config.model_type
    state, info = ours.state_dict(), ours.loading_info
    filled = check_part(state, encoder, tmp_path / "enc", spec, "encoder", info.unexpected)
    filled |= check_part(state, decoder, tmp_path / "dec", ("", "", "bert.", "bert.", ()), "decoder",
                         info.unexpected)
    fresh = set(state) - filled
    assert sorted(info.missing) == sorted(fresh)
    assert not any(n.startswith("encoder.") for n in fresh)  # the whole encoder came from the source
    check_joined(ours, tmp_path / "joined")
    return info.unexpected


def check_joined(ours: SpeechSeq2Seq, folder) -> None:
    """The warm-started model saved to ``folder`` loads in transformers with every tensor as ours and no loading
    report, and gives our logits and loss."""
    ours.save_pretrained(folder)
    hf, hf_info = T.SpeechEncoderDecoderModel.from_pretrained(folder, output_loading_info=True)
    assert not any(hf_info.values()), hf_info
    hf_state = hf.state_dict()
    for name, value in ours.state_dict().items():
        assert torch.equal(hf_state[name], torch.from_numpy(np.array(value))), name
    compare_logits(ours, hf.eval())


def compare_logits(ours: SpeechSeq2Seq, hf: torch.nn.Module) -> None:
    x, mask = F.audio_batch((1600, 1100))
    labels = F.tokens(2, 6)
    labels[0, 5:] = -100
    want = F.hf_forward(hf, input_values=x, attention_mask=mask, labels=labels)
    got = ours(x, mask, labels=labels)
    assert F.max_abs_diff(got.logits, want.logits) <= LOGITS_TOL
    assert abs(float(got.loss) - float(want.loss)) <= 1e-5 * float(want.loss)


@pytest.mark.parametrize("enc,dec", PAIRS)
def test_warm_start(tmp_path, enc, dec):
    encoder = build_encoder(enc, tmp_path / "enc")
    decoder = build_decoder(dec, tmp_path / "dec")
    ours = SpeechSeq2Seq.from_encoder_decoder_pretrained(tmp_path / "enc", tmp_path / "dec", pad_token_id=1)
    assert ours.config.pad_token_id == 1
    assert ours.config.decoder.hf["is_decoder"] and ours.config.decoder.hf["add_cross_attention"]
    state = ours.state_dict()
    info = ours.loading_info
    filled = check_part(state, encoder, tmp_path / "enc", ENCODER_SOURCES[enc], "encoder", info.unexpected)
    filled |= check_part(state, decoder, tmp_path / "dec", DECODER_SOURCES[dec], "decoder", info.unexpected)
    assert len(info.unexpected) == len(set(info.unexpected))
    # missing: exactly the model's weights that no source filled, named as in the model's state dict
    fresh = set(state) - filled
    assert sorted(info.missing) == sorted(fresh), sorted(set(info.missing) ^ fresh)[:4]
    proj = {"enc_to_dec_proj.weight", "enc_to_dec_proj.bias"}  # 16 -> 20
    cross = {n for n in state if any(m in n for m in CROSS_ATTENTION)}
    assert proj <= fresh and cross
    if not dec.startswith(("Bart", "MBart")):  # BART decoder layers always carry cross-attention
        assert cross <= fresh
    head = {n for n in state if n.startswith("decoder.cls.predictions.")}  # BertModel has no LM head
    assert fresh - proj - cross <= (head if dec == "BertModel" else set())

    check_joined(ours, tmp_path / "joined")


def test_decoder_start_token_id_is_top_level(tmp_path):
    """``decoder_start_token_id`` is a top-level field (as the docstring says), not ``start_token_id`` of the
    decoder sub-config, although it starts with ``decoder_``."""
    build_encoder("HubertModel", tmp_path / "enc")
    build_decoder("BertLMHeadModel", tmp_path / "dec")
    ours = SpeechSeq2Seq.from_encoder_decoder_pretrained(tmp_path / "enc", tmp_path / "dec",
                                                         decoder_start_token_id=3, pad_token_id=4)
    assert "start_token_id" not in ours.config.decoder.hf
    assert ours.config.decoder_start_token_id == 3 and ours.config.pad_token_id == 4
    assert ours.config.to_dict()["decoder_start_token_id"] == 3


def test_sub_config_overrides(tmp_path):
    build_encoder("Wav2Vec2Model", tmp_path / "enc")
    build_decoder("BartForCausalLM", tmp_path / "dec")
    ours = SpeechSeq2Seq.from_encoder_decoder_pretrained(
        tmp_path / "enc", tmp_path / "dec", encoder_add_adapter=True, encoder_num_adapter_layers=2,
        encoder_adapter_stride=2, decoder_dropout=0.1, pad_token_id=1)
    enc, dec = ours.config.encoder, ours.config.decoder
    assert enc.add_adapter and enc.num_adapter_layers == 2 and enc.hf["add_adapter"] is True
    assert dec.hf["dropout"] == 0.1
    adapter = {n for n in ours.state_dict() if n.startswith("encoder.adapter.")}
    assert adapter == {f"encoder.adapter.layers.{i}.conv.{w}" for i in range(2) for w in ("weight", "bias")}
    assert adapter <= set(ours.loading_info.missing)
    ours.save_pretrained(tmp_path / "joined")
    hf = T.SpeechEncoderDecoderModel.from_pretrained(tmp_path / "joined")
    assert hf.config.encoder.add_adapter and hf.config.encoder.num_adapter_layers == 2
    assert hf.config.decoder.dropout == 0.1
    compare_logits(ours, hf.eval())


# ---------------------------------------------------------------------------------------------- 24-wide adapter
# encoder 16 wide, adapter output 24, decoder 20: transformers builds enc_to_dec_proj as Linear(16, 20) and fails in
# forward; speechseq projects from the 24 that really arrive. The reference is transformers with that fixed by hand.


def hf_with_fixed_projection(config: T.SpeechEncoderDecoderConfig) -> T.SpeechEncoderDecoderModel:
    model = T.SpeechEncoderDecoderModel(config)
    model.enc_to_dec_proj = torch.nn.Linear(config.encoder.output_hidden_size, config.decoder.hidden_size)
    return model.eval()


def wide_adapter_config() -> T.SpeechEncoderDecoderConfig:
    cfg = T.SpeechEncoderDecoderConfig.from_encoder_decoder_configs(F.encoder_config("w2v-adapter"),
                                                                    F.decoder_config("roberta", 20))
    cfg.decoder_start_token_id, cfg.pad_token_id = 0, 1
    assert (cfg.encoder.hidden_size, cfg.encoder.output_hidden_size, cfg.decoder.hidden_size) == (16, 24, 20)
    return cfg


def test_wide_adapter_from_pretrained(tmp_path):
    torch.manual_seed(0)
    hf = F.perturb(hf_with_fixed_projection(wide_adapter_config()))
    hf.save_pretrained(tmp_path)
    ours = SpeechSeq2Seq.from_pretrained(tmp_path)
    assert ours.loading_info.missing == [] and ours.loading_info.unexpected == []
    assert ours.state_dict()["enc_to_dec_proj.weight"].shape == (20, 24)
    compare_logits(ours, hf)


def test_wide_adapter_from_config(tmp_path):
    cfg = wide_adapter_config()
    ours = SpeechSeq2Seq.from_config(cfg.to_dict(), seed=0)
    assert ours.config.encoder.output_size == 24 and ours.config.has_enc_to_dec_proj
    compare_logits(ours, load_state(hf_with_fixed_projection(cfg), ours.state_dict()))


def test_wide_adapter_warm_start(tmp_path):
    build_encoder("Wav2Vec2Model", tmp_path / "enc")
    build_decoder("RobertaForCausalLM", tmp_path / "dec")
    ours = SpeechSeq2Seq.from_encoder_decoder_pretrained(
        tmp_path / "enc", tmp_path / "dec", encoder_add_adapter=True, encoder_output_hidden_size=24,
        encoder_num_adapter_layers=2, pad_token_id=1)
    state = ours.state_dict()
    assert state["enc_to_dec_proj.weight"].shape == (20, 24)
    assert state["encoder.adapter.proj.weight"].shape == (24, 16)
    fresh = {n for n in state if n.startswith(("encoder.adapter.", "enc_to_dec_proj."))}
    assert fresh <= set(ours.loading_info.missing)
    ours.save_pretrained(tmp_path / "joined")
    config = T.SpeechEncoderDecoderConfig.from_pretrained(tmp_path / "joined")
    assert config.encoder.output_hidden_size == 24 and config.encoder.add_adapter
    compare_logits(ours, load_state(hf_with_fixed_projection(config), state))
