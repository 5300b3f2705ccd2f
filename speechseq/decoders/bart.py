"""BART and mBART decoders (``BartForCausalLM``, ``MBartForCausalLM``): learned positions offset by 2, optional
sqrt(d_model) embedding scale, an embedding norm; BART is post-norm, mBART pre-norm with a final norm."""

from __future__ import annotations

import math

from speechseq.config import ACTIVATION, EOS, INT, REQUIRED, TOKEN_ID, DecoderConfig, HFField, read_fields, require_heads
from speechseq.decoders.transformer import DecoderNames

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
    HFField("vocab_size", "vocab_size", REQUIRED, INT),
    HFField("hidden_size", "d_model", REQUIRED, INT),
    HFField("num_layers", "decoder_layers", REQUIRED, INT),
    HFField("num_heads", "decoder_attention_heads", REQUIRED, INT),
    HFField("intermediate_size", "decoder_ffn_dim", REQUIRED, INT),
    HFField("hidden_act", "activation_function", "gelu", ACTIVATION),
    # the position table has POSITION_OFFSET rows before position 0
    HFField("max_positions", "max_position_embeddings", 1024, INT,
            (lambda n: n + POSITION_OFFSET, lambda n: n - POSITION_OFFSET)),
    HFField("tie_word_embeddings", "tie_word_embeddings", True, None),
    HFField("pad_token_id", "pad_token_id", 1, TOKEN_ID),
    HFField("bos_token_id", "bos_token_id", 0, TOKEN_ID),
    HFField("eos_token_id", "eos_token_id", 2, EOS),
    HFField("hidden_dropout", "dropout", 0.1),
    HFField("attention_dropout", "attention_dropout", 0.0),
    HFField("activation_dropout", "activation_dropout", 0.0),
    HFField("layerdrop", "decoder_layerdrop", 0.0),
)


def decoder_config(hf: dict, hidden: int, fields: dict, scale_embedding: bool = False, **flags) -> DecoderConfig:
    """A DecoderConfig of the BART family (BART, mBART, Marian, Pegasus, TrOCR, Speech2Text2, Blenderbot-small,
    XGLM): ``fields`` as ``read_fields`` gives them, BART's layout (learned positions from row 2, an embedding norm,
    post-norm layers, nn.LayerNorm's eps since no config names one, no head transform or head bias, sqrt(d_model)
    embedding scale where ``scale_embedding`` says, with the family's default) and a family's ``flags`` over it."""
    values = dict(
        model_type=hf["model_type"],
        position_offset=POSITION_OFFSET,
        padding_aware_positions=False,
        type_vocab_size=0,
        embed_scale=math.sqrt(hidden) if hf.get("scale_embedding", scale_embedding) else 1.0,
        embed_norm=True,
        pre_norm=False,
        final_norm=False,
        layer_norm_eps=1e-5,
        attn_scale=True,
        attn_scale_by_layer=False,
        head_transform=False,
        head_act="gelu",
        head_bias=False,
    )
    return DecoderConfig(**{**values, **flags, **fields}, hf=hf)


def parse_config(hf: dict, where: str) -> DecoderConfig:
    hidden, _ = require_heads(hf, "d_model", "decoder_attention_heads", where)  # the divisibility check
    mbart = hf["model_type"] == "mbart"
    return decoder_config(hf, hidden, read_fields(hf, FIELDS, where), pre_norm=mbart, final_norm=mbart)
