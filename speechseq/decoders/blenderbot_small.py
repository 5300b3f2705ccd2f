"""Blenderbot-small's decoder (``BlenderbotSmallForCausalLM``): BART's names and post-norm layers, learned positions
from row 0, and the embedding norm applied to the (unscaled) token embeddings before the positions are added."""

from __future__ import annotations

from speechseq.config import INT, DecoderConfig, HFField, derive_fields, read_fields, require_heads
from speechseq.decoders import bart
from speechseq.decoders.transformer import DecoderNames

NAMES: DecoderNames = bart.NAMES


# BlenderbotSmallConfig's defaults; the position table has no offset rows
FIELDS = derive_fields(bart.FIELDS, defaults={"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
                       replace={"max_positions": HFField("max_positions", "max_position_embeddings", 512, INT)})


def parse_config(hf: dict, where: str) -> DecoderConfig:
    hidden, _ = require_heads(hf, "d_model", "decoder_attention_heads", where)  # the divisibility check
    # transformers 5.25's BlenderbotSmallDecoder sets embed_scale from scale_embedding but never applies it (the
    # encoder does); the norm right after hides all but its eps effect, which the parity test sees
    return bart.decoder_config(hf, hidden, read_fields(hf, FIELDS, where), position_offset=0, embed_scale=1.0,
                               embed_norm_before_positions=True)
