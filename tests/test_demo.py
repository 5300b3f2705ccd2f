"""The demo (``python -m speechseq.demo``, ``make demo``): it runs end to end on the committed fixtures, writes a
Hugging Face checkpoint that transformers loads with the same logits, and rejects bad arguments in one line."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from speechseq import SpeechSeq2Seq
from speechseq.audio import FeatureExtractor, load_audio
from speechseq.demo import DEFAULT_AUDIO, FIXTURES, main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.json"))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """Run the demo once with its defaults into a temporary folder: (exit status, stdout, checkpoint dir)."""
    out = tmp_path_factory.mktemp("demo") / "model"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        status = main(["--out", str(out)])
    return status, buf.getvalue(), out


def test_demo_prints_every_step(demo_run):
    status, text, out = demo_run
    assert status == 0, text
    for step in ("[1/6] config", "[2/6] init", "[3/6] save", "[4/6] load", "[5/6] audio", "[6/6] forward"):
        assert step in text
    assert "RANDOM (untrained)" in text and "later release" in text
    assert "encoder: wav2vec2: " in text and "decoder: bert: " in text
    assert "parameters" in text
    assert "config.json" in text and "model.safetensors" in text
    assert "weights identical to the saved model: yes" in text
    assert "first call" in text and "second call" in text
    for name in DEFAULT_AUDIO:
        assert name in text
    assert "input_values [3, 31079]" in text
    assert "logits [3, 4, 1000]" in text
    assert "greedy argmax tokens" in text


def test_demo_writes_hf_checkpoint(demo_run):
    status, _, out = demo_run
    assert status == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "speech-encoder-decoder"
    assert cfg["encoder"]["model_type"] == "wav2vec2" and cfg["decoder"]["model_type"] == "bert"


def test_demo_checkpoint_matches_transformers(demo_run):
    """What the demo saved loads in transformers and gives our logits on the fixture batch."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    _, _, out = demo_run
    batch = FeatureExtractor(return_attention_mask=True)([load_audio(FIXTURES / a) for a in DEFAULT_AUDIO])
    values, mask = batch["input_values"], batch["attention_mask"]
    ids = np.array([[101, 7, 8, 9]] * len(DEFAULT_AUDIO))
    ours = np.asarray(SpeechSeq2Seq.from_pretrained(out)(values, mask, decoder_input_ids=ids).logits)
    ref_model = transformers.SpeechEncoderDecoderModel.from_pretrained(out).eval()
    with torch.no_grad():
        ref = ref_model(input_values=torch.tensor(values), attention_mask=torch.tensor(mask),
                        decoder_input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_fixtures_are_small_16k_mono_pcm():
    for name in DEFAULT_AUDIO:
        path = FIXTURES / name
        assert path.stat().st_size < 100_000
        with wave.open(str(path)) as f:
            assert (f.getframerate(), f.getnchannels(), f.getsampwidth()) == (16000, 1, 2)
        samples = load_audio(path)
        assert samples.dtype == np.float32 and 0.5 < len(samples) / 16000 < 3 and np.abs(samples).max() <= 1


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_configs_load_in_both_libraries(config):
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


def _bad_json(tmp_path: Path) -> Path:
    path = tmp_path / "bert.json"
    path.write_text('{"model_type": "bert"}')
    return path


@pytest.mark.parametrize("args, message", [
    (lambda t: ["--audio", str(t / "missing.wav")], "missing.wav: audio file not found"),
    (lambda t: ["--config", str(t / "missing.json")], "missing.json: file not found"),
    (lambda t: ["--config", str(t)], ": cannot read (Is a directory)"),
    (lambda t: ["--audio", str(REPO / "pyproject.toml")], "pyproject.toml: cannot read as audio"),
    (lambda t: ["--audio", str(_empty_wav(t))], "empty.wav: contains no audio samples"),
    (lambda t: ["--config", str(_bad_json(t))], "is not a speech encoder-decoder"),
    (lambda t: ["--out", str(REPO / "pyproject.toml")], "exists and is not a directory (--out)"),
], ids=["missing-audio", "missing-config", "config-is-folder", "not-audio", "empty-audio", "wrong-model-type",
        "out-is-file"])
def test_demo_bad_arguments(tmp_path, capsys, args, message):
    argv = args(tmp_path)
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "model")]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: "), captured.err
    assert message in captured.err
    assert not (tmp_path / "model").exists()


def test_demo_module_missing_file_exit_status(tmp_path):
    """``python -m speechseq.demo`` itself: one line on stderr, status 2, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "speechseq.demo", "--audio", str(tmp_path / "nope.wav")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'nope.wav'}: audio file not found"
    assert proc.stdout == ""
