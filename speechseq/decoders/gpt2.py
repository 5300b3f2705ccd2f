"""GPT-2 as a decoder with cross-attention (``GPT2LMHeadModel``): pre-norm, fused ``Conv1D`` projections stored
[in, out], final norm, optional per-layer score scaling."""

from __future__ import annotations

from speechseq.config import POSITIVE, TOKEN_ID, DecoderConfig, HFField, eos_ids, number, read_fields, require_heads
from speechseq.decoders.transformer import DecoderNames
from speechseq.layers.core import check_activation

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
    HFField("hidden_dropout", "resid_pdrop", 0.1),
    HFField("embed_dropout", "embd_pdrop", 0.1),
    HFField("attention_dropout", "attn_pdrop", 0.1),
)


def parse_config(hf: dict, where: str) -> DecoderConfig:
    hidden, heads = require_heads(hf, "n_embd", "n_head", where)
    return DecoderConfig(
        model_type="gpt2",
        vocab_size=number(hf, "vocab_size", where),
        hidden_size=hidden,
        num_layers=number(hf, "n_layer", where),
        num_heads=heads,
        intermediate_size=number(hf, "n_inner", where, 4 * hidden),
        hidden_act=check_activation(hf.get("activation_function", "gelu_new"), where),
        max_positions=number(hf, "n_positions", where, 1024),
        position_offset=0,
        padding_aware_positions=False,
        type_vocab_size=0,
        embed_scale=1.0,
        embed_norm=False,
        pre_norm=True,
        final_norm=True,
        layer_norm_eps=number(hf, "layer_norm_epsilon", where, 1e-5, **POSITIVE),
        attn_scale=bool(hf.get("scale_attn_weights", True)),
        attn_scale_by_layer=bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
        # reorder_and_upcast_attn only upcasts scores to float32, which speechseq always does
        head_transform=False,
        head_act="gelu",
        head_bias=False,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        pad_token_id=number(hf, "pad_token_id", where, None, **TOKEN_ID),
        bos_token_id=number(hf, "bos_token_id", where, None, **TOKEN_ID),
        eos_token_id=eos_ids(hf.get("eos_token_id"), f"{where}: field 'eos_token_id'"),
        **read_fields(hf, FIELDS, where),
        hf=hf,
    )
