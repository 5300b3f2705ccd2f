"""Typed, frozen configs for the speech encoder, the text decoder and the seq2seq model.

Each config keeps the derived fields the compute needs (hashable, so a config is a static jit argument) and the
original Hugging Face ``config.json`` dict in ``hf`` (excluded from equality and hash), which ``to_dict`` writes back
with any overrides applied. Every field stored under one HF key (widths, depths, activations, token ids, eps, conv
lists, dropout rates, LayerDrop, SpecAugment) is listed per family as an ``HFField``, the one table ``read_fields``
parses and ``to_dict`` writes back, so a ``dataclasses.replace`` of such a field reaches ``config.json``. Fields
derived by a rule (BART's embed_scale, RoBERTa's position_offset, per-family flags) stay in ``parse_config``;
``to_dict`` parses its dict back and refuses a config whose derived fields that dict would not reproduce.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields as dataclass_fields
from typing import Any, Callable, ClassVar, Mapping, NamedTuple

from speechseq.errors import ConfigError, SpeechSeqError, first_line


def hf_dict_field() -> Any:
    """The ``hf`` field of a config dataclass: the original HF dict, outside equality and hash."""
    return field(default_factory=dict, compare=False, hash=False, repr=False)


class _Part:
    """What encoder and decoder configs share."""

    ROLE: ClassVar[str]
    model_type: str
    hidden_size: int
    num_heads: int
    hf: dict

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict:
        """The HF config dict: ``hf`` with the family's typed ``HFField``s written back under their HF names; a
        ``ConfigError`` when a field the dict cannot carry (a derived one, a rate the family lacks) was changed."""
        from speechseq.registry import family  # registry imports the family modules, which import this module

        fam = family(self.model_type, self.ROLE)
        out = write_fields(self, fam.fields, self.hf)
        # derived fields are not in the table: parse the dict back so a replaced one is refused, not silently lost
        check_saved(self, fam.parse_config(dict(out), f"{self.model_type} config"))
        return out


# What each encoder takes, by the ``INPUT_KIND`` its family file declares: the keyword it arrives under in the public
# API (transformers' names), its rank and what it holds (for the one-line errors).
class InputKind(NamedTuple):
    name: str  # the keyword: input_values or input_features
    rank: int
    description: str


INPUT_KINDS: dict[str, InputKind] = {
    "waveform": InputKind("input_values", 2, "raw audio [batch, samples]"),
    "features": InputKind("input_features", 3, "features [batch, frames, features]"),
}


class EncoderConfig(_Part):
    """What every speech encoder's config has. Each encoder family has its own frozen dataclass subclassing this one,
    in its own file (``encoders/wav2vec2.py``'s ``Wav2Vec2Config``), with transformers' fields under typed names;
    code outside the family reads only what is declared here.

    Regularisation fields (dropout, LayerDrop, SpecAugment) act only when the apply gets a random key."""

    ROLE: ClassVar[str] = "encoder"
    num_layers: int

    @property
    def output_size(self) -> int:
        """Width of the frames that leave the encoder (what ``enc_to_dec_proj`` projects from)."""
        return self.hidden_size

    def describe(self) -> str:
        """One line on the architecture, for ``speechseq inspect`` and the demo."""
        return f"{self.model_type}: {self.num_layers} layers, hidden {self.hidden_size}, heads {self.num_heads}"


@dataclass(frozen=True)
class DecoderConfig(_Part):
    """Autoregressive text decoder with cross-attention (BERT, RoBERTa, GPT-2, BART, mBART): one shape, many flags.

    The regularisation fields are family-neutral (each family's ``FIELDS`` maps them to its HF names) and act only
    when the apply gets a random key."""

    ROLE: ClassVar[str] = "decoder"

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    hidden_act: str
    max_positions: int  # rows of the learned position table
    position_offset: int  # row of position 0 (BART: 2; RoBERTa: pad_token_id + 1)
    padding_aware_positions: bool  # RoBERTa: positions count only non-padding tokens
    type_vocab_size: int  # BERT token-type table (row 0 is added); 0 when absent
    embed_scale: float
    embed_norm: bool
    pre_norm: bool
    final_norm: bool
    layer_norm_eps: float
    attn_scale: bool  # scale scores by 1/sqrt(head_dim)
    attn_scale_by_layer: bool  # GPT-2 scale_attn_by_inverse_layer_idx
    head_transform: bool  # BERT/RoBERTa: dense + activation + norm before the output projection
    head_act: str
    head_bias: bool
    tie_word_embeddings: bool
    pad_token_id: int | None
    bos_token_id: int | None
    eos_token_id: int | tuple[int, ...] | None
    # XGLM, TrOCR: positions from fairseq's fixed sinusoidal table (not a weight; sin | cos halves, the pad row zero)
    sinusoidal_positions: bool = False
    embed_norm_before_positions: bool = False  # Blenderbot-small: embed_norm on the token embeddings, then + positions
    # how transformers takes ``decoder_inputs_embeds`` in place of ids: "unscaled" (positions, token type and norm
    # added to them as given: BART-likes scale inside the token embedding module), "scaled" (times embed_scale
    # first: Marian, Pegasus scale in the decoder's forward), "unsupported" (positions read from the ids only:
    # transformers fails without them, TrOCR's sinusoidal table, Speech2Text2)
    given_embeds: str = "unscaled"
    embed_dropout: float | None = None  # after the embeddings; None: hidden_dropout (BERT, BART)
    hidden_dropout: float = 0.0  # after the attention output and MLP output projections
    attention_dropout: float = 0.0  # on attention probabilities (self and cross)
    activation_dropout: float = 0.0  # after the MLP activation
    layerdrop: float = 0.0  # probability of skipping a layer
    hf: dict = hf_dict_field()


@dataclass(frozen=True)
class SpeechSeq2SeqConfig:
    """A speech encoder joined to a text decoder by cross-attention (HF ``speech-encoder-decoder``)."""

    encoder: EncoderConfig
    decoder: DecoderConfig
    decoder_start_token_id: int | None
    pad_token_id: int | None
    eos_token_id: int | tuple[int, ...] | None
    hf: dict = hf_dict_field()

    @property
    def has_enc_to_dec_proj(self) -> bool:
        """Project encoder frames when their width differs from the decoder's (from the width that really arrives)."""
        return self.encoder.output_size != self.decoder.hidden_size

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.hf.items() if k not in ("encoder", "decoder")}
        out.update(
            model_type="speech-encoder-decoder",
            is_encoder_decoder=True,
            architectures=["SpeechEncoderDecoderModel"],
            decoder_start_token_id=self.decoder_start_token_id,
            pad_token_id=self.pad_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            tie_word_embeddings=False,
            encoder=self.encoder.to_dict(),
            decoder=self.decoder.to_dict(),
        )
        return out


# ----------------------------------------------------------------------------------------------------------------------
# Reading and writing Hugging Face config dicts


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON object from ``path`` with a one-line error naming the file on failure."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as e:  # a folder, no permission
        raise ConfigError(f"{path}: cannot read ({e.strerror or first_line(e)})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def require(hf: Mapping, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """Fetch a mandatory field with a one-line error naming it."""
    if key not in hf:
        raise ConfigError(f"{where}: missing field '{key}'")
    value = hf[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ConfigError(f"{where}: field '{key}' should be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


# The one numeric check every family's parse_config (and the feature extractor) uses: a bad count, epsilon or
# probability fails here, naming the field, instead of as a ZeroDivisionError or a negative shape much later.
_REQUIRED: Any = object()
PROBABILITY = dict(integer=False, low=0, high=1)  # e.g. mask_time_prob
POSITIVE = dict(integer=False, low=0, above=True)  # e.g. layer_norm_eps
TOKEN_ID = dict(low=0, optional=True)  # pad / bos / eos / decoder_start ids: absent or null means unset


def check_number(value: Any, what: str, *, integer: bool = True, low: float | None = 1, high: float | None = None,
                 above: bool = False, optional: bool = False) -> Any:
    """``value`` as an int (``integer``: an int or a whole float) or a finite float, in [low, high] ((low, high]
    with ``above``); ``None`` passes when ``optional``. ``what`` starts the one-line error ("config.json: field
    'x'")."""
    if value is None and optional:
        return None
    given = value
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and isinstance(value, float):
        ok = math.isfinite(value) and (value.is_integer() or not integer)
    if ok and not integer and abs(value) > 1e300:  # an int too large for float()
        ok = False
    if ok:
        value = int(value) if integer else float(value)
        ok = (low is None or (value > low if above else value >= low)) and (high is None or value <= high)
    if not ok:
        kind = "an integer" if integer else "a finite number"
        if low is not None and high is not None:
            kind += f" in {'(' if above else '['}{low:g}, {high:g}]"
        elif low is not None:
            kind += f" {'>' if above else '>='} {low:g}"
        raise ConfigError(f"{what} should be {kind}{' or null' if optional else ''}, got {given!r:.80}")
    return value


def number(hf: Mapping, key: str, where: str, default: Any = _REQUIRED, **limits: Any) -> Any:
    """A numeric field of ``hf`` checked by ``check_number(**limits)`` (default: an integer >= 1). Absent, or null
    (unless ``optional``), it takes ``default``; without a default it is mandatory."""
    value = hf.get(key, default)
    if value is None and not limits.get("optional") and default is not _REQUIRED:
        value = default
    if value is _REQUIRED:
        raise ConfigError(f"{where}: missing field '{key}'")
    return check_number(value, f"{where}: field '{key}'", **limits)


def numbers(hf: Mapping, key: str, where: str) -> tuple[int, ...]:
    """A mandatory non-empty list of integers >= 1 (conv_dim, conv_kernel, conv_stride)."""
    value = require(hf, key, (list, tuple), where)
    try:
        items = tuple(check_number(v, key) for v in value)
    except ConfigError:
        items = ()
    if not items:
        raise ConfigError(f"{where}: field '{key}' should be a non-empty list of integers >= 1, got {value!r}")
    return items


def require_heads(hf: Mapping, hidden_key: str, heads_key: str, where: str) -> tuple[int, int]:
    """(width, heads), both >= 1, with the width divisible by the number of heads."""
    hidden, heads = number(hf, hidden_key, where), number(hf, heads_key, where)
    if hidden % heads:
        raise ConfigError(f"{where}: {hidden_key} {hidden} is not divisible by {heads_key} {heads}")
    return hidden, heads


# Work whose size follows from a config or an argument (fresh weights, beam search) is sized before anything is
# allocated, and refused with one line when it cannot fit, rather than dying later in a MemoryError or an XLA
# RESOURCE_EXHAUSTED at compile time.
MEMORY_LIMIT_ENV = "SPEECHSEQ_MEMORY_LIMIT_GB"


def memory_limit(device: Any = None) -> tuple[int, str]:
    """(bytes, description) of the memory a planned allocation may take: ``$SPEECHSEQ_MEMORY_LIMIT_GB`` when set,
    else the accelerator's own memory for a non-CPU jax ``device`` (when it reports it), else the machine's
    physical memory, which no allocation can exceed however much swap there is."""
    env = os.environ.get(MEMORY_LIMIT_ENV)
    if env:
        try:
            return int(float(env) * 2**30), f"{MEMORY_LIMIT_ENV}={env}"
        except ValueError:
            raise ConfigError(f"{MEMORY_LIMIT_ENV}: expected a number of GiB, got {env!r}") from None
    if device is not None and device.platform != "cpu":
        limit = (device.memory_stats() or {}).get("bytes_limit")
        if limit:
            return int(limit), f"the {device.platform} device's {limit / 2**30:.3g} GiB"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total, f"this machine's {total / 2**30:.3g} GiB of memory"


def check_memory(need: int, what: str, device: Any = None, error: type[SpeechSeqError] = ConfigError) -> None:
    """Refuse ``need`` bytes beyond ``memory_limit(device)``; ``what`` starts the message and names the cause."""
    limit, where = memory_limit(device)
    if need > limit:
        raise error(f"{what} need about {need / 2**30:.3g} GiB, more than {where} (set {MEMORY_LIMIT_ENV} "
                          "to change the limit)")


def eos_ids(value: Any, what: str = "eos_token_id") -> int | tuple[int, ...] | None:
    """An EOS id or a list of them (each >= 0), or None."""
    if isinstance(value, (list, tuple)):
        return tuple(check_number(v, what, low=0) for v in value)
    return check_number(value, what, **TOKEN_ID)


@dataclass(frozen=True)
class HFField:
    """A typed config field (``attr``) stored under one HF key, with transformers' default when the key is absent
    (a function of the HF dict where transformers derives it, e.g. GPT-2's n_inner = 4 * n_embd).

    ``limits`` says how the value is read: a dict of ``check_number``'s limits, ``None`` for a flag (bool), or a
    reader ``(hf, key, where, default) -> value`` for the other kinds (``ACTIVATION``, ``INT_LIST``, ``EOS``, ``TEXT``).
    ``transform`` is an optional (read, write) pair for a field stored shifted (BART's position table is
    max_position_embeddings + 2 rows)."""

    attr: str
    key: str
    default: Any
    limits: Any = field(default_factory=lambda: PROBABILITY)
    transform: tuple[Callable[[Any], Any], Callable[[Any], Any]] | None = None


REQUIRED = _REQUIRED  # an HFField default: the key is mandatory
INT = dict(low=1)  # a count or width, >= 1 (check_number's default)


def ACTIVATION(hf: Mapping, key: str, where: str, default: Any) -> str:
    from speechseq.layers.core import check_activation  # here: importing config (the command's start) loads no jax

    return check_activation(hf.get(key, default), where)


def INT_LIST(hf: Mapping, key: str, where: str, default: Any) -> tuple[int, ...]:
    return numbers(hf, key, where)


def EOS(hf: Mapping, key: str, where: str, default: Any) -> int | tuple[int, ...] | None:
    return eos_ids(hf.get(key, default), f"{where}: field '{key}'")


def TEXT(hf: Mapping, key: str, where: str, default: Any) -> Any:
    return hf.get(key, default)  # parse_config checks the allowed values with its own message


def read_field(hf: Mapping, f: HFField, where: str) -> Any:
    default = f.default(hf) if callable(f.default) else f.default
    if f.limits is None:
        value = bool(hf.get(f.key, default))
    elif callable(f.limits):
        value = f.limits(hf, f.key, where, default)
    else:
        value = number(hf, f.key, where, default, **f.limits)
    return f.transform[0](value) if f.transform else value


def derive_fields(base: tuple[HFField, ...], *, defaults: Mapping[str, Any] | None = None,
                  keys: Mapping[str, str] | None = None, replace: Mapping[str, HFField] | None = None,
                  drop: tuple[str, ...] = ()) -> tuple[HFField, ...]:
    """A family's field table made from a related family's ``base`` (RoBERTa's from BERT's, Marian's from BART's):
    ``replace`` swaps whole fields, then ``defaults`` and ``keys`` change those attributes' defaults and HF keys;
    ``drop`` leaves attributes out. Every attribute named must be in ``base``."""
    defaults, keys, replace = defaults or {}, keys or {}, replace or {}
    unknown = (set(defaults) | set(keys) | set(replace) | set(drop)) - {f.attr for f in base}
    if unknown:  # a typo in a family's module, not a user's input
        raise ValueError(f"derive_fields: {sorted(unknown)} not in the base table")
    out = []
    for f in base:
        if f.attr in drop:
            continue
        f = replace.get(f.attr, f)
        if f.attr in defaults:
            f = dataclasses.replace(f, default=defaults[f.attr])
        if f.attr in keys:
            f = dataclasses.replace(f, key=keys[f.attr])
        out.append(f)
    return tuple(out)


def read_fields(hf: Mapping, table: tuple[HFField, ...], where: str) -> dict[str, Any]:
    """``{attr: value}`` of ``table``'s fields in a HF config dict, each checked (a family's parse_config)."""
    return {f.attr: read_field(hf, f, where) for f in table}


def write_fields(cfg: Any, table: tuple[HFField, ...], hf: Mapping) -> dict:
    """A copy of ``hf`` with ``cfg``'s values of ``table``'s fields written under their HF keys where they differ
    from what ``hf`` reads as (so an unchanged config writes back the dict it came from, key for key)."""
    out = dict(hf)
    for f in table:
        value = getattr(cfg, f.attr)
        if read_field(out, f, cfg.model_type) != value:  # ``out``: a default may follow a field written above
            value = f.transform[1](value) if f.transform else value
            out[f.key] = list(value) if isinstance(value, tuple) else value  # as JSON has it
    return out


def check_saved(cfg: Any, saved: Any) -> None:
    """Refuse to save ``cfg`` when its dict parses back (``saved``) to something else: a field with no HF key in its
    family (a rate the family lacks, a field derived by a rule such as BART's embed_scale) would be lost."""
    for fld in dataclass_fields(cfg):
        value = getattr(cfg, fld.name)
        if fld.compare and value != getattr(saved, fld.name):
            raise ConfigError(f"{cfg.model_type}: field {fld.name}={value!r} has no Hugging Face config key in this "
                              f"family (saved, it would read as {getattr(saved, fld.name)!r}), so it cannot be saved")


def encoder_config_from_hf(hf: Mapping, where: str = "encoder config") -> EncoderConfig:
    from speechseq.registry import family  # registry imports the family modules, which import this module

    fam = family(hf.get("model_type"), role="encoder", where=where)
    return fam.parse_config(dict(hf), where)


def decoder_config_from_hf(hf: Mapping, where: str = "decoder config") -> DecoderConfig:
    from speechseq.registry import family

    fam = family(hf.get("model_type"), role="decoder", where=where)
    return fam.parse_config(dict(hf), where)


def seq2seq_config_from_hf(hf: Mapping, where: str = "config.json") -> SpeechSeq2SeqConfig:
    """Parse a ``speech-encoder-decoder`` config dict."""
    if hf.get("model_type") != "speech-encoder-decoder":
        raise ConfigError(
            f"{where}: model_type {hf.get('model_type')!r} is not a speech encoder-decoder; expected "
            "'speech-encoder-decoder' (use from_encoder_decoder_pretrained to join an encoder and a decoder)"
        )
    for part in ("encoder", "decoder"):
        if not isinstance(hf.get(part), dict):
            raise ConfigError(f"{where}: missing field '{part}' (the {part} sub-config)")
    enc = encoder_config_from_hf(hf["encoder"], f"{where} [encoder]")
    dec = decoder_config_from_hf(hf["decoder"], f"{where} [decoder]")
    return make_seq2seq_config(enc, dec, hf, where)


def make_seq2seq_config(enc: EncoderConfig, dec: DecoderConfig, hf: Mapping | None = None,
                        where: str = "config") -> SpeechSeq2SeqConfig:
    hf = dict(hf or {})
    start = hf.get("decoder_start_token_id", dec.hf.get("decoder_start_token_id"))
    if start is None:
        start = dec.bos_token_id
    start = check_number(start, f"{where}: field 'decoder_start_token_id'", **TOKEN_ID)
    pad = check_number(hf.get("pad_token_id", dec.pad_token_id), f"{where}: field 'pad_token_id'", **TOKEN_ID)
    eos = eos_ids(hf.get("eos_token_id", dec.eos_token_id), f"{where}: field 'eos_token_id'")
    return SpeechSeq2SeqConfig(enc, dec, start, pad, eos, hf)


def config_from_dict(hf: Mapping, where: str = "config") -> SpeechSeq2SeqConfig:
    """Accept a HF ``speech-encoder-decoder`` dict or a speechseq config object."""
    if isinstance(hf, SpeechSeq2SeqConfig):
        return hf
    if not isinstance(hf, Mapping):
        raise ConfigError(f"{where}: expected a config dict or SpeechSeq2SeqConfig, got {type(hf).__name__}")
    return seq2seq_config_from_hf(hf, where)
