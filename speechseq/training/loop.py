"""The training loop of ``speechseq train``: ``train(config)`` and the evaluation it runs, ``evaluate``.

``train`` builds the model (a checkpoint to fine-tune, or a warm start from an encoder and a decoder), its processor,
the data loaders, the state and the jitted steps, then runs ``train.steps`` steps. Everything it writes goes into
``train.output_dir``:

    config.toml        the settings of the run (every key, with docs)
    metrics.jsonl      {"step", "split": "train", "loss", "learning_rate", "grad_norm", "tokens", "epoch"} every
                       ``log_every`` steps, {"step", "split": "valid", "loss", "wer", "cer"(, "bleu"), ...} after each
                       evaluation; only values a resumed run reproduces bit for bit (no clock times)
    data_order.jsonl   {"step", "ids"} every step (``log.data_order``)
    checkpoints/STEP/  the state and the data position (``checkpoint.py``)
    tb/                TensorBoard event files (also samples/s)
    curves.png         training loss and validation metrics
    model/, model-hf/  the final model: speechseq layout (orbax params) and Hugging Face layout

``--resume`` restores the latest checkpoint (state, data position, the running log window), cuts metrics.jsonl and
data_order.jsonl back to that step and continues: the run ends with the params, logs and data order of a run that
was never stopped. A NaN or infinite loss (or gradient norm) stops the run with one line and leaves the last
checkpoint, taken before it, as it was; Ctrl-C stops it with one line, saving nothing new and leaving nothing partial;
SIGTERM (a scheduler's or a preemptible host's stop) lets the step finish, saves its checkpoint and stops with one
line and status 143, so ``--resume`` loses nothing.

With ``mesh.shape`` (``--mesh``) the step runs on a device mesh (``speechseq.sharding``): the model (``model.init``
or a warm start) is loaded straight into its shardings, the state is born in them, and each batch is split over data
x fsdp. Several processes (``jax.distributed``, ``speechseq train --coordinator ...``) run the same loop on one mesh
over all their devices: each reads its own rows of every global batch, all write the checkpoints (into the shared
output_dir) and take part in every collective; process 0 alone writes config.toml, the logs, curves.png and the
final model. Evaluation decodes each validation batch with the sharded params on the mesh, each process reading its
rows (the texts come back to every process); the final model reads the params gathered whole on every host.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from speechseq.errors import CheckpointError, ConfigError, InputError, SpeechSeqError
from speechseq.metrics import require, text_metrics
from speechseq.training import ctc
from speechseq.training.config import BEST_METRICS, TrainConfig, as_dict, to_toml

if TYPE_CHECKING:
    from speechseq.data import Example, Loader
    from speechseq.processor import Processor
    from speechseq.speech_seq2seq import SpeechSeq2Seq

AUDIO_INPUTS = ("input_values", "input_features", "attention_mask")  # what generate reads from a batch
# settings a resumed run must share with the run it continues, or it would not continue it exactly
RESUME_FIXED = ("model", "data", "optim", "step", "train.seed")
RESUME_FREE = ("data.num_workers",)


class NonFiniteLoss(SpeechSeqError):
    """The loss or the gradient norm of a step was NaN or infinite; training stopped."""


# -- model and data ----------------------------------------------------------------------------------------------------


def load_model(config: TrainConfig, mesh: Any = None) -> tuple["SpeechSeq2Seq", "Processor", Path]:
    """The model to train, its processor, and the folder its tokenizer files come from (copied into the final
    model): ``model.init``'s checkpoint, or a warm start of ``model.encoder`` + ``model.decoder`` (with a ``mesh``,
    either loaded straight into its shardings) whose processor is the encoder's feature extractor and the decoder's
    tokenizer."""
    from speechseq.audio import FeatureExtractor
    from speechseq.hub import resolve
    from speechseq.processor import Processor
    from speechseq.speech_seq2seq import SpeechSeq2Seq
    from speechseq.text import Tokenizer

    m, seed = config.model, config.train.seed
    if m.init:
        path = resolve(m.init)
        model = SpeechSeq2Seq.from_pretrained(path, seed=seed, mesh=mesh)
        processor = Processor.from_pretrained(path)
    else:
        try:
            model = SpeechSeq2Seq.from_encoder_decoder_pretrained(m.encoder, m.decoder, seed=seed, mesh=mesh,
                                                                  **m.overrides)
        except InputError as e:
            raise ConfigError(f"model.overrides: {e}") from None
        path = resolve(m.decoder)
        processor = Processor(FeatureExtractor.from_pretrained(m.encoder), Tokenizer.from_pretrained(path))
    for name in ("decoder_start_token_id", "pad_token_id"):
        if getattr(model.config, name) is None:
            raise ConfigError(f"model: the model's config has no {name}, which training needs to build decoder "
                              f"inputs from labels; set model.overrides.{name} (a warm start) or add it to "
                              "config.json")
    return model, processor, path


def _loaders(config: TrainConfig, processor: "Processor", start_token: int | None, process_index: int = 0,
             process_count: int = 1) -> tuple["Loader", "Loader | None"]:
    """The training loader and the validation loader, each reading this process's rows of every global batch."""
    from speechseq.data import Loader, read_manifest

    d = config.data
    common = dict(max_audio_seconds=d.max_audio_seconds, max_label_tokens=d.max_label_tokens,
                  audio_buckets=d.audio_buckets, label_buckets=d.label_buckets, num_workers=d.num_workers,
                  on_bad=d.on_bad, decoder_start_token_id=start_token)

    def rows(path: str) -> list:
        return read_manifest(path, audio_key=d.audio_key, text_key=d.text_key, on_bad=d.on_bad)

    train = Loader(rows(d.train), processor, batch_size=d.batch_size, seed=config.train.seed, shuffle=True,
                   process_index=process_index, process_count=process_count, cache_gb=d.cache_gb, **common)
    _report_skipped(d.train, train)
    valid = None
    if d.valid:
        valid = Loader(rows(d.valid), processor, batch_size=config.eval.batch_size, shuffle=False,
                       drop_remainder=False, process_index=process_index, process_count=process_count, **common)
        _report_skipped(d.valid, valid)
    return train, valid


def _report_skipped(path: str, loader: "Loader") -> None:
    skipped = {k: v for k, v in loader.skipped.items() if v}
    if skipped:
        print(f"speechseq: {path}: skipped {sum(skipped.values())} row(s) ("
              + ", ".join(f"{k} {v}" for k, v in skipped.items()) + f"); {loader.usable_rows} used",
              file=sys.stderr)


# -- evaluation --------------------------------------------------------------------------------------------------------


def evaluate(model: "SpeechSeq2Seq", examples: "Sequence[Example] | Loader", *, processor: "Processor | None" = None,
             batch_size: int = 8, task: str = "transcribe", normalize: bool = False, eval_step: Any = None,
             num_workers: int = 4, on_bad: str = "skip", progress: bool = False, place: Any = None,
             **generate_kwargs: Any) -> dict[str, Any]:
    """Generate text for every usable example and score it against the references.

    ``examples`` are manifest rows (``speechseq.data.read_manifest``; a ``Loader`` is built with ``processor``,
    ``batch_size``, ``num_workers`` and ``on_bad``) or a ready ``Loader`` whose ``epoch()`` is read. Decoding is
    ``model.generate`` with ``generate_kwargs`` (``num_beams``, ``max_new_tokens``; None values mean the
    checkpoint's settings). ``eval_step`` (``training.make_eval_step``; made here when None) gives the loss.
    ``place``: the training loop's placement on a device mesh, where the model's params are sharded and each process
    reads its rows of every batch (``loader`` made with its ``process_index``): the rows become one global batch
    and the texts of all of them come back to every process (call it in every process).

    Returns ``{"loss", "wer", "cer"(, "bleu" when task is "translate"), "utterances", "skipped", "audio_seconds",
    "seconds" (decoding time), "rtf" (seconds / audio_seconds), "rows": [{"id", "audio", "reference",
    "hypothesis", "audio_seconds"}]}``, rows in the loader's evaluation order."""
    import numpy as np
    import soundfile as sf

    from speechseq.data import Loader, single_threaded_blas
    from speechseq.training import StepConfig, make_eval_step

    if isinstance(examples, Loader):
        loader = examples
    else:
        if processor is None:
            raise InputError("evaluate: processor is required with a list of examples")
        loader = Loader(examples, processor, batch_size=batch_size, shuffle=False, drop_remainder=False,
                        num_workers=num_workers, on_bad=on_bad,
                        decoder_start_token_id=model.config.decoder_start_token_id)
    processor = loader.processor
    if eval_step is None:
        eval_step = make_eval_step(model.config, StepConfig(dtype=model.dtype.name))
    gen = {k: v for k, v in generate_kwargs.items() if v is not None}
    model.generation_config(batch=loader.batch_size, **gen)  # bad settings: one line before any audio is read
    by_id = {ex.id: ex for ex in loader.examples}
    rows: list[dict] = []
    loss_sum, tokens, seconds = 0.0, 0, 0.0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=loader.usable_rows, desc="evaluate", unit="utt", leave=False)
    with single_threaded_blas():  # the loader's threads featurise beside generate
        try:
            for batch in loader.epoch():
                ids = batch.pop("ids")
                if place is not None:
                    ids, batch = place.global_ids(ids, loader), place.batch(batch)
                out = eval_step(model.params, batch)
                loss_sum += float(out["loss_sum"])
                tokens += int(out["tokens"])
                t0 = time.perf_counter()
                seqs = model.generate(**{k: batch[k] for k in AUDIO_INPUTS if k in batch}, **gen)
                seconds += time.perf_counter() - t0
                per_row = seqs.shape[0] // len(ids)
                texts = processor.batch_decode(np.asarray(seqs)[::per_row], skip_special_tokens=True)
                for i, text in zip(ids, texts):
                    if i is None:  # a padding row
                        continue
                    ex = by_id[i]
                    rows.append({"id": i, "audio": ex.audio, "reference": ex.text, "hypothesis": text.strip(),
                                 "audio_seconds": round(sf.info(ex.audio).duration, 3)})
                if bar:
                    bar.update(sum(i is not None for i in ids))
        finally:
            if bar:
                bar.close()
    if not rows:
        raise InputError("evaluate: no usable utterances to score")
    audio_seconds = sum(r["audio_seconds"] for r in rows)
    result: dict[str, Any] = {"loss": loss_sum / max(tokens, 1)}
    result.update(text_metrics([r["reference"] for r in rows], [r["hypothesis"] for r in rows], task=task,
                               normalize=normalize))
    result.update(utterances=len(rows), skipped=sum(loader.skipped.values()), audio_seconds=round(audio_seconds, 3),
                  seconds=round(seconds, 3), rtf=round(seconds / audio_seconds, 4) if audio_seconds else None,
                  rows=rows)
    return result


# -- logs --------------------------------------------------------------------------------------------------------------


class _JsonLog:
    """A JSON-lines file appended a line at a time (flushed, so a killed run keeps what it wrote)."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def write(self, row: Mapping[str, Any]) -> None:
        self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class _Logs:
    """Where the loop reports: metrics.jsonl, data_order.jsonl (``log.data_order``), TensorBoard
    (``log.tensorboard``; also samples/s) and the progress bar (``log.progress``), for a run that starts after step
    ``start``: lines of later steps, written by a run killed after its last checkpoint, are cut away first."""

    def __init__(self, out: Path, config: TrainConfig, start: int):
        for name in ("metrics.jsonl", "data_order.jsonl"):
            if start:
                _truncate_log(out / name, start)
            elif (out / name).exists():
                (out / name).unlink()  # from a run killed before its first checkpoint
        log = config.log
        self.metrics = _JsonLog(out / "metrics.jsonl")
        self.order = _JsonLog(out / "data_order.jsonl") if log.data_order else None
        self.tb = None
        if log.tensorboard:
            self.tb = require("tensorboardX", "TensorBoard logs").SummaryWriter(str(out / "tb"), purge_step=start + 1)
        self.bar = None
        if log.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=config.train.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
        self.clock, self.samples = time.perf_counter(), 0

    def step(self, step: int, ids: Sequence[str | None]) -> None:
        self.samples += sum(i is not None for i in ids)
        if self.order:
            self.order.write({"step": step, "ids": list(ids)})

    def train(self, row: Mapping[str, Any]) -> None:
        now = time.perf_counter()
        speed = self.samples / max(now - self.clock, 1e-9)
        self.clock, self.samples = now, 0
        self.metrics.write(row)
        if self.tb:
            for k in ("loss", "learning_rate", "grad_norm"):
                self.tb.add_scalar(f"train/{k}", row[k], row["step"])
            self.tb.add_scalar("train/samples_per_s", speed, row["step"])
        if self.bar:
            self.bar.set_postfix(loss=f"{row['loss']:.4g}", lr=f"{row['learning_rate']:.3g}",
                                 samples_s=f"{speed:.3g}", refresh=False)

    def valid(self, step: int, values: Mapping[str, float], utterances: int) -> None:
        self.metrics.write({"step": step, "split": "valid", **values, "utterances": utterances})
        if self.tb:
            for k, v in values.items():
                self.tb.add_scalar(f"valid/{k}", v, step)
        self.clock = time.perf_counter()  # evaluation time is not training throughput

    def advance(self) -> None:
        if self.bar:
            self.bar.update(1)

    def close(self) -> None:
        """The bar first: closed before the one-line error or the result is printed. Closing twice is harmless."""
        for part in (self.bar, self.tb, self.order, self.metrics):
            if part is not None:
                part.close()
        self.bar = self.tb = self.order = None


class _NoLogs(_Logs):
    """The logs of a process other than the first in a multi-process run: process 0 writes them all."""

    def __init__(self) -> None:
        self.metrics = self.order = self.tb = self.bar = None

    def step(self, step: int, ids: Sequence[str | None]) -> None:
        pass

    def train(self, row: Mapping[str, Any]) -> None:
        pass

    def valid(self, step: int, values: Mapping[str, float], utterances: int) -> None:
        pass


def _truncate_log(path: Path, step: int) -> None:
    """Keep the lines of ``step`` and before (a resumed run writes the rest again); a torn last line goes too."""
    from speechseq.checkpoints import storage

    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break  # the line a kill cut short: the last one
        if row.get("step", math.inf) > step:
            break
        kept.append(line + "\n")
    with storage.atomic_file(path) as f:
        f.writelines(kept)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_curves(metrics: Sequence[Mapping[str, Any]], path: Path) -> None:
    """curves.png: training loss (and validation loss) by step, and the validation text metrics (matplotlib, Agg)."""
    from speechseq.checkpoints import storage

    matplotlib = require("matplotlib", "curves.png")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in metrics if r["split"] == "train"]
    valid = [r for r in metrics if r["split"] == "valid"]
    text_keys = [k for k in ("wer", "cer", "bleu") if valid and k in valid[0]]
    fig, axes = plt.subplots(1, 2 if text_keys else 1, figsize=(11 if text_keys else 6, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if valid:
        ax.plot([r["step"] for r in valid], [r["loss"] for r in valid], "o-", label="valid loss")
    ax.set(xlabel="step", ylabel="cross-entropy", yscale="log" if train and min(r["loss"] for r in train) > 0
           else "linear")
    ax.legend()
    if text_keys:
        ax = axes[0][1]
        for k in text_keys:
            ax.plot([r["step"] for r in valid], [r[k] for r in valid], "o-", label=f"valid {k}")
        ax.set(xlabel="step")
        ax.legend()
    fig.tight_layout()
    with storage.atomic_file(path, binary=True) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


# -- the loop ----------------------------------------------------------------------------------------------------------


def _check_output_dir(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir {out}: is a file, not a folder")
    earlier = [n for n in ("checkpoints", "metrics.jsonl") if (out / n).exists()]
    if earlier and not resume:
        raise ConfigError(f"train.output_dir {out}: holds an earlier run ({earlier[0]}); pass --resume to continue "
                          "it, or choose another output_dir")


LOCK_FILE = ".speechseq-train.lock"


def _lock_output_dir(out: Path, resume: bool) -> int:
    """An exclusive lock on ``out`` for this run (``flock`` on a file in it, released however the process ends), so
    two runs never write into one output_dir; then the earlier-run check again, now that no other run can start
    one. Returns the lock's file descriptor."""
    import fcntl

    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError(f"train.output_dir {out}: another speechseq train (process {holder}) is using it; wait "
                          "for it to end or choose another output_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    try:
        _check_output_dir(out, resume)
    except ConfigError:
        os.close(fd)
        raise
    return fd


def _check_same_run(saved: Mapping[str, Any], now: Mapping[str, Any], where: Path) -> None:
    """Refuse a resume whose settings would not continue the checkpoint's run exactly."""
    def get(d: Mapping, dotted: str) -> Any:
        for part in dotted.split("."):
            d = d.get(part, {}) if isinstance(d, Mapping) else {}
        return d

    for fixed in RESUME_FIXED:
        a, b = get(saved, fixed), get(now, fixed)
        keys = [fixed] if not isinstance(a, Mapping) else [f"{fixed}.{k}" for k in sorted({*a, *b})]
        for key in keys:
            if key not in RESUME_FREE and get(saved, key) != get(now, key):
                raise ConfigError(f"--resume: {key} is {json.dumps(get(now, key))} but the run in {where} used "
                                  f"{json.dumps(get(saved, key))}; an exact resume needs the same setting (start a "
                                  "new train.output_dir to change it)")


def _save_final(model: "SpeechSeq2Seq", params: Any, processor: "Processor", tokenizer_dir: Path, out: Path) -> None:
    """The trained model in the Hugging Face layout (model-hf/: ``save_pretrained`` + processor files) and in
    speechseq's (model/: ``convert`` of model-hf), each written whole or not at all, replacing an earlier one."""
    import jax

    from speechseq.checkpoints import storage
    from speechseq.checkpoints.convert import convert
    from speechseq.speech_seq2seq import SpeechSeq2Seq

    trained = SpeechSeq2Seq(model.config, params, generation_json=model.generation_json)
    hf = out / "model-hf"
    with storage.atomic_dir(hf, force=True) as tmp:
        trained.save_pretrained(tmp)
        processor.feature_extractor.save_pretrained(tmp)
        for name in storage.SIDE_FILES:  # the tokenizer's files, as its checkpoint has them
            if name not in ("generation_config.json", "preprocessor_config.json") and (tokenizer_dir / name).is_file():
                (tmp / name).write_bytes((tokenizer_dir / name).read_bytes())
    if jax.process_count() == 1:
        convert(hf, out / "model", force=True, progress=False)
        return
    # orbax, which writes model/, synchronises every process of a jax.distributed run, and only this one writes
    # the final model: convert in a process of its own
    done = subprocess.run([sys.executable, "-m", "speechseq.cli", "-q", "convert", str(hf), str(out / "model"),
                           "--force"], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if not k.startswith("JAX_COORDINATOR")})
    if done.returncode:
        lines = done.stderr.strip().splitlines() or [f"status {done.returncode}"]
        raise CheckpointError(f"{out / 'model'}: writing the final model failed ({lines[-1]})")


def _finite(loss: float, grad_norm: float, step: int, ckpt: Any) -> None:
    """A NaN or infinite loss or gradient norm stops the run (``NonFiniteLoss``) once the saves in flight are whole,
    before anything of this step is saved."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    ckpt.wait()
    kept = ckpt.steps()
    what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
    where = f"the last good checkpoint is step {kept[-1]} in {ckpt.directory}" if kept else \
        "no checkpoint was saved before it"
    raise NonFiniteLoss(f"{what} at step {step}: training stopped; {where}")


def _settle(pending: list[tuple[int, Any]], window: dict[str, Any], ckpt: Any) -> float | None:
    """Read back the metrics of the ``pending`` steps (one transfer), stop on the first non-finite one
    (``_finite``), add them to ``window`` in step order and empty ``pending``. Returns the learning rate of the last
    of them (None when none was pending)."""
    import jax

    rate = None
    for (step, m), values in zip(pending, jax.device_get([m for _, m in pending])):
        loss, grad_norm = float(values["loss"]), float(values["grad_norm"])
        _finite(loss, grad_norm, step, ckpt)
        window["loss_sum"] += loss * int(values["tokens"])
        window["tokens"] += int(values["tokens"])
        window["grad_norm_sum"] += grad_norm
        window["steps"] += 1
        rate = float(values["learning_rate"])
    pending.clear()
    return rate


class _Placement:
    """Where the loop's arrays live: one device (``mesh`` None: the state and batches as they are), or a device mesh
    over every process's devices (``mesh.shape``; several processes always have one), where the state is born in
    its shardings, each process's batch rows become a global batch (evaluation's too: it decodes with the sharded
    params), and the final model reads the params gathered whole on every host."""

    def __init__(self, config: TrainConfig):
        import jax

        from speechseq import sharding as S

        self.processes, self.index = jax.process_count(), jax.process_index()
        spec = config.mesh.shape or ("data=-1" if self.processes > 1 else "")
        self.mesh = None
        if spec:
            try:
                self.mesh = S.make_mesh(spec)
            except ConfigError as e:
                raise ConfigError(f"mesh.shape {spec!r}: {str(e).removeprefix('mesh: ')}") from None
            rows = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
            if rows % self.processes:
                raise ConfigError(f"mesh.shape {spec!r}: the batch is split over data x fsdp = {rows} devices, which "
                                  f"does not divide among {self.processes} processes; make data x fsdp a multiple "
                                  "of the process count")
            micro = config.data.batch_size // config.step.accum_steps
            if micro % rows:
                raise ConfigError(f"mesh.shape {spec!r}: data.batch_size / step.accum_steps = {micro} rows per "
                                  f"microbatch do not split over data x fsdp = {rows} devices")
            if config.data.valid and config.eval.batch_size % rows:
                raise ConfigError(f"mesh.shape {spec!r}: eval.batch_size {config.eval.batch_size} does not split over "
                                  f"data x fsdp = {rows} devices")
            self.batch_sharding = S.batch_sharding(self.mesh)

    @property
    def sharded(self) -> "_Placement | None":
        """This placement where batches become global arrays (a mesh), else None."""
        return None if self.mesh is None else self

    @property
    def primary(self) -> bool:
        """This process writes the logs, config.toml and the final model (all processes write checkpoints)."""
        return self.index == 0

    def init_state(self, model: "SpeechSeq2Seq", config: TrainConfig) -> Any:
        from speechseq.training import init_state

        params = model.params
        if config.step.ctc_weight:
            params = {**params, **ctc.init_head(model.config, config.train.seed)}
        if self.mesh is None:
            return init_state(model.config, params, config.optim, config.train.seed)
        import jax

        from speechseq import sharding as S

        # the model's params are in their shardings already (load_model); the CTC head is made on one device: a
        # host copy, which every process passes alike and jit takes as a replicated input of its mesh
        params = jax.tree.map(lambda a: a if getattr(a, "sharding", None) is not None and
                              a.sharding.device_set == set(self.mesh.devices.flat) else jax.device_get(a), params)
        return S.init_state_sharded(model.config, params, config.optim, config.train.seed, self.mesh)

    def train_step(self, model: "SpeechSeq2Seq", config: TrainConfig) -> Any:
        from speechseq.training import make_train_step

        if self.mesh is None:
            return make_train_step(model.config, config.optim, config.step)
        from speechseq import sharding as S

        return S.make_sharded_train_step(model.config, config.optim, config.step, mesh=self.mesh)

    def batch(self, batch: dict) -> dict:
        if self.mesh is None:
            return batch
        from speechseq import sharding as S

        return S.global_batch(batch, self.batch_sharding)

    def whole(self, params: Any) -> Any:
        """Params every process can read whole (a collective under a mesh: call it in every process)."""
        if self.mesh is None:
            return params
        from speechseq import sharding as S

        return S.gather(params)

    def global_ids(self, ids: Sequence[str | None], loader: "Loader") -> list[str | None]:
        """The ids of the global batch, in row order, from every process's rows (a collective when several run)."""
        if self.processes == 1:
            return list(ids)
        import numpy as np

        from speechseq import sharding as S

        if not hasattr(self, "_positions"):
            self._positions: dict[int, dict[str, int]] = {}  # per loader (training, validation)
        if id(loader) not in self._positions:
            self._positions[id(loader)] = {ex.id: i for i, ex in enumerate(loader.examples)}
        positions = self._positions[id(loader)]
        local = np.asarray([-1 if i is None else positions[i] for i in ids], np.int64)
        everyone = np.asarray(S.gather(local)).reshape(-1)  # the processes' rows, concatenated
        return [None if k < 0 else loader.examples[k].id for k in everyone]


def _empty_window() -> dict[str, Any]:
    """The running sums of the steps since the last metrics.jsonl line (saved in checkpoints: a resumed run
    continues them)."""
    return {"loss_sum": 0.0, "tokens": 0, "grad_norm_sum": 0.0, "steps": 0}


class _Preemption:
    """SIGTERM (what schedulers and preemptible TPU / GPU hosts send before they stop a job) asks the loop to finish
    its step, save a checkpoint of it and stop with status 143, so ``--resume`` continues with nothing lost. Only in
    a one-process run, in the main thread and over the default handler; several processes would have to agree on
    the step first, so they keep the default (stop at once, resume from the last checkpoint)."""

    def __init__(self, processes: int) -> None:
        self.requested = False
        self.previous: Any = None
        self.active = processes == 1 and threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        if self.active:
            self.previous = signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, signum: int, frame: Any) -> None:
        self.requested = True

    def close(self) -> None:
        if self.active:
            signal.signal(signal.SIGTERM, self.previous)
            self.active = False


def train(config: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run training as ``config`` says (see the module docstring); ``resume`` continues the run in
    ``train.output_dir`` from its latest checkpoint. Returns the last logged training values and the last
    evaluation's metrics (``{"step", "loss", "learning_rate", "valid": {...}}``)."""
    from speechseq.checkpoints import storage
    from speechseq.data import single_threaded_blas
    from speechseq.sharding import barrier
    from speechseq.speech_seq2seq import SpeechSeq2Seq
    from speechseq.training import make_eval_step
    from speechseq.training.checkpoint import Checkpoints

    config.validate()
    loop = config.train
    out = Path(loop.output_dir).absolute()
    place = _Placement(config)
    _check_output_dir(out, resume)
    model, processor, tokenizer_dir = load_model(config, place.mesh)
    train_loader, valid_loader = _loaders(config, processor, model.config.decoder_start_token_id, place.index,
                                          place.processes)
    state = place.init_state(model, config)
    settings = as_dict(config)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"train.output_dir {out}: cannot create it ({e.strerror})") from None
    lock = _lock_output_dir(out, resume) if place.primary else None
    barrier("speechseq-train-start")  # every process has checked output_dir before the first writes to it

    with contextlib.ExitStack() as stack:  # closed in reverse order, however the run ends
        if lock is not None:
            stack.callback(os.close, lock)
        stack.enter_context(single_threaded_blas())  # the loader's threads featurise beside the train step
        ckpt = Checkpoints(out / "checkpoints", keep_last=loop.keep_last, best_metric=loop.best_metric,
                           best_mode=BEST_METRICS[loop.best_metric])
        stack.callback(ckpt.close)
        start, window = 0, _empty_window()
        latest = ckpt.latest_step() if resume else None
        if latest is not None:
            state, meta = ckpt.restore(latest, state)
            _check_same_run(meta.get("config", {}), settings, out)
            train_loader.set_state(meta["data"])
            start, window = latest, meta["window"]
        elif resume:
            print(f"speechseq: --resume: no checkpoint in {out / 'checkpoints'} yet; starting from step 0",
                  file=sys.stderr)
        if place.primary:
            with storage.atomic_file(out / "config.toml") as f:
                f.write(to_toml(config))
        logs = _Logs(out, config, start) if place.primary else _NoLogs()
        stack.callback(logs.close)
        batches = iter(train_loader)
        stack.callback(batches.close)  # the loader's reading threads stop now, not at interpreter exit

        preemption = _Preemption(place.processes)
        stack.callback(preemption.close)
        train_step = place.train_step(model, config)
        eval_step = make_eval_step(model.config, config.step) if valid_loader else None
        gen = {"num_beams": config.eval.num_beams, "max_new_tokens": config.eval.max_new_tokens}
        last: dict[str, Any] = {"step": start}
        pending: list[tuple[int, Any]] = []  # (step, its metrics still on the device)
        try:
            for step in range(start + 1, loop.steps + 1):  # ``step``: optimizer steps done once this one is
                batch = next(batches)
                ids = batch.pop("ids")
                state, m = train_step(state, place.batch(batch))
                pending.append((step, m))  # read back later: the host runs ahead of the device meanwhile
                logs.step(step, place.global_ids(ids, train_loader) if config.log.data_order else ids)
                eval_now = bool(valid_loader) and ((loop.eval_every and step % loop.eval_every == 0)
                                                   or step == loop.steps)
                log_now = step % loop.log_every == 0 or step == loop.steps
                preempted = preemption.requested  # read once: a SIGTERM arriving later in the step waits for the next
                if log_now or eval_now or step % loop.save_every == 0 or preempted:
                    rate = _settle(pending, window, ckpt)  # every step is checked finite before a save or an eval
                if log_now:
                    data = train_loader.get_state()
                    row = {"step": step, "split": "train", "loss": window["loss_sum"] / max(window["tokens"], 1),
                           "learning_rate": rate,
                           "grad_norm": window["grad_norm_sum"] / window["steps"], "tokens": window["tokens"],
                           "epoch": round(data["epoch"] + data["batch"] / train_loader.batches_per_epoch, 4)}
                    logs.train(row)
                    last.update(step=step, loss=row["loss"], learning_rate=row["learning_rate"])
                    window = _empty_window()
                evaluated = None
                if eval_now:
                    current = SpeechSeq2Seq(model.config, ctc.model_params(state.params), model.dtype,
                                            generation_json=model.generation_json)
                    result = evaluate(current, valid_loader, task=config.eval.task, normalize=config.eval.normalize,
                                      eval_step=eval_step, place=place.sharded, **gen)
                    evaluated = {k: result[k] for k in ("loss", "wer", "cer", "bleu") if k in result}
                    logs.valid(step, evaluated, result["utterances"])
                    last["valid"] = evaluated
                if step % loop.save_every == 0 or eval_now or step == loop.steps or preempted:
                    meta = {"data": train_loader.get_state(), "window": window, "config": settings}
                    ckpt.save(step, state, meta, evaluated)
                logs.advance()
                if preempted and step < loop.steps:
                    ckpt.wait()
                    stop = storage.Interrupted(signal.SIGTERM)
                    stop.detail = (f"the checkpoint of step {step} is saved in {out / 'checkpoints'}; continue with "
                                   "--resume")
                    raise stop
            ckpt.wait()
        except KeyboardInterrupt:
            try:
                ckpt.wait()  # a save in flight completes; none is started
            except CheckpointError:
                pass
            raise
        logs.close()
        params = ctc.model_params(place.whole(state.params))
        if place.primary:
            _save_final(model, params, processor, tokenizer_dir, out)
            if config.log.plot:
                plot_curves(read_metrics(out / "metrics.jsonl"), out / "curves.png")
        barrier("speechseq-train-end")  # no process reports success before the final model is written
    return last
