"""End to end: speech files (espeak-ng fixtures) through `speechseq transcribe` give exactly the text that
transformers' feature extractor + model.generate + tokenizer.batch_decode give."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import hf_factory as F
from speechseq.audio import load_audio
from speechseq.cli import main

FIXTURES = sorted((Path(__file__).parent / "fixtures").glob("*.wav"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    model = F.wordpiece_checkpoint(path)
    return path, model


def reference(path: Path, model, files, **gen) -> list[str]:
    import transformers as T

    fe = T.AutoFeatureExtractor.from_pretrained(path)
    tok = T.AutoTokenizer.from_pretrained(path)
    audios = [load_audio(f) for f in files]
    feats = fe(audios, sampling_rate=16000, padding=True, return_tensors="pt")
    with torch.no_grad():
        seqs = model.generate(input_values=feats["input_values"], attention_mask=feats["attention_mask"],
                              decoder_start_token_id=0, eos_token_id=2, pad_token_id=1, **gen)
    return [t.strip() for t in tok.batch_decode(seqs, skip_special_tokens=True)]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_transcribe_matches_transformers(checkpoint, tmp_path, capsys, num_beams):
    path, model = checkpoint
    assert len(FIXTURES) >= 3
    out = tmp_path / "out.jsonl"
    code = main(["-q", "--cache-dir", str(tmp_path / "cache"), "transcribe", "--model", str(path),
                 "--batch-size", "2", "--num-beams", str(num_beams), "--max-new-tokens", "8", "--output", str(out),
                 *map(str, FIXTURES)])
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["file"] for r in rows] == [str(f) for f in FIXTURES]
    want = reference(path, model, FIXTURES, max_new_tokens=8, num_beams=num_beams)
    assert [r["text"] for r in rows] == want
    assert any(want) and len(set(want)) > 1  # real text that depends on the audio
    assert all(r["seconds"] > 0 and r["audio_seconds"] > 1 for r in rows)


def test_transcribe_stdout_folder_and_manifest(checkpoint, tmp_path, capsys):
    path, model = checkpoint
    manifest = tmp_path / "list.jsonl"
    manifest.write_text("".join(json.dumps({"audio": str(f)}) + "\n" for f in FIXTURES[:2]))
    code = main(["-q", "--cache-dir", str(tmp_path / "cache"), "transcribe", "--model", str(path),
                 "--max-new-tokens", "8", str(manifest), str(FIXTURES[0].parent)])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(out) == 2 + len(FIXTURES)
    want = reference(path, model, FIXTURES[:2], max_new_tokens=8)
    assert [line.split("\t")[1] for line in out[:2]] == want


@pytest.mark.parametrize("content, needle", [(b"", "no audio samples"), (b"not audio at all", "cannot read")])
def test_transcribe_bad_audio(checkpoint, tmp_path, capsys, content, needle):
    bad = tmp_path / "bad.wav"
    if content:
        bad.write_bytes(content)
    else:
        import soundfile as sf

        sf.write(bad, np.zeros(0, np.float32), 16000)
    code = main(["-q", "transcribe", "--model", str(checkpoint[0]), str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("\n") == 1 and "bad.wav" in err


def test_transcribe_nan_audio(checkpoint, tmp_path, capsys):
    import soundfile as sf

    bad = tmp_path / "nan.wav"
    x = np.zeros(16000, np.float32)
    x[100] = np.nan
    sf.write(bad, x, 16000, subtype="FLOAT")
    code = main(["-q", "transcribe", "--model", str(checkpoint[0]), str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and "NaN" in err


def test_second_run_uses_persistent_compilation_cache(checkpoint, tmp_path):
    cache = tmp_path / "jaxcache"
    cmd = [sys.executable, "-m", "speechseq.cli", "-q", "--cache-dir", str(cache), "transcribe", "--model",
           str(checkpoint[0]), "--max-new-tokens", "4", str(FIXTURES[0])]
    first = subprocess.run(cmd, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    entries = sorted(p.name for p in cache.iterdir())
    assert entries, "the first run left nothing in the compilation cache"
    second = subprocess.run(cmd, capture_output=True, text=True)
    assert second.returncode == 0 and second.stdout == first.stdout
    assert sorted(p.name for p in cache.iterdir()) == entries  # nothing new compiled


def test_transcribe_uses_the_checkpoints_generation_settings(checkpoint, tmp_path, capsys):
    """No generation flags: max length, beams and tokens come from the checkpoint's generation_config.json, as in
    transformers' processor + generate() + batch_decode(skip_special_tokens=True); flags override them. (The
    decoder has 40 positions, so a fixed default of 64 new tokens could not run at all.)"""
    import transformers as T

    src, _ = checkpoint
    path = tmp_path / "model"
    path.mkdir()
    for f in src.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    T.GenerationConfig(max_length=24, num_beams=2, decoder_start_token_id=0, eos_token_id=2,
                       pad_token_id=1).save_pretrained(path)
    model = T.SpeechEncoderDecoderModel.from_pretrained(path).eval()
    fe, tok = T.AutoFeatureExtractor.from_pretrained(path), T.AutoTokenizer.from_pretrained(path)
    feats = fe([load_audio(f) for f in FIXTURES], sampling_rate=16000, padding=True, return_tensors="pt")

    def theirs(**gen):
        with torch.no_grad():
            seqs = model.generate(input_values=feats["input_values"], attention_mask=feats["attention_mask"], **gen)
        return seqs, [t.strip() for t in tok.batch_decode(seqs, skip_special_tokens=True)]

    for flags, gen in [([], {}), (["--max-new-tokens", "5", "--num-beams", "1"], {"max_new_tokens": 5,
                                                                                 "num_beams": 1})]:
        code = main(["-q", "--cache-dir", str(tmp_path / "cache"), "transcribe", "--model", str(path),
                     "--batch-size", "3", *flags, *map(str, FIXTURES)])
        out = capsys.readouterr()
        assert code == 0, out.err
        seqs, want = theirs(**gen)
        assert [line.split("\t")[1] for line in out.out.strip().splitlines()] == want
        assert any(want) and len(set(want)) > 1
        if not flags:  # the file's max_length 24 reached: longer than the flags' 6 and than 20 new tokens
            assert seqs.shape[1] == 24, seqs.shape
