"""Speech2Text2's decoder (``Speech2Text2ForCausalLM`` of transformers 4.x; the class left transformers 5): BART's
names and post-norm layers without embedding or final norm, sqrt(d_model) embedding scale, and fairseq's sinusoidal
positions counted past padding (from row pad_token_id + 1, as RoBERTa's). The LM head is ``lm_head``, without bias.

Its sinusoidal table is an ``nn.Parameter`` (``embed_positions.weights``) that transformers 4.x stores in every
checkpoint, max_target_positions + 2 rows: it is read and written like a learned table, so round trips keep it."""

from __future__ import annotations

import dataclasses

from speechseq.config import DecoderConfig, derive_fields, read_fields, require_heads
from speechseq.decoders import bart
from speechseq.decoders.transformer import DecoderNames
from speechseq.errors import ConfigError

NAMES: DecoderNames = dataclasses.replace(bart.NAMES, extra_token_names=(), embed_norm=None,
                                          positions="{base}embed_positions.weights")

# Speech2Text2Config names and defaults: BART's, but the table size is max_target_positions (+ 2 offset rows),
# relu, dropout on the embeddings and residuals 0.1
FIELDS = derive_fields(bart.FIELDS, defaults={"hidden_act": "relu"}, keys={"max_positions": "max_target_positions"})


def parse_config(hf: dict, where: str) -> DecoderConfig:
    hidden, _ = require_heads(hf, "d_model", "decoder_attention_heads", where)  # the divisibility check
    fields = read_fields(hf, FIELDS, where)
    pad = fields["pad_token_id"]
    if pad is None:
        raise ConfigError(f"{where}: speech_to_text_2 needs pad_token_id (its positions count past padding)")
    # given decoder_inputs_embeds: 4.x placed positions by the ids only and failed without them
    return bart.decoder_config(hf, hidden, fields, scale_embedding=True, position_offset=pad + 1,
                               padding_aware_positions=True, given_embeds="unsupported", embed_norm=False)
