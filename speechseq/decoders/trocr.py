"""TrOCR's decoder (``TrOCRForCausalLM``): BART's names and post-norm layers, an optional embedding norm, optional
sqrt(d_model) embedding scale, and either learned positions from row 2 or fairseq's fixed sinusoidal table (not
stored) whose positions count past padding like RoBERTa's. The LM head is ``output_projection``."""

from __future__ import annotations

import dataclasses

from speechseq.config import DecoderConfig, derive_fields, read_fields, require_heads
from speechseq.decoders import bart
from speechseq.decoders.transformer import DecoderNames
from speechseq.errors import ConfigError

NAMES: DecoderNames = dataclasses.replace(bart.NAMES, extra_token_names=(), head_kernel="output_projection.weight")

# TrOCRConfig has BART's names and defaults but for a 512-position table
FIELDS = derive_fields(bart.FIELDS, defaults={"max_positions": 512})


def parse_config(hf: dict, where: str) -> DecoderConfig:
    hidden, _ = require_heads(hf, "d_model", "decoder_attention_heads", where)  # the divisibility check
    cross = hf.get("cross_attention_hidden_size")
    if cross is not None and cross != hidden:
        raise ConfigError(f"{where}: trocr cross_attention_hidden_size {cross} differs from d_model {hidden}; "
                          "only cross-attention over d_model-wide frames is supported")
    fields = read_fields(hf, FIELDS, where)
    learned = hf.get("use_learned_position_embeddings", True)
    if not learned and fields["pad_token_id"] is None:
        raise ConfigError(f"{where}: trocr with sinusoidal positions needs pad_token_id (they count past padding)")
    # learned: rows from 2; sinusoidal: from pad_token_id + 1 past padding, with the same limit of
    # max_position_embeddings tokens (check_ids) as long as pad_token_id is 1 (every published checkpoint); given
    # decoder_inputs_embeds: the sinusoidal table is indexed by the ids
    return bart.decoder_config(hf, hidden, fields, padding_aware_positions=not learned, sinusoidal_positions=not learned,
                               given_embeds="unscaled" if learned else "unsupported",
                               embed_norm=hf.get("layernorm_embedding", True))
