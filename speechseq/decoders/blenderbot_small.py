"""Blenderbot-small's decoder (``BlenderbotSmallForCausalLM``): BART's names and post-norm layers, learned positions
from row 0, and the embedding norm applied to the (unscaled) token embeddings before the positions are added."""

from __future__ import annotations

import dataclasses

from speechseq.config import DecoderConfig, HFField, read_fields, require_heads
from speechseq.decoders import bart
from speechseq.decoders.transformer import DecoderNames

NAMES: DecoderNames = bart.NAMES


def _field(f: HFField) -> HFField:
    """BART's field with BlenderbotSmallConfig's default; the position table has no offset rows."""
    if f.attr == "max_positions":
        return HFField("max_positions", "max_position_embeddings", 512, f.limits)
    defaults = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    return dataclasses.replace(f, default=defaults[f.attr]) if f.attr in defaults else f


FIELDS = tuple(_field(f) for f in bart.FIELDS)


def parse_config(hf: dict, where: str) -> DecoderConfig:
    require_heads(hf, "d_model", "decoder_attention_heads", where)  # the divisibility check
    return DecoderConfig(
        model_type="blenderbot-small",
        position_offset=0,
        padding_aware_positions=False,
        type_vocab_size=0,
        # transformers 5.25's BlenderbotSmallDecoder sets embed_scale from scale_embedding but never applies it (the
        # encoder does); the norm right after hides all but its eps effect, which the parity test sees
        embed_scale=1.0,
        embed_norm=True,
        embed_norm_before_positions=True,
        pre_norm=False,
        final_norm=False,
        layer_norm_eps=1e-5,  # nn.LayerNorm's default: no config key for it
        attn_scale=True,
        attn_scale_by_layer=False,
        head_transform=False,
        head_act="gelu",
        head_bias=False,
        **read_fields(hf, FIELDS, where),
        hf=hf,
    )
