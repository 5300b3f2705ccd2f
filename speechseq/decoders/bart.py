"""BART and mBART decoders (``BartForCausalLM``, ``MBartForCausalLM``): learned positions offset by 2, optional
sqrt(d_model) embedding scale, an embedding norm; BART is post-norm, mBART pre-norm with a final norm."""

from __future__ import annotations

import math

from speechseq.config import TOKEN_ID, DecoderConfig, HFField, eos_ids, number, read_fields, require_heads
from speechseq.decoders.transformer import DecoderNames
from speechseq.layers.core import check_activation

_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")

NAMES = DecoderNames(
    tokens="{base}embed_tokens.weight",
    extra_token_names=("model.shared.weight", "shared.weight"),
    positions="{base}embed_positions.weight",
    embed_norm="{base}layernorm_embedding",
    layer="{base}layers.{i}",
    self_attn=tuple(f"self_attn.{x}" for x in _ATTN),
    cross_attn=tuple(f"encoder_attn.{x}" for x in _ATTN),
    self_norm="self_attn_layer_norm",
    cross_norm="encoder_attn_layer_norm",
    mlp=("fc1", "fc2"),
    mlp_norm="final_layer_norm",
    final_norm="{base}layer_norm",
    head_kernel="lm_head.weight",
)

POSITION_OFFSET = 2  # fairseq's learned positions start at row 2

# BartConfig / MBartConfig names and defaults; the embeddings use `dropout` too (embed_dropout None)
FIELDS = (
    HFField("hidden_dropout", "dropout", 0.1),
    HFField("attention_dropout", "attention_dropout", 0.0),
    HFField("activation_dropout", "activation_dropout", 0.0),
    HFField("layerdrop", "decoder_layerdrop", 0.0),
)


def parse_config(hf: dict, where: str) -> DecoderConfig:
    mt = hf["model_type"]
    hidden, heads = require_heads(hf, "d_model", "decoder_attention_heads", where)
    mbart = mt == "mbart"
    return DecoderConfig(
        model_type=mt,
        vocab_size=number(hf, "vocab_size", where),
        hidden_size=hidden,
        num_layers=number(hf, "decoder_layers", where),
        num_heads=heads,
        intermediate_size=number(hf, "decoder_ffn_dim", where),
        hidden_act=check_activation(hf.get("activation_function", "gelu"), where),
        max_positions=number(hf, "max_position_embeddings", where, 1024) + POSITION_OFFSET,
        position_offset=POSITION_OFFSET,
        padding_aware_positions=False,
        type_vocab_size=0,
        embed_scale=math.sqrt(hidden) if hf.get("scale_embedding", False) else 1.0,
        embed_norm=True,
        pre_norm=mbart,
        final_norm=mbart,
        layer_norm_eps=1e-5,
        attn_scale=True,
        attn_scale_by_layer=False,
        head_transform=False,
        head_act="gelu",
        head_bias=False,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        pad_token_id=number(hf, "pad_token_id", where, 1, **TOKEN_ID),
        bos_token_id=number(hf, "bos_token_id", where, 0, **TOKEN_ID),
        eos_token_id=eos_ids(hf.get("eos_token_id", 2), f"{where}: field 'eos_token_id'"),
        **read_fields(hf, FIELDS, where),
        hf=hf,
    )
