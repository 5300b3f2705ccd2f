"""`speechseq train` and `speechseq evaluate`: the config file, checkpoints (keep last N and the best, a failed save),
the loop (exact resume after kill -9, a NaN loss, Ctrl-C), the final model in both layouts, and a tiny model that
learns a few synthesized sentences."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import hf_factory as F
from conftest import synthesize
from speechseq.cli import main
from speechseq.errors import SpeechSeqError
from speechseq.training.config import TrainConfig, load_config, parse_config, to_toml

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = ("open the door", "good morning", "thank you")
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-us+f2", "en-gb-x-gbclan", "en-us+m3")


# ---- fixtures: speech, a tiny model with a character tokenizer, configs ---------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """SENTENCES x VOICES spoken by espeak-ng (each under 1 s), and manifests: train.jsonl (all 24), small.jsonl (8)
    and valid.jsonl (3, one per sentence)."""
    folder = tmp_path_factory.mktemp("corpus")
    rows = []
    for i, text in enumerate(SENTENCES):
        for j, voice in enumerate(VOICES):
            name = f"s{i}-v{j}.wav"
            synthesize(text, folder / name, voice=voice, speed=200)
            rows.append({"id": f"s{i}-v{j}", "audio": name, "text": text})

    def manifest(name, chosen):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in chosen))
        return folder / name

    manifest("train.jsonl", rows)
    manifest("small.jsonl", rows[::3])
    manifest("valid.jsonl", rows[::len(VOICES)])
    return folder


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory):
    """A random tiny wav2vec2 + BERT checkpoint (transformers' layout) whose decoder reads the character tokenizer of
    examples/synth/make_tokenizer.py: [PAD]=0 (pad), [CLS]=2 (decoder start), [SEP]=3 (end), 32 ids."""
    import torch
    import transformers as T

    sys.path.insert(0, str(ROOT / "examples" / "synth"))
    try:
        from make_tokenizer import save_tokenizer
    finally:
        sys.path.pop(0)
    path = tmp_path_factory.mktemp("tiny-init")
    save_tokenizer(path)
    T.Wav2Vec2FeatureExtractor(return_attention_mask=True, do_normalize=True).save_pretrained(path)
    # hf_factory's tiny wav2vec2 (stable layer norm) and BERT, wider and with fewer frames per second (stride 80),
    # dropout and SpecAugment on
    enc = F.any_encoder_config("w2v-layer-stable", hidden_size=32, num_attention_heads=4, intermediate_size=64,
                               conv_dim=(16, 32, 32), conv_kernel=(10, 4, 4), conv_stride=(5, 4, 4),
                               num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2, hidden_dropout=0.1,
                               mask_time_prob=0.05)
    dec = F.decoder_config("bert", hidden=32)
    for key, value in dict(vocab_size=32, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                           hidden_dropout_prob=0.1, pad_token_id=0, bos_token_id=2, eos_token_id=3).items():
        setattr(dec, key, value)
    cfg = T.SpeechEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = 2, 0, 3
    torch.manual_seed(0)
    T.SpeechEncoderDecoderModel(cfg).save_pretrained(path)
    return path


def write_config(path: Path, sections: dict) -> Path:
    """A config file as `speechseq train --print-config` writes one (to_toml), from a dict of sections."""
    path.write_text(to_toml(parse_config(sections, str(path), validate=False)))
    return path


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def run_cli(capsys, *argv):
    code = main(["-q", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


# ---- the config file ------------------------------------------------------------------------------------------------

def test_print_config_lists_every_setting_with_its_default_and_reads_back(capsys):
    code, out, err = run_cli(capsys, "train", "--print-config")
    assert code == 0, err
    import tomllib

    data = tomllib.loads(out)
    assert parse_config(data, validate=False) == TrainConfig()
    defaults = TrainConfig()
    for section in data:
        for f in dataclasses.fields(getattr(defaults, section)):
            assert f.name in data[section], f"{section}.{f.name} missing from --print-config"
    # every setting carries its doc as a comment line above it
    section, previous = None, ""
    for line in out.splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif not line.startswith("#") and " = " in line:
            assert previous.startswith("# "), (section, line)
        previous = line


def test_config_file_and_overrides(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text('[model]\nencoder = "enc"\ndecoder = "dec"\noverrides = {decoder_dropout = 0.1}\n'
                    '[data]\ntrain = "train.jsonl"\nmax_audio_seconds = 12\n[optim]\nlearning_rate = 1e-3\n'
                    '[train]\nsteps = 300\n')
    cfg = load_config(path, ["optim.learning_rate=3e-4", "model.overrides.encoder_add_adapter=true",
                             "data.max_audio_seconds=none", "optim.freeze=['feature_encoder']", "eval.task=translate",
                             "model.decoder=some/dir"])
    assert cfg.optim.learning_rate == 3e-4 and isinstance(cfg.data.max_audio_seconds, type(None))
    assert cfg.model.overrides == {"decoder_dropout": 0.1, "encoder_add_adapter": True}
    assert cfg.model.decoder == "some/dir" and cfg.optim.freeze == ("feature_encoder",)
    assert cfg.optim.total_steps == 300  # the schedule ends with the run unless set
    assert load_config(path, ["optim.total_steps=1000"]).optim.total_steps == 1000
    assert cfg.eval.task == "translate" and cfg.train.steps == 300 and cfg.step == TrainConfig().step


def test_padding_buckets_reach_both_loaders(tiny_init, corpus):
    """data.audio_buckets / data.label_buckets set the padded shapes of the training and the validation batches."""
    from speechseq.processor import Processor
    from speechseq.training.loop import _loaders

    cfg = parse_config({"model": {"init": str(tiny_init)},
                        "data": {"train": str(corpus / "train.jsonl"), "valid": str(corpus / "valid.jsonl"),
                                 "batch_size": 4, "audio_buckets": [0.25, 0.5, 0.75, 3], "label_buckets": [4, 8, 20],
                                 "max_audio_seconds": 2.0}})
    processor = Processor.from_pretrained(tiny_init)
    train, valid = _loaders(cfg, processor, start_token=2)
    rate = processor.feature_extractor.sampling_rate
    for loader in (train, valid):
        assert loader.audio_buckets == [rate // 4, rate // 2, rate * 3 // 4, 2 * rate]  # 3 s past the 2 s cap
        assert loader.label_buckets == [4, 8, 20]
    shapes = train.batch_shapes(0) + valid.batch_shapes(None)
    assert {n for _, n, _ in shapes} <= {rate // 4, rate // 2, rate * 3 // 4, 2 * rate}
    assert {t for _, _, t in shapes} <= {4, 8, 20} and len({n for _, n, _ in shapes}) > 1  # the sentences differ


@pytest.mark.parametrize("text, overrides, message", [
    ("[optim]\nlearnig_rate = 1e-3\n", [], "run.toml: unknown key 'optim.learnig_rate' (did you mean "
                                           "'optim.learning_rate'?)"),
    ("[optimizer]\n", [], "run.toml: unknown section [optimizer] (did you mean 'optim'?)"),
    ("[train]\nsteps = \"ten\"\n", [], "run.toml: train.steps should be an integer, got a string \"ten\""),
    ("[train]\nsteps = 0\n", [], "run.toml: train.steps should be an integer >= 1, got 0"),
    ("[optim]\nschedule = \"cosin\"\n", [], "run.toml: optim.schedule: unknown schedule 'cosin'"),
    ("[eval]\ntask = \"transcrib\"\n", [], "run.toml: eval.task should be one of \"transcribe\", \"translate\", got "
                                          "\"transcrib\" (did you mean 'transcribe'?)"),
    ("", ["optim.learning_rate=-1"], "--set: optim.learning_rate should be a finite number >= 0, got -1"),
    ("", ["log.progres=false"], "--set: unknown key 'log.progres' (did you mean 'log.progress'?)"),
    ("", ["steps=3"], "--set steps=3: expected section.key=value"),
    ("[data]\naudio_buckets = []\n", [], "run.toml: data.audio_buckets should be a non-empty array of numbers, got "
                                         "an array []"),
    ("", ["data.label_buckets=[16, 0]"], "--set: data.label_buckets entry should be an integer >= 1, got 0"),
    ("[model\n", [], "run.toml: not valid TOML"),
    ("[model]\ninit = \"x\"\nencoder = \"y\"\n[data]\ntrain = \"t\"\n", [], "run.toml: set model.init (a checkpoint to "
                                                                            "fine-tune) or model.encoder and "
                                                                            "model.decoder (a warm start), not both"),
])
def test_config_mistakes_are_one_line(tmp_path, capsys, text, overrides, message):
    path = tmp_path / "run.toml"
    path.write_text(text)
    argv = ["train", path] + [a for o in overrides for a in ("--set", o)]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    line = one_line(err)
    assert line.startswith(f"speechseq: error: {message.replace('run.toml', str(path))}"), line


def test_example_config_is_a_valid_run(monkeypatch):
    cfg = load_config(ROOT / "examples" / "train_config.toml")  # validated: a runnable config
    assert cfg.model.encoder and cfg.model.decoder and cfg.data.train and cfg.data.valid


# ---- metrics ------------------------------------------------------------------------------------------------------

def test_text_metrics_and_a_missing_extra(monkeypatch):
    from speechseq import metrics

    # one substituted word of 3 + one inserted of 2: 2 edits / 5 reference words; characters: 1 + 2 ("x", " y")
    out = metrics.text_metrics(["a b c", "d e"], ["a x c", "d e y"], task="translate")
    assert out["wer"] == pytest.approx(2 / 5) and out["cer"] == pytest.approx(3 / 8) and 0 <= out["bleu"] < 100
    assert metrics.wer(["Hello, World!"], ["hello world"]) == 1.0
    assert metrics.wer(["Hello, World!"], ["hello world"], normalize=True) == 0.0
    assert metrics.normalize("It's  \"fine\" -- REALLY.") == "it's fine really"
    monkeypatch.setitem(sys.modules, "jiwer", None)  # as if not installed
    with pytest.raises(SpeechSeqError) as e:
        metrics.wer(["a"], ["a"])
    assert str(e.value) == "jiwer is not installed (word error rate); pip install 'speechseq[train]' installs it"


# ---- checkpoints -----------------------------------------------------------------------------------------------------

def small_state(value: float):
    import jax.numpy as jnp

    from speechseq.training import TrainState

    params = {"w": jnp.full((3, 4), value, jnp.float32), "b": jnp.arange(4, dtype=jnp.float32) * value}
    return TrainState(jnp.int32(int(value)), params, ({"mu": params},), jnp.array([7, int(value)], jnp.uint32))


def leaves_equal(a, b) -> bool:
    import jax

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(la, lb))


def test_checkpoints_keep_the_last_and_the_best(tmp_path):
    from speechseq.training.checkpoint import Checkpoints

    wer = {1: 0.5, 2: 0.2, 3: None, 4: 0.3, 5: None, 6: 0.4}  # None: no evaluation at that step
    ckpt = Checkpoints(tmp_path / "c", keep_last=2, best_metric="wer", best_mode="min")
    for step, w in wer.items():
        ckpt.save(step, small_state(step), {"data": {"step": step}}, None if w is None else {"wer": w, "loss": 9.0})
    ckpt.wait()
    assert ckpt.steps() == [2, 5, 6]  # the last two, and the best (lowest WER) however old
    ckpt.close()
    ckpt = Checkpoints(tmp_path / "c", keep_last=2, best_metric="wer", best_mode="min")  # the next run's manager
    state, meta = ckpt.restore(2, small_state(0))
    assert leaves_equal(state, small_state(2)) and meta == {"data": {"step": 2}}
    ckpt.save(7, small_state(7), {}, {"wer": 0.1})
    ckpt.wait()
    assert ckpt.steps() == [6, 7]  # a better one replaces the old best
    ckpt.close()
    ckpt = Checkpoints(tmp_path / "m", keep_last=1, best_metric="bleu", best_mode="max")
    for step, bleu in ((1, 30.0), (2, 10.0), (3, 20.0)):
        ckpt.save(step, small_state(step), {}, {"bleu": bleu})
    ckpt.wait()
    assert ckpt.steps() == [1, 3]  # BLEU: the highest is the best
    ckpt.close()


FAILING_RUN = """
import errno, sys
sys.path.insert(0, {tests!r})
import orbax.checkpoint as ocp
from test_training_loop import small_state
from speechseq.training.checkpoint import Checkpoints

ckpt = Checkpoints({folder!r}, keep_last=1)
ckpt.save(1, small_state(1), {{"data": 1}})
ckpt.wait()

async def disk_full(self, *args, **kwargs):  # where the JSON file is written, in orbax's background thread
    raise OSError(errno.ENOSPC, "No space left on device")

ocp.JsonCheckpointHandler._save_fn = disk_full
try:
    ckpt.save(2, small_state(2), {{"data": 2}})
    ckpt.wait()
except Exception as e:
    print(type(e).__name__, e)
"""


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path):
    """A run whose disk is full while it writes checkpoint 2: one line saying so and what is intact; checkpoint 1 as
    it was, kept and restorable by the next run, whose first save removes the failed one's temporary folder."""
    from speechseq.training.checkpoint import Checkpoints

    folder = tmp_path / "c"
    done = subprocess.run([sys.executable, "-c", FAILING_RUN.format(tests=str(ROOT / "tests"), folder=str(folder))],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    message = done.stdout.strip()
    assert message.startswith(f"CheckpointError {folder}: saving ") and "\n" not in message
    assert message.endswith("failed ([Errno 28] No space left on device); the previous checkpoint (step 1) is intact")
    ckpt = Checkpoints(folder, keep_last=1)
    assert ckpt.steps() == [1]
    state, meta = ckpt.restore(1, small_state(0))
    assert leaves_equal(state, small_state(1)) and meta == {"data": 1}
    ckpt.save(3, small_state(3), {"data": 3})
    ckpt.wait()
    assert ckpt.steps() == [3] and sorted(p.name for p in folder.iterdir()) == ["3"]
    ckpt.close()


# ---- a tiny model learns; its final model in both layouts; evaluate --------------------------------------------------

@pytest.fixture(scope="module")
def trained(corpus, tiny_init, tmp_path_factory):
    """`speechseq train`: the tiny model on all 24 utterances until its training WER is 0, evaluated on the training
    set itself at the end. Deterministic (seeded init, data order and steps; no dropout)."""
    folder = tmp_path_factory.mktemp("learn")
    cfg = write_config(folder / "learn.toml", {
        "model": {"init": str(tiny_init)},
        "data": {"train": str(corpus / "train.jsonl"), "valid": str(corpus / "train.jsonl"), "batch_size": 8,
                 "num_workers": 2},
        "optim": {"learning_rate": 4e-3, "warmup_steps": 10},
        "step": {"dropout": False},
        "train": {"steps": 160, "eval_every": 0, "save_every": 80, "log_every": 10, "seed": 0,
                  "output_dir": str(folder / "run")},
        "eval": {"batch_size": 8, "max_new_tokens": 20},
    })
    t0 = time.perf_counter()
    code = main(["-q", "train", str(cfg)])
    assert code == 0
    return folder / "run", time.perf_counter() - t0


def test_a_tiny_model_learns(trained):
    out, seconds = trained
    from speechseq.training.loop import read_metrics

    rows = read_metrics(out / "metrics.jsonl")
    train = [r for r in rows if r["split"] == "train"]
    valid = [r for r in rows if r["split"] == "valid"]
    assert [r["step"] for r in train] == list(range(10, 161, 10))
    assert train[-1]["loss"] < train[0]["loss"] / 20, [r["loss"] for r in train]
    assert len(valid) == 1 and valid[0]["step"] == 160 and valid[0]["utterances"] == 24
    assert valid[0]["wer"] == 0.0 and valid[0]["cer"] == 0.0, (valid, seconds)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert load_config(out / "config.toml").train.steps == 160


def test_final_model_loads_in_transformers_with_the_same_logits(trained, corpus):
    import torch
    import transformers as T

    from speechseq import SpeechSeq2Seq
    from speechseq.audio import load_audio
    from speechseq.checkpoints import storage
    from speechseq.checkpoints.table import flatten

    out, _ = trained
    ours = SpeechSeq2Seq.from_pretrained(out / "model")  # speechseq layout: orbax params
    assert storage.is_speechseq(out / "model") and not storage.is_speechseq(out / "model-hf")
    # the final model is the last step's params, bit for bit
    from speechseq.training import init_state
    from speechseq.training.checkpoint import Checkpoints

    cfg = load_config(out / "config.toml")
    ckpt = Checkpoints(out / "checkpoints")
    state, _ = ckpt.restore(160, init_state(ours.config, ours.params, cfg.optim, 0))
    ckpt.close()
    final = flatten(ours.params)
    assert all(np.array_equal(np.asarray(v), final[k]) for k, v in flatten(state.params).items())
    ref = T.SpeechEncoderDecoderModel.from_pretrained(out / "model-hf").eval()
    audio = [load_audio(corpus / f"s{i}-v{i}.wav") for i in range(3)]
    n = max(len(a) for a in audio)
    x = np.stack([np.pad(a, (0, n - len(a))) for a in audio]).astype(np.float32)
    mask = np.stack([np.arange(n) < len(a) for a in audio]).astype(np.int32)
    ids = np.array([[2, 10, 11, 12, 4, 13], [2, 14, 15, 4, 16, 17], [2, 20, 21, 22, 23, 4]])
    with torch.no_grad():
        want = ref(input_values=torch.from_numpy(x), attention_mask=torch.from_numpy(mask),
                   decoder_input_ids=torch.from_numpy(ids)).logits.numpy()
    got = np.asarray(ours(x, mask, decoder_input_ids=ids).logits)
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())
    # the tokenizer and feature extractor travel with both layouts
    for folder in ("model", "model-hf"):
        assert {"tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"} <= {
            p.name for p in (out / folder).iterdir()}
    assert T.AutoTokenizer.from_pretrained(out / "model-hf").decode([20, 21, 10, 19, 4, 25]) == "open t"


@pytest.fixture
def blas_seen(monkeypatch):
    """The BLAS thread counts in force each time a ``Loader`` hands out a batch, with BLAS set to 2 threads around
    the test (so that a run which forgot ``single_threaded_blas`` shows 2 on any machine)."""
    from threadpoolctl import threadpool_limits

    from speechseq.data import Loader
    from test_data import blas_threads

    seen: list[set[int]] = []
    run = Loader._run

    def spy(self, *args, **kwargs):
        for batch in run(self, *args, **kwargs):
            seen.append(blas_threads())
            yield batch

    monkeypatch.setattr(Loader, "_run", spy)
    with threadpool_limits(limits=2, user_api="blas"):
        yield seen


def test_evaluate_command(trained, corpus, tmp_path, capsys, monkeypatch, blas_seen):
    out, _ = trained
    monkeypatch.chdir(tmp_path)
    manifest = corpus / "valid.jsonl"
    before = manifest.read_bytes()
    code, stdout, err = run_cli(capsys, "evaluate", "--model", out / "model", manifest, "--batch-size", 2)
    assert code == 0, err
    assert blas_seen and all(s == {1} for s in blas_seen)  # the loader's threads featurised beside generate
    summary = dict(line.split(None, 1) for line in stdout.splitlines())
    assert summary["utterances"] == "3" and summary["skipped"] == "0"
    assert float(summary["wer"]) == 0.0 and float(summary["cer"]) == 0.0
    assert float(summary["audio_seconds"]) > 1.5 and float(summary["real_time_factor"]) > 0
    rows = [json.loads(line) for line in (tmp_path / "valid.hyps.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in rows] == [r["hypothesis"] for r in rows]
    assert sorted(r["reference"] for r in rows) == sorted(SENTENCES)
    assert set(rows[0]) == {"id", "audio", "reference", "hypothesis", "audio_seconds"}
    # the default output is not replaced; an input never is; a named file is
    code, _, err = run_cli(capsys, "evaluate", "--model", out / "model", manifest)
    assert code == 2 and "valid.hyps.jsonl already exists" in one_line(err)
    code, _, err = run_cli(capsys, "evaluate", "--model", out / "model", manifest, "--output", manifest)
    assert code == 2 and "is one of the inputs" in one_line(err)
    assert manifest.read_bytes() == before
    (tmp_path / "named.jsonl").write_text("old\n")
    code, stdout, err = run_cli(capsys, "evaluate", "--model", out / "model", manifest, "--output", "named.jsonl",
                                "--task", "translate", "--num-beams", "2")
    assert code == 0, err
    assert "bleu" in stdout and len((tmp_path / "named.jsonl").read_text().splitlines()) == 3


def test_resume_refuses_other_settings_and_a_fresh_run_refuses_an_earlier_one(trained, capsys):
    out, _ = trained
    cfg = out / "config.toml"
    code, _, err = run_cli(capsys, "train", cfg, "--set", "train.steps=170", "--set", "optim.learning_rate=1e-3",
                           "--resume")
    assert code == 2
    assert "--resume: optim.learning_rate is 0.001 but the run in" in one_line(err)
    code, _, err = run_cli(capsys, "train", cfg)
    assert code == 2 and "holds an earlier run (checkpoints); pass --resume" in one_line(err)


# ---- stopping: kill -9 and resume, a NaN loss, Ctrl-C ----------------------------------------------------------------

def run_sections(tiny_init, corpus, out: Path, **changes) -> dict:
    """A short run on 8 utterances, 2 per batch (several epochs), dropout and SpecAugment on, evaluated every 5
    steps, a checkpoint every 2, every step logged."""
    sections = {
        "model": {"init": str(tiny_init)},
        "data": {"train": str(corpus / "small.jsonl"), "valid": str(corpus / "valid.jsonl"), "batch_size": 2,
                 "num_workers": 2},
        "optim": {"learning_rate": 2e-3, "warmup_steps": 2, "weight_decay": 0.01},
        "train": {"steps": 12, "eval_every": 5, "save_every": 2, "keep_last": 2, "log_every": 1, "seed": 5,
                  "output_dir": str(out)},
        "eval": {"batch_size": 4, "max_new_tokens": 6},
        "log": {"data_order": True, "plot": False},
    }
    for key, value in changes.items():
        section, name = key.split("__")
        sections[section][name] = value
    return sections


# `speechseq train` as from a terminal: a test suite started in the background (`make test &`) inherits an ignored
# SIGINT, which Python keeps ignored, so the child first puts Ctrl-C's default Python handler back
_CLI = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from speechseq.cli import main; sys.exit(main(sys.argv[1:]))")


def start(config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _CLI, "-q", "train", str(config), *extra],
                            cwd=config.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def complete_checkpoints(out: Path) -> list[str]:
    """Steps whose checkpoint orbax has finished (renamed from its temporary folder)."""
    try:
        return [n for n in os.listdir(out / "checkpoints") if n.isdigit()]
    except FileNotFoundError:
        return []


def wait_for(p: subprocess.Popen, ready, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if p.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {p.communicate()}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def final_state(out: Path, tiny_init: Path):
    from speechseq import SpeechSeq2Seq
    from speechseq.training import init_state
    from speechseq.training.checkpoint import Checkpoints

    cfg = load_config(out / "config.toml")
    model = SpeechSeq2Seq.from_pretrained(tiny_init)
    ckpt = Checkpoints(out / "checkpoints")
    try:
        return ckpt.restore(ckpt.latest_step(), init_state(model.config, model.params, cfg.optim, cfg.train.seed))
    finally:
        ckpt.close()


@pytest.mark.slow
def test_exact_resume_after_kill_9(tiny_init, corpus, tmp_path):
    """A run killed with SIGKILL at a random step (after its first checkpoint) and resumed with --resume ends with
    the params, optimizer state, metrics.jsonl, data order and kept checkpoints of a run never stopped."""
    whole = write_config(tmp_path / "whole.toml", run_sections(tiny_init, corpus, tmp_path / "whole"))
    cut = write_config(tmp_path / "cut.toml", run_sections(tiny_init, corpus, tmp_path / "cut"))
    seed = random.randrange(1 << 30)
    kill_at = random.Random(seed).randint(3, 11)  # steps done when killed; the first checkpoint is step 2's
    reference = start(whole)
    p = start(cut)
    order = tmp_path / "cut" / "data_order.jsonl"
    wait_for(p, lambda: lines(order) >= kill_at and complete_checkpoints(tmp_path / "cut"), f"step {kill_at}")
    p.send_signal(signal.SIGKILL)
    p.communicate()
    killed_after = lines(order)
    assert killed_after < 12, f"the run finished before the kill (seed {seed})"
    resumed = start(cut, "--resume")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert "no checkpoint" not in err  # it continued from one
    out_ref, err_ref = reference.communicate(timeout=600)
    assert reference.returncode == 0, err_ref
    assert json.loads(out.splitlines()[-1]) == json.loads(out_ref.splitlines()[-1])
    a, b = tmp_path / "whole", tmp_path / "cut"
    why = f"killed after {killed_after} steps (seed {seed})"
    for name in ("metrics.jsonl", "data_order.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), (name, why)
    assert lines(b / "data_order.jsonl") == 12
    assert sorted(os.listdir(a / "checkpoints")) == sorted(os.listdir(b / "checkpoints")), why
    (state_a, meta_a), (state_b, meta_b) = final_state(a, tiny_init), final_state(b, tiny_init)
    assert int(state_a.step) == 12 and leaves_equal(state_a, state_b), why
    assert meta_a["data"] == meta_b["data"]
    assert (a / "model-hf" / "model.safetensors").read_bytes() == (b / "model-hf" / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_sigterm_saves_the_step_and_resume_loses_nothing(tiny_init, corpus, tmp_path):
    """SIGTERM (a scheduler's stop, a preempted host) at a random step: the step finishes, its checkpoint is saved
    (off the save_every schedule), the run stops with one line and status 143, and --resume ends with the state,
    metrics.jsonl and data order of a run never stopped."""
    whole = write_config(tmp_path / "whole.toml", run_sections(tiny_init, corpus, tmp_path / "whole"))
    cut = write_config(tmp_path / "cut.toml", run_sections(tiny_init, corpus, tmp_path / "cut"))
    seed = random.randrange(1 << 30)
    term_at = random.Random(seed).randint(1, 9)  # steps done when terminated
    reference = start(whole)
    p = start(cut)
    order = tmp_path / "cut" / "data_order.jsonl"
    wait_for(p, lambda: lines(order) >= term_at, f"step {term_at}")
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=600)
    stopped = lines(order)
    why = f"terminated after {stopped} steps (seed {seed})"
    assert p.returncode == 143, (err, why)
    assert stopped < 12, f"the run finished before SIGTERM ({why})"
    assert one_line(err) == (f"speechseq: terminated: the checkpoint of step {stopped} is saved in "
                             f"{tmp_path / 'cut' / 'checkpoints'}; continue with --resume"), why
    assert max(int(n) for n in complete_checkpoints(tmp_path / "cut")) == stopped, why
    assert not (tmp_path / "cut" / "model-hf").exists()
    resumed = start(cut, "--resume")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    out_ref, err_ref = reference.communicate(timeout=600)
    assert reference.returncode == 0, err_ref
    assert json.loads(out.splitlines()[-1]) == json.loads(out_ref.splitlines()[-1]), why
    a, b = tmp_path / "whole", tmp_path / "cut"
    for name in ("metrics.jsonl", "data_order.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), (name, why)
    (state_a, _), (state_b, _) = final_state(a, tiny_init), final_state(b, tiny_init)
    assert int(state_b.step) == 12 and leaves_equal(state_a, state_b), why
    assert (a / "model-hf" / "model.safetensors").read_bytes() == (b / "model-hf" / "model.safetensors").read_bytes()


def test_a_run_prints_nothing_but_its_result(tiny_init, corpus, tmp_path, capsys, caplog, monkeypatch):
    """`speechseq -q train` writes its result to stdout and nothing to stderr, and orbax's warnings through absl's
    logger stay out of it (here one at every save: "Waiting for previous save to complete took ... seconds", which
    a loaded machine gets, and which once made a SIGTERM's one line two)."""
    import logging

    from orbax.checkpoint import checkpoint_manager

    monkeypatch.setattr(checkpoint_manager, "_WAIT_FOR_PREV_SAVE_WARNING_THRESHOLD_SECS", -1.0)
    monkeypatch.setattr(logging.getLogger("absl"), "level", logging.NOTSET)  # as a fresh process has it
    sections = run_sections(tiny_init, corpus, tmp_path / "quiet", train__steps=4, data__valid="")
    with caplog.at_level(logging.WARNING):  # pytest takes log records from stderr's handler: read them here
        code, out, err = run_cli(capsys, "train", write_config(tmp_path / "quiet.toml", sections))
    assert code == 0 and err == "", err
    assert json.loads(out.splitlines()[-1])["step"] == 4
    assert not [r.getMessage() for r in caplog.records if r.name == "absl"]


@pytest.mark.parametrize("every", [1, 3])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_init, corpus, tmp_path, capsys, every):
    """A learning rate of 1e30 sends the weights to ~1e30 in one step, so step 2's loss is NaN: one line naming
    step 2, exit 2, no final model. Saving (and logging) every step: checkpoint 1 kept as it was and nothing after
    it. Every 3 steps: the metrics are read back at step 3, which finds step 2's NaN before anything is saved."""
    sections = run_sections(tiny_init, corpus, tmp_path / "nan", optim__learning_rate=1e30,
                            optim__schedule="constant", optim__warmup_steps=0, optim__max_grad_norm="none",
                            train__save_every=every, train__log_every=every, data__valid="")
    sections["log"].update(tensorboard=False)
    code, _, err = run_cli(capsys, "train", write_config(tmp_path / "nan.toml", sections))
    assert code == 2
    line = one_line(err)
    out = tmp_path / "nan"
    assert not (out / "model").exists() and not (out / "model-hf").exists()
    if every == 3:
        assert line.startswith("speechseq: error: loss is nan at step 2: training stopped; no checkpoint was saved "
                               "before it"), line
        assert not os.listdir(out / "checkpoints") and not (out / "metrics.jsonl").read_text()
        return
    assert line.startswith("speechseq: error: loss is nan at step 2: training stopped; the last good checkpoint is "
                           "step 1 in "), line
    assert sorted(os.listdir(out / "checkpoints")) == ["1"]
    state, meta = final_state(out, tiny_init)
    assert int(state.step) == 1 and meta["data"]["batch"] == 1
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_ctrl_c_saves_nothing_partial_and_exits_with_one_line(tiny_init, corpus, tmp_path):
    # more steps than the run can finish before the signal, however fast the steps are
    cfg = write_config(tmp_path / "int.toml", run_sections(tiny_init, corpus, tmp_path / "int", train__steps=100_000,
                                                           data__valid=""))
    p = start(cfg)
    wait_for(p, lambda: complete_checkpoints(tmp_path / "int"), "a checkpoint")
    p.send_signal(signal.SIGINT)
    try:
        _, err = p.communicate(timeout=600)  # a slow exit on a loaded machine
    except subprocess.TimeoutExpired:
        p.kill()
        raise AssertionError(f"Ctrl-C was lost: the run went on ({p.communicate()[1][-2000:]})") from None
    assert p.returncode == 130, err[-2000:]
    assert one_line(err) == "speechseq: interrupted"
    assert not (tmp_path / "int" / "model").exists()  # stopped, not run to the end
    folder = tmp_path / "int" / "checkpoints"
    steps = sorted(int(n) for n in os.listdir(folder))  # only whole checkpoints: no orbax temporary folder
    assert steps and all(s % 2 == 0 for s in steps)
    from speechseq.training.checkpoint import Checkpoints

    ckpt = Checkpoints(folder)
    assert ckpt.steps() == steps
    ckpt.close()
    assert not (tmp_path / "int" / "model").exists()


def test_two_runs_never_share_an_output_dir(tiny_init, corpus, tmp_path, capsys):
    """A run holds a lock on its output_dir: a second run into it (new or --resume) stops with one line naming the
    holder, before writing anything; once the holder ends (the lock goes with its process), the folder is free."""
    import fcntl

    from speechseq.training.loop import LOCK_FILE

    out = tmp_path / "busy"
    cfg = write_config(tmp_path / "busy.toml", run_sections(tiny_init, corpus, out, data__valid=""))
    out.mkdir()
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"4242\n")
    try:
        for extra in ((), ("--resume",)):
            code, _, err = run_cli(capsys, "train", str(cfg), *extra)
            assert code == 2
            assert one_line(err) == (f"speechseq: error: train.output_dir {out}: another speechseq train (process "
                                     "4242) is using it; wait for it to end or choose another output_dir")
            assert sorted(os.listdir(out)) == [LOCK_FILE]
    finally:
        os.close(fd)
    code, _, err = run_cli(capsys, "train", str(cfg), "--set", "train.steps=1")
    assert code == 0, err
    assert (out / "model-hf" / "model.safetensors").is_file()


def test_ctc_head_trains_and_stays_out_of_the_model(tiny_init, corpus, tmp_path, blas_seen):
    """``step.ctc_weight``: the checkpointed state carries the CTC head (a resume restores it), the saved model
    and its Hugging Face export do not; the final model is the state's params without the head."""
    from safetensors.numpy import load_file

    from speechseq import SpeechSeq2Seq
    from speechseq.checkpoints.table import flatten
    from speechseq.training import ctc, init_state
    from speechseq.training.checkpoint import Checkpoints

    sections = run_sections(tiny_init, corpus, tmp_path / "run", train__steps=4, train__eval_every=0)
    sections["step"] = {"ctc_weight": 0.5}
    assert main(["-q", "train", str(write_config(tmp_path / "ctc.toml", sections))]) == 0
    assert blas_seen and all(s == {1} for s in blas_seen)  # single_threaded_blas around the training loop
    out = tmp_path / "run"
    model = SpeechSeq2Seq.from_pretrained(tiny_init)
    cfg = load_config(out / "config.toml")
    target = init_state(model.config, {**model.params, **ctc.init_head(model.config, 0)}, cfg.optim, 0)
    ckpt = Checkpoints(out / "checkpoints")
    try:
        state, _ = ckpt.restore(ckpt.latest_step(), target)
    finally:
        ckpt.close()
    assert int(state.step) == 4 and ctc.HEAD in state.params
    assert not np.array_equal(state.params[ctc.HEAD]["kernel"], target.params[ctc.HEAD]["kernel"])  # trained
    assert not any("ctc" in k for k in load_file(out / "model-hf" / "model.safetensors"))
    saved = SpeechSeq2Seq.from_pretrained(out / "model")
    want = flatten(ctc.model_params(state.params))
    got = flatten(saved.params)
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
