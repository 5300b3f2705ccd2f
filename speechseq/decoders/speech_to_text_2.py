"""Speech2Text2's decoder (``Speech2Text2ForCausalLM`` of transformers 4.x; the class left transformers 5): BART's
names and post-norm layers without embedding or final norm, sqrt(d_model) embedding scale, and fairseq's sinusoidal
positions counted past padding (from row pad_token_id + 1, as RoBERTa's). The LM head is ``lm_head``, without bias.

Its sinusoidal table is an ``nn.Parameter`` (``embed_positions.weights``) that transformers 4.x stores in every
checkpoint, max_target_positions + 2 rows: it is read and written like a learned table, so round trips keep it."""

from __future__ import annotations

import dataclasses
import math

from speechseq.config import DecoderConfig, read_fields, require_heads
from speechseq.decoders import bart
from speechseq.decoders.transformer import DecoderNames
from speechseq.errors import ConfigError

NAMES: DecoderNames = dataclasses.replace(bart.NAMES, extra_token_names=(), embed_norm=None,
                                          positions="{base}embed_positions.weights")

# Speech2Text2Config names and defaults: BART's, but the table size is max_target_positions (+ 2 offset rows),
# relu, dropout on the embeddings and residuals 0.1
_DEFAULTS = dict(hidden_act="relu")
FIELDS = tuple(
    dataclasses.replace(f, key="max_target_positions") if f.attr == "max_positions"
    else dataclasses.replace(f, default=_DEFAULTS[f.attr]) if f.attr in _DEFAULTS else f
    for f in bart.FIELDS)


def parse_config(hf: dict, where: str) -> DecoderConfig:
    hidden, _ = require_heads(hf, "d_model", "decoder_attention_heads", where)  # the divisibility check
    fields = read_fields(hf, FIELDS, where)
    pad = fields["pad_token_id"]
    if pad is None:
        raise ConfigError(f"{where}: speech_to_text_2 needs pad_token_id (its positions count past padding)")
    return DecoderConfig(
        model_type="speech_to_text_2",
        position_offset=pad + 1,
        padding_aware_positions=True,
        given_embeds="unsupported",  # 4.x placed positions by the ids only and failed on decoder_inputs_embeds
        type_vocab_size=0,
        embed_scale=math.sqrt(hidden) if hf.get("scale_embedding", True) else 1.0,
        embed_norm=False,
        pre_norm=False,
        final_norm=False,
        layer_norm_eps=1e-5,  # nn.LayerNorm's default: Speech2Text2 has no config key for it
        attn_scale=True,
        attn_scale_by_layer=False,
        head_transform=False,
        head_act="gelu",
        head_bias=False,
        **fields,
        hf=hf,
    )
