"""Generation settings: transformers' keyword names and defaults, frozen and hashable (a static jit argument).

Values come, in order of precedence, from the call's keywords, then the checkpoint's defaults as transformers 5.25
resolves them (``defaults_from``), then transformers' global defaults (the dataclass defaults below).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from speechseq.errors import InputError


@dataclass(frozen=True)
class GenerationConfig:
    max_length: int = 20  # total length including the start token; unset: 20 new tokens (see make)
    min_length: int = 0
    min_new_tokens: int = 0
    do_sample: bool = False
    num_beams: int = 1
    num_return_sequences: int = 1
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    decoder_start_token_id: int | None = None  # None: bos_token_id (transformers' fallback for encoder-decoders)
    bos_token_id: int | None = None
    forced_bos_token_id: int | None = None
    forced_eos_token_id: tuple[int, ...] = ()
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()

    @property
    def fill_token(self) -> int:
        """What fills positions after EOS: pad, else the first EOS (transformers' rule)."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_token_id[0] if self.eos_token_id else 0


DEFAULT_NEW_TOKENS = 20  # transformers: "by default let's always generate 20 new tokens" when max_length is unset
FIELDS = {f.name for f in dataclasses.fields(GenerationConfig)}
# accepted for compatibility, no effect on the result
IGNORED = {"use_cache", "return_dict_in_generate", "output_scores", "output_attentions", "output_hidden_states",
           "output_logits", "renormalize_logits", "remove_invalid_values", "transformers_version",
           "_from_model_config", "is_assistant", "decoder_start_token_ids", "max_time",
           "num_beam_groups", "diversity_penalty"}


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def defaults_from(config_json: Mapping, generation_json: Mapping | None) -> dict:
    """A checkpoint's generation defaults, resolved as transformers 5.25 resolves them.

    With a ``generation_config.json``, that file alone: transformers reads nothing from config.json then, so a field
    only the decoder's config carries (a BART decoder's ``forced_eos_token_id``) does not apply. Without one,
    ``GenerationConfig.from_model_config`` of the config.json dict: its top-level generation fields, then the
    decoder sub-config's for those still unset. ``None`` means unset (transformers' global default).
    """
    if generation_json is not None:
        return {k: v for k, v in generation_json.items() if k in FIELDS | {"max_new_tokens"} and v is not None}
    out = {k: v for k, v in config_json.items() if k in FIELDS and v is not None}
    decoder = config_json.get("decoder")
    for key, value in (decoder.items() if isinstance(decoder, Mapping) else ()):
        if key in FIELDS and value is not None:
            out.setdefault(key, value)
    return out


def make(defaults: Mapping, max_positions: int, prompt_length: int = 1, **kwargs: Any) -> GenerationConfig:
    """Validate keywords and build the static config; every error is one line, raised before compiling."""
    unknown = sorted(k for k in kwargs if k not in FIELDS and k not in IGNORED and k != "max_new_tokens")
    if unknown:
        raise InputError(f"generate: unknown keyword argument(s) {unknown}; accepted: {sorted(FIELDS | {'max_new_tokens'})}")
    values = {**defaults, **{k: v for k, v in kwargs.items() if v is not None and k in FIELDS}}
    new_tokens = kwargs.get("max_new_tokens")
    if new_tokens is None:
        new_tokens = defaults.get("max_new_tokens")  # as in transformers, it wins over any max_length
    if new_tokens is not None:
        values["max_length"] = int(new_tokens) + prompt_length
    elif values.get("max_length") is None:
        values["max_length"] = DEFAULT_NEW_TOKENS + prompt_length
    for key in ("eos_token_id", "forced_eos_token_id", "suppress_tokens", "begin_suppress_tokens"):
        values[key] = _ids(values.get(key))
    if values.get("early_stopping") not in (True, False, "never", None):
        raise InputError(f"early_stopping: expected True, False or 'never', got {values['early_stopping']!r}")
    gen = GenerationConfig(**{k: v for k, v in values.items() if k in FIELDS})
    gen = dataclasses.replace(gen, top_k=int(gen.top_k or 0), num_beams=int(gen.num_beams),
                              max_length=int(gen.max_length))
    if gen.decoder_start_token_id is None:
        gen = dataclasses.replace(gen, decoder_start_token_id=gen.bos_token_id)
    if gen.decoder_start_token_id is None:
        raise InputError("decoder_start_token_id: not set (nor bos_token_id) in the config or generation_config.json; "
                         "pass it to generate")
    if gen.max_length <= prompt_length:
        raise InputError(f"max_new_tokens: must be at least 1 (max_length {gen.max_length})")
    if gen.max_length > max_positions:
        raise InputError(f"max_length: {gen.max_length} tokens exceed the decoder's {max_positions} positions; "
                         f"ask for at most {max_positions - prompt_length} new tokens")
    if gen.num_beams < 1:
        raise InputError(f"num_beams: must be >= 1, got {gen.num_beams}")
    if gen.num_return_sequences < 1:
        raise InputError(f"num_return_sequences: must be >= 1, got {gen.num_return_sequences}")
    if gen.num_beams > 1 and gen.num_return_sequences > gen.num_beams:
        raise InputError(f"num_return_sequences: {gen.num_return_sequences} is more than num_beams "
                         f"{gen.num_beams}; beam search can return at most num_beams sequences")
    if gen.num_beams == 1 and not gen.do_sample and gen.num_return_sequences > 1:
        raise InputError("num_return_sequences: greedy search returns one sequence; use num_beams or do_sample=True")
    if gen.do_sample and (gen.temperature <= 0 or not 0 < gen.top_p <= 1 or gen.top_k < 0):
        raise InputError(f"sampling: need temperature > 0, 0 < top_p <= 1 and top_k >= 0, got temperature="
                         f"{gen.temperature}, top_p={gen.top_p}, top_k={gen.top_k}")
    return gen
