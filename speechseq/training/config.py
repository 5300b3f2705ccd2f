"""``TrainConfig``: every setting of ``speechseq train``, read from a TOML file with command-line overrides.

A config file has one table per section; every key is optional (``speechseq train --print-config`` prints them all
with their defaults and docs)::

    [model]
    encoder = "facebook/wav2vec2-base"
    decoder = "bert-base-uncased"
    [data]
    train = "data/train.jsonl"
    [optim]
    learning_rate = 3e-4

``[optim]`` and ``[step]`` hold the fields of ``OptimConfig`` and ``StepConfig`` (``speechseq.training``); the other
sections are defined here. ``--set optim.learning_rate=3e-4`` overrides one value (the value is read as TOML, or as a
plain string when it is not TOML: ``--set model.init=runs/a/model``). Optional numbers take the string ``"none"``.
Every mistake is one ``ConfigError`` line naming the file (or ``--set``) and the key: an unknown key (with the
nearest known one), a wrong type, a value out of range.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import textwrap
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

try:
    import tomllib
except ImportError:  # Python 3.10: the same parser is the package tomli (in the train extra)
    tomllib = None

from speechseq.audio import DEFAULT_BUCKET_SECONDS
from speechseq.config import check_number
from speechseq.data.loader import DEFAULT_LABEL_BUCKETS
from speechseq.errors import ConfigError, SpeechSeqError, first_line
from speechseq.metrics import require
from speechseq.training.optim import OptimConfig
from speechseq.training.step import StepConfig

TASKS = ("transcribe", "translate")
BEST_METRICS = {"loss": "min", "wer": "min", "cer": "min", "bleu": "max"}


def _f(default: Any, doc: str, *, choices: Sequence | None = None, **limits: Any) -> Any:
    """A dataclass field with its one-line ``doc`` (printed by ``--print-config``) and the checks its value gets:
    ``choices``, or ``check_number``'s ``low`` / ``high`` / ``above``."""
    meta = {"doc": doc, "choices": tuple(choices) if choices else None, "limits": limits}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelConfig:
    init: str = _f("", "checkpoint to fine-tune: a speechseq or Hugging Face SpeechEncoderDecoderModel folder or "
                       "hub id (its tokenizer and preprocessor_config.json come with it)")
    encoder: str = _f("", "or warm start: a speech encoder checkpoint (folder or hub id; its preprocessor_config.json "
                          "is used) ...")
    decoder: str = _f("", "... joined to a text decoder checkpoint (its tokenizer is used) by "
                          "SpeechSeq2Seq.from_encoder_decoder_pretrained; cross-attention starts fresh")
    overrides: dict = _f({}, "warm start keywords, e.g. {encoder_add_adapter = true, decoder_dropout = 0.1, "
                             "decoder_start_token_id = 101, pad_token_id = 0}")


@dataclass(frozen=True)
class DataConfig:
    train: str = _f("", "training manifest: JSONL / CSV / TSV with audio path and text, or a folder of audio files "
                        "with same-named .txt transcripts")
    valid: str = _f("", "validation manifest, evaluated every train.eval_every steps (empty: no evaluation)")
    audio_key: str = _f("audio", "manifest column / key of the audio path")
    text_key: str = _f("text", "manifest column / key of the transcript or translation")
    batch_size: int = _f(8, "utterances per training step (all processes together)", low=1)
    max_audio_seconds: float | None = _f(None, "skip (or, on_bad = \"raise\", stop at) longer utterances",
                                         low=0, above=True)
    max_label_tokens: int | None = _f(None, "skip (or stop at) utterances with more label tokens", low=1)
    audio_buckets: tuple[float, ...] = _f(DEFAULT_BUCKET_SECONDS, "padded audio lengths in seconds (those past "
                                          "max_audio_seconds become it): a batch is padded to the shortest that "
                                          "holds its longest row, and each audio x label bucket a run meets is one "
                                          "more compiled step; finer buckets pad (and compute) less", low=0,
                                          above=True)
    label_buckets: tuple[int, ...] = _f(DEFAULT_LABEL_BUCKETS, "padded label lengths in tokens (those past "
                                        "max_label_tokens become it), as audio_buckets", low=1)
    num_workers: int = _f(4, "threads reading and preparing audio", low=0)
    cache_gb: float = _f(0.0, "keep each utterance's features in memory up to this many GiB, so later epochs skip "
                              "reading and featurising its audio (0: no cache)", low=0)
    on_bad: str = _f("skip", "a bad row (missing file, empty text, too long): \"skip\" and count it, or \"raise\" "
                             "(stop with one line naming it)", choices=("skip", "raise"))


@dataclass(frozen=True)
class LoopConfig:
    steps: int = _f(1000, "optimizer steps to run (optim.total_steps defaults to this)", low=1)
    eval_every: int = _f(500, "evaluate on data.valid every this many steps and at the end (0: only at the end)",
                         low=0)
    save_every: int = _f(500, "checkpoint every this many steps, after every evaluation (so the best is among them) "
                              "and at the end", low=1)
    keep_last: int = _f(2, "checkpoints kept besides the best one", low=1)
    best_metric: str = _f("wer", "validation metric that picks the best checkpoint (kept whatever its age); bleu is "
                                 "maximised, the others minimised", choices=tuple(BEST_METRICS))
    log_every: int = _f(10, "write the mean training loss to metrics.jsonl every this many steps", low=1)
    seed: int = _f(0, "seed of the parameters freshly initialised, dropout, and the data order", low=0)
    output_dir: str = _f("runs/speechseq", "checkpoints/, metrics.jsonl, tb/ (TensorBoard), curves.png, and the "
                                           "final model in model/ (speechseq) and model-hf/ (Hugging Face)")


@dataclass(frozen=True)
class EvalConfig:
    task: str = _f("transcribe", "\"transcribe\" (WER and CER) or \"translate\" (BLEU as well)", choices=TASKS)
    batch_size: int = _f(8, "utterances per evaluation batch", low=1)
    num_beams: int = _f(1, "1: greedy decoding", low=1)
    max_new_tokens: int | None = _f(None, "tokens to generate at most (none: the checkpoint's generation settings)",
                                    low=1)
    normalize: bool = _f(False, "lower-case and drop punctuation in hypotheses and references before scoring")


@dataclass(frozen=True)
class LogConfig:
    progress: bool = _f(True, "progress bar on stderr (loss, learning rate, samples/s, ETA)")
    tensorboard: bool = _f(True, "TensorBoard event files in output_dir/tb (needs tensorboardX)")
    plot: bool = _f(True, "curves.png of training loss and validation metrics at the end (needs matplotlib)")
    data_order: bool = _f(False, "write the utterance ids of every step to output_dir/data_order.jsonl")


@dataclass(frozen=True)
class MeshConfig:
    shape: str = _f("", "device mesh over every process's devices, e.g. \"data=2,fsdp=4,tensor=1\" (one size may be "
                        "-1: the devices left): batch rows over data x fsdp, params and optimizer state over fsdp "
                        "(FSDP) and tensor (heads, MLP, vocabulary), from speechseq.sharding.DEFAULT_RULES; empty: "
                        "one device, or \"data=-1\" when several processes run (speechseq train --coordinator)")


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    step: StepConfig = field(default_factory=StepConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)

    def validate(self, where: str = "config") -> "TrainConfig":
        """Checks across fields that a runnable config needs (the defaults alone are not runnable)."""
        m = self.model
        if bool(m.init) == bool(m.encoder or m.decoder):
            raise ConfigError(f"{where}: set model.init (a checkpoint to fine-tune) or model.encoder and model.decoder "
                              f"(a warm start){', not both' if m.init else ''}")
        if not m.init and not (m.encoder and m.decoder):
            missing = "model.decoder" if m.encoder else "model.encoder"
            raise ConfigError(f"{where}: {missing} is empty; a warm start needs both model.encoder and model.decoder")
        if m.init and m.overrides:
            raise ConfigError(f"{where}: model.overrides applies to a warm start (model.encoder + model.decoder), "
                              "not to model.init")
        if not self.data.train:
            raise ConfigError(f"{where}: data.train is empty; give the training manifest")
        if self.train.best_metric == "bleu" and self.eval.task != "translate":
            raise ConfigError(f"{where}: train.best_metric = \"bleu\" needs eval.task = \"translate\"")
        if self.data.batch_size % self.step.accum_steps:
            raise ConfigError(f"{where}: data.batch_size {self.data.batch_size} is not divisible by step.accum_steps "
                              f"{self.step.accum_steps}")
        return self


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(TrainConfig)}  # type: ignore[misc]


# -- reading -----------------------------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike, overrides: Sequence[str] = (), *, validate: bool = True) -> TrainConfig:
    """Read a TOML config file and apply ``--set`` overrides (``"section.key=value"``)."""
    toml = _toml()
    try:
        with open(path, "rb") as f:
            data = toml.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or first_line(e)})") from None
    except (toml.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({first_line(e)})") from None
    return parse_config(data, str(path), overrides, validate=validate)


def parse_config(data: Mapping[str, Any], where: str = "config", overrides: Sequence[str] = (), *,
                 validate: bool = True) -> TrainConfig:
    """A ``TrainConfig`` from a dict of sections (as TOML reads it) plus ``--set`` overrides."""
    values: dict[str, dict[str, Any]] = {}
    origin: dict[str, str] = {}  # "section.key" -> where its value came from, for the sections' own checks
    for section, table in data.items():
        cls = _section(section, where)
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: '{section}' should be a table ([{section}]), got {_kind(table)}")
        for key, value in table.items():
            values.setdefault(section, {})[key] = _coerce(cls, section, key, value, where)
            origin[f"{section}.{key}"] = where
    for item in overrides:
        section, key, value = _override(item, values)
        values.setdefault(section, {})[key] = value
        origin[f"{section}.{key}"] = "--set"
    if "total_steps" not in values.get("optim", {}):  # the schedule decays to zero at the end of the run
        values.setdefault("optim", {})["total_steps"] = values.get("train", {}).get("steps", LoopConfig.steps)
    parts = {}
    for section, cls in SECTIONS.items():
        try:
            parts[section] = cls(**values.get(section, {}))
        except SpeechSeqError as e:  # the section's own check, naming "section.key" first
            raise type(e)(f"{origin.get(str(e).split(':')[0].split()[0], where)}: {e}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: [{section}]: {first_line(e)}") from None
    config = TrainConfig(**parts)
    return config.validate(where) if validate else config


def _override(item: str, values: Mapping[str, Mapping[str, Any]]) -> tuple[str, str, Any]:
    """``section.key=value`` (or ``model.overrides.name=value``, one entry of a table, added to the table the file
    gives) -> (section, key, checked value)."""
    where = f"--set {item}"
    name, sep, text = item.partition("=")
    section, _, key = name.strip().partition(".")
    if not sep or not key:
        raise ConfigError(f"{where}: expected section.key=value, e.g. --set optim.learning_rate=3e-4")
    cls = _section(section, "--set")
    toml = _toml()
    try:
        value = toml.loads(f"v = {text.strip()}")["v"]
    except toml.TOMLDecodeError:
        value = text.strip()  # a path or a name without quotes
    head, _, entry = key.partition(".")
    if entry and head in _fields(cls) and _type(cls, head) is dict:
        table = values.get(section, {}).get(head, getattr(cls(), head))
        return section, head, _coerce(cls, section, head, {**table, entry: value}, "--set")
    return section, key, _coerce(cls, section, key, value, "--set")


def _toml() -> Any:
    return tomllib or require("tomli", "TOML config files on Python 3.10")


def _section(section: str, where: str) -> type:
    if section not in SECTIONS:
        raise ConfigError(f"{where}: unknown section [{section}]{_suggest(section, SECTIONS)}; sections are "
                          f"{', '.join(SECTIONS)}")
    return SECTIONS[section]


def _suggest(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _type(cls: type, key: str) -> Any:
    return typing.get_type_hints(cls)[key]


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "a table"}.get(type(value), type(value).__name__) + f" {_show(value)}"


def _show(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, bool, int, float, list, dict)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _coerce(cls: type, section: str, key: str, value: Any, where: str) -> Any:
    """``value`` checked against the field's type and limits (one-line ConfigError naming section.key)."""
    known = _fields(cls)
    name = f"{section}.{key}"
    if key not in known:
        raise ConfigError(f"{where}: unknown key '{name}'"
                          f"{_suggest(name, [f'{section}.{k}' for k in known])}")
    tp = _type(cls, key)
    optional = False
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional, tp = True, args[0]
    what = f"{where}: {name}"
    if optional and isinstance(value, str) and value.lower() == "none":
        return None
    meta = known[key].metadata
    limits = {"low": None, **meta.get("limits", {})}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{what} should be true or false, got {_kind(value)}")
    elif tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            kind = ("an integer" if tp is int else "a number") + (' or "none"' if optional else "")
            raise ConfigError(f"{what} should be {kind}, got {_kind(value)}")
        value = check_number(value, what, integer=tp is int, **limits)
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{what} should be a string, got {_kind(value)}")
    elif typing.get_origin(tp) is tuple and typing.get_args(tp)[0] is str:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{what} should be an array of strings, got {_kind(value)}")
        value = tuple(value)
    elif typing.get_origin(tp) is tuple:  # of numbers, each within the field's limits
        item = typing.get_args(tp)[0]
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{what} should be a non-empty array of {'integers' if item is int else 'numbers'}, "
                              f"got {_kind(value)}")
        value = tuple(check_number(v, f"{what} entry", integer=item is int, **limits) for v in value)
    elif tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{what} should be a table, e.g. {{ name = 1 }}, got {_kind(value)}")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{what} should be one of {', '.join(map(json.dumps, choices))}, got {_show(value)}"
                          f"{_suggest(str(value), choices)}")
    return value


# -- writing -----------------------------------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config: {value} cannot be written")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON's escapes are TOML's
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(map(_toml_value, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise ConfigError(f"config: cannot write a {type(value).__name__} as TOML")


# Docs of the [optim] and [step] fields for --print-config, used while OptimConfig / StepConfig (their meanings are
# in those classes' docstrings) carry none as field metadata (``metadata={"doc": ...}``, which wins).
STEP_DOCS = {
    "optim.learning_rate": "peak learning rate of AdamW, reached after warmup_steps",
    "optim.schedule": "after the warm-up: \"linear\" or \"cosine\" decay to 0 at total_steps, or \"constant\" "
                      "(transformers' schedules)",
    "optim.warmup_steps": "steps of linear warm-up from 0",
    "optim.total_steps": "the step where the decay reaches 0 (default: train.steps)",
    "optim.weight_decay": "AdamW's decoupled weight decay; biases and norm parameters are excluded as transformers' "
                          "Trainer excludes them",
    "optim.adam_b1": "AdamW's beta1",
    "optim.adam_b2": "AdamW's beta2",
    "optim.adam_eps": "AdamW's epsilon",
    "optim.max_grad_norm": "clip the global gradient norm to this (torch's clip_grad_norm_); \"none\": no clipping",
    "optim.freeze": "parts kept as they are (no gradient, no optimizer state): any of \"feature_encoder\", "
                    "\"encoder\", \"decoder\", or \"all_but_adapter_cross_attention\" alone",
    "step.dtype": "compute dtype, \"float32\" or \"bfloat16\" (params, gradients and optimizer state stay float32)",
    "step.remat": "recompute activations in the backward pass: \"none\", \"layer\" or \"dots\" (less memory, "
                  "more compute)",
    "step.accum_steps": "microbatches per step (data.batch_size must divide by it); the gradient equals one large "
                        "batch's",
    "step.label_smoothing": "epsilon of transformers Trainer's label smoothing (0: plain cross-entropy)",
    "step.ctc_weight": "weight w of an auxiliary CTC loss on the encoder (objective (1 - w) * attention + w * CTC; "
                       "its head is not saved with the model; 0: none)",
    "step.token_noise": "fraction of the decoder's input tokens replaced by random ones while training (the labels "
                        "stay right), so it learns to follow the audio after its own mistakes; 0: none",
    "step.guided_attention": "weight of a guided (diagonal) attention loss on the decoder's cross-attention, so it "
                             "does not skip to or repeat a stretch of audio that sounds the same; 0: none",
    "step.guided_attention_width": "the guided attention's diagonal band width (sigma, a fraction of the utterance)",
    "step.guided_attention_heads": "the guided attention binds the first k cross-attention heads of each decoder "
                                   "layer (0: all of them)",
    "step.dropout": "false: no dropout, LayerDrop or SpecAugment while training (the model's rates otherwise)",
}


def _doc(section: str, f: dataclasses.Field) -> str:
    return (f.metadata or {}).get("doc") or STEP_DOCS.get(f"{section}.{f.name}", "")


def to_toml(config: TrainConfig, docs: bool = True) -> str:
    """The config as TOML that ``load_config`` reads back to the same config; ``docs`` puts each field's doc above
    it (``speechseq train --print-config`` prints ``to_toml(TrainConfig())``)."""
    lines = []
    for section in SECTIONS:
        part = getattr(config, section)
        lines.append(f"[{section}]")
        for f in dataclasses.fields(part):
            if docs and _doc(section, f):
                lines += textwrap.wrap(_doc(section, f), 118, initial_indent="# ", subsequent_indent="# ")
            lines.append(f"{f.name} = {_toml_value(getattr(part, f.name))}")
        lines.append("")
    return "\n".join(lines)


def as_dict(config: TrainConfig) -> dict[str, dict[str, Any]]:
    """Every setting by section (tuples as lists): what metrics.jsonl's first line and a resume compare."""
    return json.loads(json.dumps(dataclasses.asdict(config)))
