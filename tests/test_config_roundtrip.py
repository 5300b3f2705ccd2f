"""Every typed field stored under one HF key is read and written through its family's ``HFField`` table: an unchanged
config writes back the dict it came from, a ``dataclasses.replace`` of a structural field reaches the dict (and
transformers' own config class), and a replaced field derived by a rule, which the dict cannot carry, is refused."""

from __future__ import annotations

import dataclasses

import pytest
import transformers as T

import hf_factory as F
from speechseq.config import decoder_config_from_hf, encoder_config_from_hf
from speechseq.errors import ConfigError
from speechseq.registry import family

DECODERS = ["bert", "roberta", "gpt2", "bart", "mbart"]
ENCODERS = ["w2v-group", "w2v-adapter", "hubert"]

# structural fields replaced in the tests below (BART has no layer_norm_eps key: see the refusals)
DEC_CHANGES = dict(vocab_size=70, num_layers=3, intermediate_size=28, hidden_act="relu", max_positions=50,
                   tie_word_embeddings=False, bos_token_id=3, eos_token_id=(2, 4))
ENC_CHANGES = dict(num_layers=3, intermediate_size=28, layer_norm_eps=1e-6, hidden_act="relu", conv_dim=(8, 12, 16),
                   conv_kernel=(10, 3, 2), conv_stride=(5, 2, 3), num_conv_pos_embeddings=6, conv_bias=True,
                   add_adapter=True, output_hidden_size=24, num_adapter_layers=2, adapter_stride=3)


def decoder_dict(name: str) -> dict:
    return F.decoder_config(name).to_dict()


def encoder_dict(name: str) -> dict:
    return F.any_encoder_config(name).to_dict()


def as_hf(f, value):
    """A typed value as its HF key holds it."""
    value = f.transform[1](value) if f.transform else value
    return list(value) if isinstance(value, tuple) else value


def theirs(d: dict):
    """transformers' config object read from ``d``."""
    return T.AutoConfig.for_model(d["model_type"], **{k: v for k, v in d.items() if k != "model_type"})


def check_written(cfg, role: str):
    """``cfg.to_dict()`` parses back to ``cfg`` and transformers reads every table field of it under its HF key."""
    d = cfg.to_dict()
    parse = encoder_config_from_hf if role == "encoder" else decoder_config_from_hf
    assert parse(d) == cfg
    hf = theirs(d)
    for f in family(cfg.model_type, role).fields:
        if f.key not in d and not hasattr(hf, f.key):  # a key this class lacks (Wav2Vec2's feat_proj_layer_norm)
            continue
        got = getattr(hf, f.key)
        assert (list(got) if isinstance(got, tuple) else got) == as_hf(f, getattr(cfg, f.attr)), f.attr
    return d


@pytest.mark.parametrize("name", DECODERS)
def test_unchanged_decoder_writes_back_its_dict(name):
    d = decoder_dict(name)
    assert decoder_config_from_hf(d).to_dict() == d


@pytest.mark.parametrize("name", ENCODERS)
def test_unchanged_encoder_writes_back_its_dict(name):
    d = encoder_dict(name)
    assert encoder_config_from_hf(d).to_dict() == d


@pytest.mark.parametrize("name", DECODERS)
def test_replaced_decoder_fields_reach_the_dict(name):
    cfg = decoder_config_from_hf(decoder_dict(name))
    changes = dict(DEC_CHANGES)
    if name in ("bert", "roberta", "gpt2"):
        changes["layer_norm_eps"] = 1e-6
    if name == "bert":  # its head activation follows hidden_act (a stale one would be refused)
        changes.update(type_vocab_size=3, head_act="relu")
    d = check_written(dataclasses.replace(cfg, **changes), "decoder")
    if name in ("bart", "mbart"):  # written through the shift: the table has 2 rows before position 0
        assert d["max_position_embeddings"] == 48 and theirs(d).max_position_embeddings == 48


def test_gpt2_inner_width_follows_its_hf_default():
    d = decoder_dict("gpt2")
    assert d["n_inner"] is None
    cfg = decoder_config_from_hf(d)
    assert cfg.intermediate_size == 80  # 4 * n_embd
    # a wider model keeps its 80-wide MLP: n_inner is written, since None would now mean 96
    wide = dataclasses.replace(cfg, hidden_size=24)
    assert check_written(wide, "decoder")["n_inner"] == 80
    assert decoder_config_from_hf(dataclasses.replace(cfg, hidden_size=24, intermediate_size=96).to_dict()).hf[
        "n_inner"] is None  # 96 is what None gives: nothing to write


@pytest.mark.parametrize("name", ENCODERS)
def test_replaced_encoder_fields_reach_the_dict(name):
    cfg = encoder_config_from_hf(encoder_dict(name))
    changes = ENC_CHANGES if name != "hubert" else {k: v for k, v in ENC_CHANGES.items() if "adapter" not in k
                                                    and k != "output_hidden_size"}  # HubertConfig has no adapter
    check_written(dataclasses.replace(cfg, **changes), "encoder")


@pytest.mark.parametrize("role,name,changes,field", [
    ("decoder", "bart", dict(layer_norm_eps=1e-6), "layer_norm_eps=1e-06"),  # nn.LayerNorm's default, no key
    ("decoder", "bart", dict(embed_scale=3.0), "embed_scale=3.0"),  # from scale_embedding and d_model
    ("decoder", "mbart", dict(pre_norm=False), "pre_norm=False"),  # fixed per family
    ("decoder", "roberta", dict(position_offset=5), "position_offset=5"),  # from pad_token_id
    ("decoder", "gpt2", dict(type_vocab_size=2), "type_vocab_size=2"),
    ("encoder", "w2v-group", dict(masked_spec_embed=False), "masked_spec_embed=False"),  # from the mask rates
])
def test_replaced_derived_field_is_refused(role, name, changes, field):
    parse, d = ((encoder_config_from_hf, encoder_dict(name)) if role == "encoder"
                else (decoder_config_from_hf, decoder_dict(name)))
    bad = dataclasses.replace(parse(d), **changes)
    with pytest.raises(ConfigError, match=rf"^{bad.model_type}: field {field} has no Hugging Face config key") as e:
        bad.to_dict()
    assert "\n" not in str(e.value)
