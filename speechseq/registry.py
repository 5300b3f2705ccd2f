"""The one registry of model families: ``model_type`` -> config parser, weight table, base-model prefixes, apply.

Adding a family is one new file (its config parser and names) plus one line here; nothing else branches on family
names. ``prefixes`` lists where the base model sits in a standalone checkpoint; the first is the layout inside a
``SpeechEncoderDecoderModel`` (bare model for encoders, the causal-LM class for decoders).

An encoder family is a module (or any object) with what ``EncoderFamily`` lists, registered with ``encoder``; its
``INPUT_KIND`` says what it reads: "waveform" (raw samples, ``input_values``) or "features" (e.g. filterbanks,
``input_features``), see ``config.INPUT_KINDS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Protocol

from speechseq.decoders import (bart, bert, bert_generation, blenderbot_small, electra, gpt2, marian,
                                speech_to_text_2, trocr, xglm)
from speechseq.decoders.transformer import decode, weight_rules as decoder_rules
from speechseq.encoders import (data2vec_audio, sew, sew_d, speech_to_text, unispeech, unispeech_sat, wav2vec2,
                                wav2vec2_conformer, wavlm)
from speechseq.config import INPUT_KINDS, EncoderConfig, HFField
from speechseq.errors import ConfigError
from speechseq.checkpoints.table import Rule


class EncoderFamily(Protocol):
    """What an encoder family's file provides (``encoders/wav2vec2.py`` is one)."""

    INPUT_KIND: str  # "waveform" or "features" (a key of config.INPUT_KINDS)
    Config: type[EncoderConfig]  # its frozen config class
    FIELDS: tuple[HFField, ...]  # the config fields stored under one HF key each

    def parse_config(self, hf: dict, where: str) -> EncoderConfig:
        """A HF config dict -> its config; one-line ``ConfigError``s naming ``where`` and the field."""

    def weight_rules(self, cfg: Any) -> list[Rule]:
        """The weight table (names relative to the bare model, ``{base}`` for its prefix)."""

    def encode(self, cfg: Any, params: Any, inputs: Any, mask: Any, *, rng: Any = None, dtype: Any = ...,
               remat: str = "none", capture: bool = False) -> tuple[Any, ...]:
        """Inputs of its kind (+ their mask, or None) -> (frames [B, S, cfg.output_size], frame mask [B, S] bool or
        None). ``rng``: a ``jax.random`` key for training-mode regularisation, None for eval mode. ``capture``: a
        third element, transformers' per-layer outputs (``layers.core.Captured``)."""

    def frame_mask(self, cfg: Any, mask: Any, num_frames: int) -> Any:
        """The input's mask -> the mask [B, num_frames] of the frames ``encode`` returns (for precomputed frames)."""


@dataclass(frozen=True)
class Family:
    name: str
    role: str  # "encoder" or "decoder"
    parse_config: Callable[[dict, str], Any]
    weight_rules: Callable[[Any], list[Rule]]
    prefixes: tuple[str, ...]
    # encoders: encode(cfg, p, inputs, mask, *, rng=None, dtype, remat); decoders: decode(cfg, p, ids, ..., rng=None)
    apply: Callable[..., Any]
    # encoders: frame_mask(cfg, input mask, S) -> mask [B, S] of the frames `apply` returns, for precomputed frames
    # given with the input's mask; decoders: None
    frame_mask: Callable[..., Any] | None = None
    # the config fields stored under one HF key each: parse_config reads them, the config's to_dict writes them back
    fields: tuple[HFField, ...] = ()
    input_kind: str | None = None  # encoders: "waveform" or "features" (config.INPUT_KINDS)
    config_class: type | None = None  # encoders: the family's config class


def encoder(name: str, module: EncoderFamily, prefixes: tuple[str, ...]) -> Family:
    """The registry entry of an encoder family (``module``: see ``EncoderFamily``)."""
    if module.INPUT_KIND not in INPUT_KINDS:
        raise ValueError(f"{name}: INPUT_KIND {module.INPUT_KIND!r} is not one of {sorted(INPUT_KINDS)}")
    return Family(name, "encoder", module.parse_config, module.weight_rules, prefixes, module.encode,
                  module.frame_mask, module.FIELDS, module.INPUT_KIND, module.Config)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        encoder("wav2vec2", wav2vec2, ("", "wav2vec2.")),
        encoder("hubert", wav2vec2, ("", "hubert.")),
        encoder("unispeech", unispeech, ("", "unispeech.")),
        encoder("unispeech-sat", unispeech_sat, ("", "unispeech_sat.")),
        encoder("data2vec-audio", data2vec_audio, ("", "data2vec_audio.")),
        encoder("wavlm", wavlm, ("", "wavlm.")),
        encoder("wav2vec2-conformer", wav2vec2_conformer, ("", "wav2vec2_conformer.")),
        encoder("sew", sew, ("", "sew.")),
        encoder("sew-d", sew_d, ("", "sew_d.")),
        encoder("speech_to_text", speech_to_text, ("", "model.encoder.", "encoder.")),
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
        Family("marian", "decoder", marian.parse_config, partial(decoder_rules, n=marian.NAMES),
               ("model.decoder.", "decoder.", ""), decode, fields=marian.FIELDS),
        Family("pegasus", "decoder", marian.parse_config, partial(decoder_rules, n=marian.NAMES),
               ("model.decoder.", "decoder.", ""), decode, fields=marian.PEGASUS_FIELDS),
        Family("xlm-roberta", "decoder", bert.parse_config, partial(decoder_rules, n=bert.ROBERTA_NAMES),
               ("roberta.", ""), decode, fields=bert.ROBERTA_FIELDS),
        Family("electra", "decoder", electra.parse_config, partial(decoder_rules, n=electra.NAMES), ("electra.", ""),
               decode, fields=electra.FIELDS),
        Family("blenderbot-small", "decoder", blenderbot_small.parse_config,
               partial(decoder_rules, n=blenderbot_small.NAMES), ("model.decoder.", "decoder.", ""), decode,
               fields=blenderbot_small.FIELDS),
        Family("trocr", "decoder", trocr.parse_config, partial(decoder_rules, n=trocr.NAMES), ("model.decoder.", ""),
               decode, fields=trocr.FIELDS),
        Family("xglm", "decoder", xglm.parse_config, partial(decoder_rules, n=xglm.NAMES), ("model.", ""), decode,
               fields=xglm.FIELDS),
        Family("bert-generation", "decoder", bert_generation.parse_config,
               partial(decoder_rules, n=bert_generation.NAMES), ("bert.", ""), decode, fields=bert_generation.FIELDS),
        Family("speech_to_text_2", "decoder", speech_to_text_2.parse_config,
               partial(decoder_rules, n=speech_to_text_2.NAMES), ("model.decoder.", ""), decode,
               fields=speech_to_text_2.FIELDS),
    )
}


def family(model_type: Any, role: str, where: str = "config") -> Family:
    """The registered family of ``model_type`` in ``role``; a one-line error lists the supported ones otherwise."""
    fam = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if fam is None or fam.role != role:
        supported = sorted(n for n, f in FAMILIES.items() if f.role == role)
        raise ConfigError(f"{where}: model_type {model_type!r} is not a supported {role}; supported: {supported}")
    return fam
