"""BertGeneration as a decoder (``BertGenerationDecoder``): BERT's post-norm layers and names under ``bert.``, without
token-type table or prediction-head transform; the LM head is RoBERTa's ``lm_head.decoder`` with its bias."""

from __future__ import annotations

import dataclasses

from speechseq.config import DecoderConfig, derive_fields, read_fields, require_heads
from speechseq.decoders import bert
from speechseq.decoders.transformer import DecoderNames

NAMES: DecoderNames = dataclasses.replace(bert.ROBERTA_NAMES, token_type=None, head_transform=None,
                                          head_transform_norm=None)

# BertGenerationConfig names and defaults: BERT's without type_vocab_size, other special tokens
FIELDS = derive_fields(bert.FIELDS, defaults={"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1},
                       drop=("type_vocab_size",))


def parse_config(hf: dict, where: str) -> DecoderConfig:
    require_heads(hf, "hidden_size", "num_attention_heads", where)  # the divisibility check, before the table
    return bert.decoder_config(hf, read_fields(hf, FIELDS, where), model_type="bert-generation", type_vocab_size=0,
                               head_transform=False)
