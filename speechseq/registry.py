"""The one registry of model families: ``model_type`` -> config parser, weight table, base-model prefixes.

Adding a family is one new file (its config parser and names) plus one line here; nothing else branches on family
names. ``prefixes`` lists where the base model sits in a standalone checkpoint; the first is the layout inside a
``SpeechEncoderDecoderModel`` (bare model for encoders, the causal-LM class for decoders).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from speechseq.decoders import bart, bert, gpt2
from speechseq.decoders.transformer import decode, weight_rules as decoder_rules
from speechseq.encoders import wav2vec2
from speechseq.config import HFField
from speechseq.errors import ConfigError
from speechseq.checkpoints.table import Rule


@dataclass(frozen=True)
class Family:
    name: str
    role: str  # "encoder" or "decoder"
    parse_config: Callable[[dict, str], Any]
    weight_rules: Callable[[Any], list[Rule]]
    prefixes: tuple[str, ...]
    # encoders: encode(cfg, p, audio, mask, dtype, rng=None); decoders: decode(cfg, p, ids, ..., rng=None)
    apply: Callable[..., Any]
    # encoders: frame_mask(cfg, sample mask [B, N], S) -> mask [B, S] of the frames `apply` returns, for
    # precomputed frames given with a sample mask; decoders: None
    frame_mask: Callable[..., Any] | None = None
    # the config fields stored under one HF key each: parse_config reads them, the config's to_dict writes them back
    fields: tuple[HFField, ...] = ()


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("wav2vec2", "encoder", wav2vec2.parse_config, wav2vec2.weight_rules, ("", "wav2vec2."), wav2vec2.encode,
               wav2vec2.frame_mask, wav2vec2.FIELDS),
        Family("hubert", "encoder", wav2vec2.parse_config, wav2vec2.weight_rules, ("", "hubert."), wav2vec2.encode,
               wav2vec2.frame_mask, wav2vec2.FIELDS),
        Family("bert", "decoder", bert.parse_config, partial(decoder_rules, n=bert.BERT_NAMES), ("bert.", ""), decode,
               fields=bert.FIELDS),
        Family("roberta", "decoder", bert.parse_config, partial(decoder_rules, n=bert.ROBERTA_NAMES),
               ("roberta.", ""), decode, fields=bert.ROBERTA_FIELDS),
        Family("gpt2", "decoder", gpt2.parse_config, partial(decoder_rules, n=gpt2.NAMES), ("transformer.", ""), decode,
               fields=gpt2.FIELDS),
        Family("bart", "decoder", bart.parse_config, partial(decoder_rules, n=bart.NAMES),
               ("model.decoder.", "decoder.", ""), decode, fields=bart.FIELDS),
        Family("mbart", "decoder", bart.parse_config, partial(decoder_rules, n=bart.NAMES),
               ("model.decoder.", "decoder.", ""), decode, fields=bart.FIELDS),
    )
}


def family(model_type: Any, role: str, where: str = "config") -> Family:
    """The registered family of ``model_type`` in ``role``; a one-line error lists the supported ones otherwise."""
    fam = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if fam is None or fam.role != role:
        supported = sorted(n for n, f in FAMILIES.items() if f.role == role)
        raise ConfigError(f"{where}: model_type {model_type!r} is not a supported {role}; supported: {supported}")
    return fam
