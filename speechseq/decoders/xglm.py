"""XGLM as a decoder with cross-attention (``XGLMForCausalLM``): pre-norm layers with BART's names, a final norm,
sqrt(d_model) embedding scale, and fairseq's fixed sinusoidal positions (a buffer, not stored) from row 2."""

from __future__ import annotations

from speechseq.config import ACTIVATION, EOS, INT, REQUIRED, TOKEN_ID, DecoderConfig, HFField, read_fields, require_heads
from speechseq.decoders import bart
from speechseq.decoders.transformer import DecoderNames

_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")

NAMES = DecoderNames(
    tokens="{base}embed_tokens.weight",
    positions="{base}embed_positions.weights",  # a non-persistent buffer: never read or written
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

POSITION_OFFSET = 2  # XGLMSinusoidalPositionalEmbedding.offset

# XGLMConfig names and defaults; the embeddings use `dropout` too (embed_dropout None)
FIELDS = (
    HFField("vocab_size", "vocab_size", REQUIRED, INT),
    HFField("hidden_size", "d_model", REQUIRED, INT),
    HFField("num_layers", "num_layers", REQUIRED, INT),
    HFField("num_heads", "attention_heads", REQUIRED, INT),
    HFField("intermediate_size", "ffn_dim", REQUIRED, INT),
    HFField("hidden_act", "activation_function", "gelu", ACTIVATION),
    # the table has POSITION_OFFSET rows before position 0
    HFField("max_positions", "max_position_embeddings", 2048, INT,
            (lambda n: n + POSITION_OFFSET, lambda n: n - POSITION_OFFSET)),
    HFField("tie_word_embeddings", "tie_word_embeddings", True, None),
    HFField("pad_token_id", "pad_token_id", 1, TOKEN_ID),
    HFField("bos_token_id", "bos_token_id", 0, TOKEN_ID),
    HFField("eos_token_id", "eos_token_id", 2, EOS),
    HFField("hidden_dropout", "dropout", 0.1),
    HFField("attention_dropout", "attention_dropout", 0.1),
    HFField("activation_dropout", "activation_dropout", 0.0),
    HFField("layerdrop", "layerdrop", 0.0),
)


def parse_config(hf: dict, where: str) -> DecoderConfig:
    hidden, _ = require_heads(hf, "d_model", "attention_heads", where)  # the divisibility check
    return bart.decoder_config(hf, hidden, read_fields(hf, FIELDS, where), scale_embedding=True, embed_norm=False,
                               pre_norm=True, final_norm=True, sinusoidal_positions=True)
