"""The demo (``python -m speechseq.demo``, ``make demo``): the shipped recogniser transcribes the fixture clips
correctly, scores the held-out samples, shows how to use the model, and rejects bad arguments in one line."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from speechseq.audio import load_audio
from speechseq.demo import DEFAULT_MODEL, FIXTURE_TEXT, FIXTURES, main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.json"))


@pytest.fixture(scope="module")
def demo_run():
    """The demo with its defaults: (exit status, stdout)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        status = main([])
    return status, buf.getvalue()


def test_demo_transcribes_the_fixture_clips(demo_run):
    """Each fixture with what it says and what the model heard; "hello world" comes out right (the model has never
    seen "brown" or "jax" written, and spells them as they sound: the note under the WER says so)."""
    status, text = demo_run
    assert status == 0, text
    for name, said in FIXTURE_TEXT.items():
        assert re.search(rf"{name} +fixture\n +said : {said}\n +model: \S", text), text
    assert re.search(r"said : hello world\n +model: hello world +\[ok\]", text), text


def test_demo_scores_the_held_out_samples(demo_run):
    """Every clip is shown with its reference, and each set's WER is the one of what was printed."""
    from speechseq.metrics import wer

    status, text = demo_run
    rows = [json.loads(line) for line in (DEFAULT_MODEL / "samples" / "samples.jsonl").read_text().splitlines()]
    assert {r["set"] for r in rows} == {"test", "test_voice"}
    assert len(rows) == 16
    rows += [{"set": "fixture", "text": said} for said in FIXTURE_TEXT.values()]
    for kind in ("fixture", "test", "test_voice"):
        refs = [r["text"] for r in rows if r["set"] == kind]
        hyps = [re.search(rf"said : {re.escape(ref)}\n +model: (.*?) +\[", text).group(1) for ref in refs]
        exact = sum(r == h for r, h in zip(refs, hyps))
        assert f"{kind:<12} WER {100 * wer(refs, hyps):5.1f}%  ({exact} of {len(refs)} exactly right)" in text
    for line in ("speechseq transcribe --model models/synth-en clip.wav", "from speechseq.transcribe import",
                 "SpeechEncoderDecoderModel"):
        assert line in text


def test_fixtures_are_small_16k_mono_pcm():
    for name in FIXTURE_TEXT:
        path = FIXTURES / name
        assert path.stat().st_size < 100_000
        with wave.open(str(path)) as f:
            assert (f.getframerate(), f.getnchannels(), f.getsampwidth()) == (16000, 1, 2)
        samples = load_audio(path)
        assert samples.dtype == np.float32 and 0.5 < len(samples) / 16000 < 3 and np.abs(samples).max() <= 1


def test_demo_on_your_own_audio(tmp_path, capsys):
    """--audio: the clips given, at another sampling rate too, shown without references."""
    import soundfile as sf

    path = tmp_path / "mine.flac"
    sf.write(path, load_audio(FIXTURES / "hello_world.wav", 22050), 22050)
    assert main(["--audio", str(path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"mine\.flac +yours\n +model: hello world\n", out), out
    assert "said :" not in out and "exactly right" not in out


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_configs_load_in_both_libraries(config):
    from speechseq import SpeechSeq2Seq

    hf = json.loads(config.read_text())
    ours = SpeechSeq2Seq.from_config(hf).config
    assert ours.decoder_start_token_id is not None and ours.pad_token_id is not None
    transformers = pytest.importorskip("transformers")
    ref = transformers.SpeechEncoderDecoderConfig.from_dict(hf)
    assert ref.encoder.model_type == ours.encoder.model_type and ref.decoder.model_type == ours.decoder.model_type
    assert ref.decoder.add_cross_attention


def _empty_wav(tmp_path: Path) -> Path:
    path = tmp_path / "empty.wav"
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16000)
    return path


@pytest.mark.parametrize("args, message", [
    (lambda t: ["--audio", str(t / "missing.wav")], "missing.wav: audio file not found"),
    (lambda t: ["--model", str(t)], ": no config.json: not a checkpoint folder"),
    (lambda t: ["--audio", str(REPO / "pyproject.toml")], "pyproject.toml: cannot read as audio"),
    (lambda t: ["--audio", str(_empty_wav(t))], "empty.wav: contains no audio samples"),
    (lambda t: ["--batch-size", "0"], "--batch-size: expected a positive integer, got 0"),
], ids=["missing-audio", "not-a-model", "not-audio", "empty-audio", "batch-size"])
def test_demo_bad_arguments(tmp_path, capsys, args, message):
    assert main(args(tmp_path)) == 2
    captured = capsys.readouterr()
    assert "said :" not in captured.out
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: "), captured.err
    assert message in captured.err


def test_demo_module_missing_file_exit_status(tmp_path):
    """``python -m speechseq.demo`` itself: one line on stderr, status 2, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "speechseq.demo", "--audio", str(tmp_path / "nope.wav")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: nope.wav: audio file not found"  # relative to the working directory
    assert proc.stdout == ""
