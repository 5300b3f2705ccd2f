"""ELECTRA as a causal decoder (``ElectraForCausalLM``): BERT's layers and embeddings under ``electra.``, positions
counted from 0, and the generator head (dense + gelu + norm, then a biased projection tied to the token table).

Only checkpoints whose ``embedding_size`` equals ``hidden_size`` (no ``embeddings_project``) are supported."""

from __future__ import annotations

import dataclasses

from speechseq.config import DecoderConfig, read_fields, require_heads
from speechseq.decoders import bert
from speechseq.errors import ConfigError

NAMES = dataclasses.replace(
    bert.BERT_NAMES,
    head_transform="generator_predictions.dense",
    head_transform_norm="generator_predictions.LayerNorm",
    head_kernel="generator_lm_head.weight",
    head_bias=("generator_lm_head.bias",),
    tied_head_bias=(),
    spare_head_bias=None,
)

FIELDS = bert.FIELDS  # ElectraConfig has BertConfig's names and defaults (pad 0, no bos / eos)


def parse_config(hf: dict, where: str) -> DecoderConfig:
    hidden, _ = require_heads(hf, "hidden_size", "num_attention_heads", where)  # the divisibility check
    emb = hf.get("embedding_size", 128)
    if emb != hidden:
        raise ConfigError(f"{where}: electra embedding_size {emb} differs from hidden_size {hidden}; only "
                          "checkpoints without embeddings_project (embedding_size == hidden_size) are supported")
    pos_type = hf.get("position_embedding_type", "absolute")
    if pos_type != "absolute":
        raise ConfigError(f"{where}: position_embedding_type {pos_type!r} is not supported for electra; "
                          "supported: 'absolute'")
    # ElectraGeneratorPredictions: get_activation("gelu"), whatever hidden_act says (decoder_config's head_act)
    return bert.decoder_config(hf, read_fields(hf, FIELDS, where))
