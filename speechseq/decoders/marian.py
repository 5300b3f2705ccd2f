"""Marian and Pegasus decoders (``MarianForCausalLM``, ``PegasusForCausalLM``, the decoders of ``MarianMTModel`` and
``PegasusForConditionalGeneration``): BART's names without the embedding norm, optional sqrt(d_model) embedding
scale, positions from a sinusoidal table that starts at row 0; Marian is post-norm, Pegasus pre-norm with a final
norm.

The sinusoidal table is a frozen ``nn.Embedding`` weight that the causal-LM classes (and so a
``SpeechEncoderDecoderModel``) store in their checkpoints; it is read and written like a learned table, and made
(``checkpoints.table``'s "sinusoidal" init) where a checkpoint lacks it or a model starts from a config."""

from __future__ import annotations

import dataclasses
from speechseq.config import INT, DecoderConfig, HFField, derive_fields, read_fields, require_heads
from speechseq.decoders import bart
from speechseq.decoders.transformer import DecoderNames
from speechseq.errors import ConfigError

# a table the checkpoint lacks (MarianMTModel does not save it) starts as the sinusoid transformers computes
NAMES: DecoderNames = dataclasses.replace(bart.NAMES, embed_norm=None, positions_init="sinusoidal")


def _fields(**defaults) -> tuple[HFField, ...]:
    """BART's fields with other defaults, and a position table without offset rows."""
    return derive_fields(bart.FIELDS, defaults=defaults,
                         replace={"max_positions": HFField("max_positions", "max_position_embeddings", 1024, INT)})


# MarianConfig / PegasusConfig names and defaults
FIELDS = _fields(pad_token_id=58100, bos_token_id=None, eos_token_id=0)
PEGASUS_FIELDS = _fields(pad_token_id=0, bos_token_id=None, eos_token_id=1)


def parse_config(hf: dict, where: str) -> DecoderConfig:
    mt = hf["model_type"]
    pegasus = mt == "pegasus"
    hidden, _ = require_heads(hf, "d_model", "decoder_attention_heads", where)  # the divisibility check
    fields = read_fields(hf, PEGASUS_FIELDS if pegasus else FIELDS, where)
    dec_vocab = hf.get("decoder_vocab_size")
    if dec_vocab is not None and dec_vocab != fields["vocab_size"]:
        raise ConfigError(f"{where}: decoder_vocab_size {dec_vocab} differs from vocab_size {fields['vocab_size']}; "
                          "only a decoder whose token table and LM head have the same size is supported")
    # given decoder_inputs_embeds: scaled too, as the decoder's forward scales them
    return bart.decoder_config(hf, hidden, fields, position_offset=0, given_embeds="scaled", embed_norm=False,
                               pre_norm=pegasus, final_norm=pegasus)
