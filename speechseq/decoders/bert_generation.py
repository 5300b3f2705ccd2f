"""BertGeneration as a decoder (``BertGenerationDecoder``): BERT's post-norm layers and names under ``bert.``, without
token-type table or prediction-head transform; the LM head is RoBERTa's ``lm_head.decoder`` with its bias."""

from __future__ import annotations

import dataclasses

from speechseq.config import DecoderConfig, read_fields, require_heads
from speechseq.decoders import bert
from speechseq.decoders.transformer import DecoderNames

NAMES: DecoderNames = dataclasses.replace(bert.ROBERTA_NAMES, token_type=None, head_transform=None,
                                          head_transform_norm=None)

# BertGenerationConfig names and defaults: BERT's without type_vocab_size, other special tokens
_DEFAULTS = dict(pad_token_id=0, bos_token_id=2, eos_token_id=1)
FIELDS = tuple(dataclasses.replace(f, default=_DEFAULTS[f.attr]) if f.attr in _DEFAULTS else f
               for f in bert.FIELDS if f.attr != "type_vocab_size")


def parse_config(hf: dict, where: str) -> DecoderConfig:
    require_heads(hf, "hidden_size", "num_attention_heads", where)  # the divisibility check, before the table
    return DecoderConfig(
        model_type="bert-generation",
        position_offset=0,
        padding_aware_positions=False,
        type_vocab_size=0,
        embed_scale=1.0,
        embed_norm=True,
        pre_norm=False,
        final_norm=False,
        attn_scale=True,
        attn_scale_by_layer=False,
        head_transform=False,
        head_act="gelu",
        head_bias=True,
        **read_fields(hf, FIELDS, where),
        hf=hf,
    )
