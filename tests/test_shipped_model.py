"""The recogniser shipped in ``models/synth-en`` (issue 28): complete and small, usable from the command line, its
model card's figures the ones ``examples/synth/ship.py`` measured, and its transcripts the same in transformers
PyTorch as in speechseq."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "synth-en"
FIXTURES = REPO / "tests" / "fixtures"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / "synth" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def samples() -> list[dict]:
    return [json.loads(line) for line in (MODEL / "samples" / "samples.jsonl").read_text().splitlines()]


def test_folder_is_complete_and_small():
    ship = _script("ship")
    for name in (*ship.MODEL_FILES, "README.md", "curves.png", "results.json"):
        assert (MODEL / name).is_file(), name
    total = sum(p.stat().st_size for p in MODEL.rglob("*") if p.is_file())
    assert total <= ship.MAX_MB * 2**20, total
    rows = samples()
    assert all((MODEL / "samples" / r["audio"]).is_file() for r in rows)
    assert {r["set"] for r in rows} == set(ship.TEST_SETS)


def test_model_card_states_the_measured_figures():
    """The card's table carries results.json's WER and CER (percent, two decimals) for both test sets, greedy and
    (when the checkpoint decodes with beam search) with its beams."""
    card = (MODEL / "README.md").read_text()
    results = json.loads((MODEL / "results.json").read_text())
    beam = results.get("beam")
    names = ("test", "test_voice")
    rows = [(f"`{name}`", results[name]) for name in names]
    rows += [(f"`{name}`, {beam['num_beams']} beams", beam[name]) for name in names] if beam else []
    for label, r in rows:
        row = f"| {label} | {r['utterances']} | {100 * r['wer']:.2f}% | {100 * r['cer']:.2f}% |"
        assert row in card, row
    gen = json.loads((MODEL / "generation_config.json").read_text())
    assert (beam or {}).get("num_beams", 1) == gen.get("num_beams", 1)
    assert "curves.png" in card


def test_command_line_transcribes_a_fixture(tmp_path):
    out = tmp_path / "hyps.jsonl"
    subprocess.run([sys.executable, "-m", "speechseq.cli", "-q", "transcribe", "--model", str(MODEL),
                    str(FIXTURES / "hello_world.wav"), "--output", str(out)], check=True, timeout=300)
    assert [json.loads(line)["text"] for line in out.read_text().splitlines()] == ["hello world"]


def test_transformers_gives_the_same_transcripts():
    """transformers PyTorch (SpeechEncoderDecoderModel.generate, one utterance at a time, its own feature extractor
    and tokenizer) and speechseq (batched) transcribe the fixtures and the samples to the same text."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    check = _script("check_transformers")
    files = [FIXTURES / name for name in ("hello_world.wav", "quick_brown_fox.wav", "speech_to_text.wav")]
    files += [MODEL / "samples" / r["audio"] for r in samples()]
    ours = check.speechseq_texts(MODEL, files)
    assert ours == check.transformers_texts(MODEL, files)
    assert sum(bool(re.search(r"\w", t)) for t in ours) == len(files)  # real text, not empty outputs
