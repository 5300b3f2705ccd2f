"""GPT-2 as a decoder with cross-attention (``GPT2LMHeadModel``): pre-norm, fused ``Conv1D`` projections stored
[in, out], final norm, optional per-layer score scaling."""

from __future__ import annotations

from speechseq.config import (ACTIVATION, EOS, INT, POSITIVE, REQUIRED, TOKEN_ID, DecoderConfig, HFField, read_fields,
                              require_heads)
from speechseq.decoders.transformer import DecoderNames

NAMES = DecoderNames(
    tokens="{base}wte.weight",
    positions="{base}wpe.weight",
    layer="{base}h.{i}",
    self_attn=("attn.c_attn", "attn.c_proj"),
    cross_attn=("crossattention.q_attn", "crossattention.c_attn", "crossattention.c_proj"),
    self_norm="ln_1",
    cross_norm="ln_cross_attn",
    mlp=("mlp.c_fc", "mlp.c_proj"),
    mlp_norm="ln_2",
    final_norm="{base}ln_f",
    head_kernel="lm_head.weight",
    torch_linear=False,
)

# GPT2Config names and defaults: resid_pdrop after both attention projections and the MLP
FIELDS = (
    HFField("vocab_size", "vocab_size", REQUIRED, INT),
    HFField("hidden_size", "n_embd", REQUIRED, INT),
    HFField("num_layers", "n_layer", REQUIRED, INT),
    HFField("num_heads", "n_head", REQUIRED, INT),
    # n_inner None (or absent) means 4 * n_embd, as in GPT2MLP
    HFField("intermediate_size", "n_inner", lambda hf: 4 * hf["n_embd"], INT),
    HFField("hidden_act", "activation_function", "gelu_new", ACTIVATION),
    HFField("max_positions", "n_positions", 1024, INT),
    HFField("layer_norm_eps", "layer_norm_epsilon", 1e-5, POSITIVE),
    HFField("attn_scale", "scale_attn_weights", True, None),
    HFField("attn_scale_by_layer", "scale_attn_by_inverse_layer_idx", False, None),
    HFField("tie_word_embeddings", "tie_word_embeddings", True, None),
    HFField("pad_token_id", "pad_token_id", None, TOKEN_ID),
    HFField("bos_token_id", "bos_token_id", None, TOKEN_ID),
    HFField("eos_token_id", "eos_token_id", None, EOS),
    HFField("hidden_dropout", "resid_pdrop", 0.1),
    HFField("embed_dropout", "embd_pdrop", 0.1),
    HFField("attention_dropout", "attn_pdrop", 0.1),
)


def parse_config(hf: dict, where: str) -> DecoderConfig:
    require_heads(hf, "n_embd", "n_head", where)  # the divisibility check, before the table
    return DecoderConfig(
        model_type="gpt2",
        position_offset=0,
        padding_aware_positions=False,
        type_vocab_size=0,
        embed_scale=1.0,
        embed_norm=False,
        pre_norm=True,
        final_norm=True,
        # reorder_and_upcast_attn only upcasts scores to float32, which speechseq always does
        head_transform=False,
        head_act="gelu",
        head_bias=False,
        **read_fields(hf, FIELDS, where),
        hf=hf,
    )
