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
    with torch.no_grad():  # input_values, or a filterbank extractor's input_features, + attention_mask
        seqs = model.generate(**feats, decoder_start_token_id=0, eos_token_id=2, pad_token_id=1, **gen)
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


def test_transcribe_filterbank_checkpoint(tmp_path, capsys):
    """A Speech2Text (filterbank) encoder: `transcribe` feeds the extractor's input_features to generate and gives
    transformers' text."""
    path = tmp_path / "s2t"
    model = F.wordpiece_checkpoint(path, dec="gpt2", filterbank=True)
    out = tmp_path / "out.jsonl"
    code = main(["-q", "--cache-dir", str(tmp_path / "cache"), "transcribe", "--model", str(path), "--batch-size",
                 "2", "--num-beams", "1", "--max-new-tokens", "8", "--output", str(out), *map(str, FIXTURES)])
    assert code == 0, capsys.readouterr().err
    got = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    want = reference(path, model, FIXTURES, max_new_tokens=8, num_beams=1)
    assert got == want
    assert any(want) and len(set(want)) > 1


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


# -- --output: nothing a user has is lost, every refusal is one line ---------------------------------------------------

def transcribe_cli(tmp_path, *argv, quiet: bool = True) -> int:
    return main([*(["-q"] if quiet else []), "--cache-dir", str(tmp_path / "cache"), "transcribe",
                 "--max-new-tokens", "4", *map(str, argv)])


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("speechseq: error: ") and err.count("\n") == 1, err
    return err


def test_failed_run_keeps_the_earlier_output(checkpoint, tmp_path, capsys):
    """The results go to a temporary file beside --output, renamed over it at the end: a run that fails on its
    second file leaves the earlier results as they were (it once emptied them first) and no temporary file."""
    out = tmp_path / "out.jsonl"
    out.write_text("earlier results\n")
    out.chmod(0o640)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    assert transcribe_cli(tmp_path, "--model", checkpoint[0], "--output", out, FIXTURES[0], bad) == 2
    assert "bad.wav" in one_line_error(capsys)
    assert out.read_text() == "earlier results\n" and leftovers(tmp_path) == []
    assert transcribe_cli(tmp_path, "--model", checkpoint[0], "--output", out, FIXTURES[0]) == 0
    assert json.loads(out.read_text())["file"] == str(FIXTURES[0]) and leftovers(tmp_path) == []
    assert out.stat().st_mode & 0o777 == 0o640  # the replaced file keeps its mode


@pytest.mark.parametrize("output, inputs", [
    ("clips/a.wav", ["clips/a.wav"]),
    ("clips/../clips/a.wav", ["clips/a.wav"]),  # the same file spelt another way
    ("clips/a.wav", ["clips"]),  # found in a folder
    ("clips/a.wav", ["list.txt"]),  # listed in a manifest
    ("list.txt", ["list.txt"]),  # the manifest itself
    ("link.wav", ["clips/a.wav"]),  # a hard link to it
])
def test_output_that_is_an_input_is_refused(checkpoint, tmp_path, capsys, monkeypatch, output, inputs):
    """`--output clip.wav clip.wav` once left clip.wav empty."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clips").mkdir()
    audio = FIXTURES[0].read_bytes()
    (tmp_path / "clips" / "a.wav").write_bytes(audio)
    (tmp_path / "list.txt").write_text("clips/a.wav\n")
    (tmp_path / "link.wav").hardlink_to(tmp_path / "clips" / "a.wav")
    assert transcribe_cli(tmp_path, "--model", checkpoint[0], "--output", output, *inputs) == 2
    err = one_line_error(capsys)
    assert f"--output {output}: is one of the inputs" in err
    assert (tmp_path / "clips" / "a.wav").read_bytes() == audio
    assert (tmp_path / "list.txt").read_text() == "clips/a.wav\n"


@pytest.mark.parametrize("output, words", [("missing/out.jsonl", ["missing/out.jsonl", "does not exist"]),
                                           (".", ["--output .: is a folder"])])
def test_output_into_a_missing_folder_or_onto_a_folder(checkpoint, tmp_path, capsys, monkeypatch, output, words):
    monkeypatch.chdir(tmp_path)
    assert transcribe_cli(tmp_path, "--model", checkpoint[0], "--output", output, FIXTURES[0]) == 2
    err = one_line_error(capsys)
    assert all(w in err for w in words), err
    assert not (tmp_path / "missing").exists()


def test_output_into_a_read_only_folder(checkpoint, tmp_path, capsys, monkeypatch):
    import errno
    import os

    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: refuse as the kernel would for anyone else
        real_open = os.open

        def refuse(path, flags, *args, **kwargs):
            if flags & os.O_CREAT and str(path).startswith(str(folder)):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            return real_open(path, flags, *args, **kwargs)
        monkeypatch.setattr(os, "open", refuse)
    try:
        assert transcribe_cli(tmp_path, "--model", checkpoint[0], "--output", folder / "out.jsonl", FIXTURES[0]) == 2
        err = one_line_error(capsys)
        assert f"--output {folder / 'out.jsonl'}: cannot write (Permission denied)" in err, err
    finally:
        folder.chmod(0o755)
    assert list(folder.iterdir()) == []


def test_output_onto_a_read_only_file(checkpoint, tmp_path, capsys, monkeypatch):
    """A rename would replace a read-only file regardless of its mode: refused before any work, the file kept."""
    import os

    out = tmp_path / "out.jsonl"
    out.write_text("earlier results\n")
    out.chmod(0o444)
    if os.geteuid() == 0:  # root may write anything: answer as the kernel would for anyone else
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: False if Path(path) == out and mode & os.W_OK
                            else real_access(path, mode, *a, **k))
    assert transcribe_cli(tmp_path, "--model", checkpoint[0], "--output", out, FIXTURES[0]) == 2
    assert f"--output {out}: cannot write (the file is read-only)" in one_line_error(capsys)
    assert out.read_text() == "earlier results\n" and out.stat().st_mode & 0o777 == 0o444
    assert leftovers(tmp_path) == []


def test_output_on_a_full_disk(checkpoint, tmp_path, capsys, monkeypatch):
    """A write that fails for want of space (simulated: the file's write raises ENOSPC) leaves the earlier file and
    no temporary one; a device that is always full (/dev/full) is written directly and fails the same way."""
    import errno
    import os

    from speechseq.checkpoints import storage

    out = tmp_path / "out.jsonl"
    out.write_text("earlier results\n")

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    # --output's file is opened by storage.atomic_file
    monkeypatch.setattr(storage, "open", lambda *a, **k: Full(open(*a, **k)), raising=False)
    assert transcribe_cli(tmp_path, "--model", checkpoint[0], "--output", out, FIXTURES[0]) == 2
    assert f"--output {out}: cannot write (No space left on device)" in one_line_error(capsys)
    assert out.read_text() == "earlier results\n" and leftovers(tmp_path) == []
    monkeypatch.undo()
    if Path("/dev/full").exists():
        assert transcribe_cli(tmp_path, "--model", checkpoint[0], "--output", "/dev/full", FIXTURES[0]) == 2
        assert "--output /dev/full: cannot write (No space left on device)" in one_line_error(capsys)
        assert Path("/dev/full").is_char_device()


def test_bad_sampling_rate_one_line(checkpoint, tmp_path, capsys):
    path = tmp_path / "model"
    path.mkdir()
    for f in checkpoint[0].iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    pre = json.loads((path / "preprocessor_config.json").read_text())
    for value in ("16k", 0):
        (path / "preprocessor_config.json").write_text(json.dumps({**pre, "sampling_rate": value}))
        assert transcribe_cli(tmp_path, "--model", path, FIXTURES[0]) == 2
        err = one_line_error(capsys)
        assert "preprocessor_config.json: field 'sampling_rate'" in err and repr(value) in err, err


def test_too_many_beams_one_line(checkpoint, tmp_path, capsys):
    """The decode's memory (rows = batch x beams) is estimated before anything is compiled or any audio read."""
    assert transcribe_cli(tmp_path, "--model", checkpoint[0], "--num-beams", "100000", FIXTURES[0]) == 2
    err = one_line_error(capsys)
    assert "num_beams: decoding 8 utterance(s) x 100000 beams" in err and "GiB" in err, err


def test_error_is_whole_after_the_progress_bar(checkpoint, tmp_path, capsys, monkeypatch):
    """The bar (leave=False) clears its line when it closes; it closes before the error is printed, so nothing
    comes after the one-line error on the terminal (once the bar closed later and erased the line)."""
    from speechseq import SpeechSeq2Seq
    from speechseq.errors import InputError

    def fail(*args, **kwargs):
        raise InputError("input_values: refused for this test")

    monkeypatch.setattr(SpeechSeq2Seq, "generate", fail)
    assert transcribe_cli(tmp_path, "--model", checkpoint[0], *FIXTURES, quiet=False) == 2
    err = capsys.readouterr().err
    assert "transcribe" in err  # the bar was drawn
    *_, last, after = err.split("\n")
    assert after == "" and last.split("\r")[-1] == "speechseq: error: input_values: refused for this test", repr(err)


def long_clip(path, seconds_of_silence=0.4):
    """The fixture clips one after another with short pauses: a recording several windows long."""
    import soundfile as sf

    gap = np.zeros(int(seconds_of_silence * 16000), np.float32)
    parts = [p for f in FIXTURES for p in (load_audio(f), gap)]
    audio = np.concatenate(parts * 2)
    sf.write(path, audio, 16000, subtype="FLOAT")
    return audio


def test_long_file_in_windows_matches_transformers_window_by_window(checkpoint, tmp_path):
    """A file longer than the window: each window decoded as transformers decodes that piece of audio, and the
    windows' tokens (special tokens removed) stitched by chunking.stitch."""
    import transformers as T

    from speechseq.chunking import stitch, windows
    from speechseq.transcribe import transcribe

    path, model = checkpoint
    clip = tmp_path / "long.wav"
    audio = long_clip(clip)
    chunk, stride = 32000, 4000  # 2 s windows, 0.25 s on each side
    spans = windows(len(audio), chunk, stride, stride)
    assert len(spans) >= 5
    fe, tok = T.AutoFeatureExtractor.from_pretrained(path), T.AutoTokenizer.from_pretrained(path)
    feats = fe([audio[s:e] for s, e in spans], sampling_rate=16000, padding=True, return_tensors="pt")
    with torch.no_grad():
        seqs = model.generate(input_values=feats["input_values"], attention_mask=feats["attention_mask"],
                              max_new_tokens=6)
    special = set(tok.all_special_ids)
    want = tok.decode(stitch([[t for t in s.tolist() if t not in special] for s in seqs]), skip_special_tokens=True)
    [row] = transcribe(path, [clip], batch_size=4, progress=False, chunk_length_s=2, stride_length_s=0.25,
                       chunking="windows", max_new_tokens=6)
    assert row["text"] == want.strip() and len(row["text"].split()) > 6
    assert row["audio_seconds"] == round(len(audio) / 16000, 3)


@pytest.mark.parametrize("chunk_s", [1.9, 3.0])
def test_long_file_cut_at_pauses_matches_transformers_piece_by_piece(checkpoint, tmp_path, chunk_s):
    """chunking="pauses": the file cut where chunking.pauses says, each piece decoded as transformers decodes that piece
    of audio (chunking.trim: at most 0.25 s of pause at either end) followed by 0.2 s of silence, the pieces' texts
    joined by spaces; 3 s pieces are cut in the silences between the clips (their own 0.35 s: shorter than the pauses
    chunking.pauses cuts at wherever they are); pieces that are all pause are not decoded. A piece of 2 s or more that
    runs to the length limit without EOS (this random model always does, in 6 tokens) is halved at a pause
    (chunking.halve, then trim) and the halves decoded in its place, again while they run on: 3 s pieces are halved,
    1.9 s ones are not."""
    import transformers as T

    from speechseq.chunking import halve, pauses, trim
    from speechseq.transcribe import transcribe

    path, model = checkpoint
    clip = tmp_path / "long.wav"
    audio = long_clip(clip, seconds_of_silence=0)
    cuts = pauses(audio, int(chunk_s * 16000), 16000)
    assert len(cuts) >= 4
    if chunk_s > 2:  # (a 1.9 s piece cannot hold the 1.94 s clip)
        assert all(audio[end - 400:end + 400].max() == 0 for _, end in cuts[:-1])
    fe, tok = T.AutoFeatureExtractor.from_pretrained(path), T.AutoTokenizer.from_pretrained(path)
    tail = np.zeros(3200, np.float32)

    def decode(spans):
        feats = fe([np.concatenate([audio[s:e], tail]) for s, e in spans], sampling_rate=16000, padding=True,
                   return_tensors="pt")
        with torch.no_grad():
            return list(model.generate(input_values=feats["input_values"], attention_mask=feats["attention_mask"],
                                       max_new_tokens=6))

    def speech(cuts):  # trimmed, without the pieces that are all pause
        return [(a, b) for a, b in (trim(audio, start, end, 16000) for start, end in cuts) if b > a]

    spans = speech(cuts)
    seqs, halved = decode(spans), 0
    while True:
        again = [k for k, (s, e) in enumerate(spans)
                 if e - s >= 32000 and model.config.eos_token_id not in seqs[k][1:].tolist()]
        if not again:
            break
        for k in reversed(again):
            halves = speech(halve(audio, *spans[k], 16000))
            spans[k:k + 1], seqs[k:k + 1] = halves, decode(halves)
            halved += 1
    assert (halved > 0) == (chunk_s > 2)
    want = " ".join(t for t in (tok.decode(s, skip_special_tokens=True).strip() for s in seqs) if t)
    [row] = transcribe(path, [clip], batch_size=4, progress=False, chunk_length_s=chunk_s, chunking="pauses",
                       max_new_tokens=6)
    assert row["text"] == want and len(row["text"].split()) > 6


def test_long_file_shapes_stay_bounded(checkpoint, tmp_path, monkeypatch):
    """Memory follows the window, not the file: every generate call sees at most batch_size rows of one window's
    length bucket, whatever the file's length; a lone short file is one row (no copies of itself)."""
    from speechseq.speech_seq2seq import SpeechSeq2Seq
    from speechseq.transcribe import transcribe

    shapes = []
    original = SpeechSeq2Seq.generate

    def spy(self, *args, **kwargs):  # transcribe passes the extractor's output by keyword
        shapes.append(np.shape(kwargs.get("input_values", args[0] if args else None)))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SpeechSeq2Seq, "generate", spy)
    path, _ = checkpoint
    clip = tmp_path / "long.wav"
    audio = long_clip(clip)
    for how in ("windows", "pauses"):
        list(transcribe(path, [clip], batch_size=4, progress=False, chunk_length_s=1, chunking=how,
                        max_new_tokens=2, **({"stride_length_s": 0.125} if how == "windows" else {})))
        assert len(audio) > 10 * 16000 and len(shapes) > 3
        # 1 s windows: the 1 s bucket; pieces of at most 1 s and 0.2 s of silence: the next bucket
        assert all(rows <= 4 and n <= (16000 if how == "windows" else 2 * 16000) for rows, n in shapes), shapes
        shapes.clear()
    list(transcribe(path, [FIXTURES[0]], batch_size=8, progress=False, max_new_tokens=2))
    assert [rows for rows, _ in shapes] == [1]
    shapes.clear()
    list(transcribe(path, FIXTURES, batch_size=8, progress=False, max_new_tokens=2))
    assert [rows for rows, _ in shapes] == [4]  # three files: the next power of two


@pytest.mark.slow
def test_long_file_memory_stays_flat(checkpoint, tmp_path):
    """Peak memory follows the piece, not the file: `speechseq transcribe` (a child process, its peak RSS read
    from getrusage) on a 2-minute file needs less than 64 MB more than on a 20 s one (the 2-minute audio itself
    takes 8 MB as float32; decoded whole, the file needs hundreds of MB more)."""
    import soundfile as sf

    speech = long_clip(tmp_path / "unit.wav")  # the fixture clips twice, with pauses: about 12 s
    peaks = {}
    for name, seconds in (("short", 20), ("long", 120)):
        clip = tmp_path / f"{name}.wav"
        sf.write(clip, np.resize(speech, seconds * 16000), 16000, subtype="FLOAT")
        code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True); "
                "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        cmd = [sys.executable, "-m", "speechseq.cli", "-q", "--cache-dir", str(tmp_path / "cache"), "transcribe",
               "--model", str(checkpoint[0]), "--chunk-length-s", "5", "--max-new-tokens", "2", str(clip)]
        status, peak = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True,
                                      check=True).stdout.split()
        assert status == "0"
        peaks[name] = int(peak) * 1024
    assert peaks["long"] - peaks["short"] < 64 * 2**20, peaks


@pytest.mark.parametrize("flags, words", [
    (["--chunk-length-s", "2", "--stride-length-s", "1", "--chunking", "windows"],
     "stride_length_s: 1 s on each side of a 2 s window leaves"),
    (["--stride-length-s", "1"], "stride_length_s: only windows overlap; pass chunking='windows'"),
    (["--chunk-length-s", "-1"], "chunk_length_s > 0"),
    (["--chunk-length-s", "0.5", "--chunking", "pauses"], "chunk_length_s: pieces cut at pauses need at least 1 s")])
def test_bad_window_settings_one_line(checkpoint, tmp_path, capsys, flags, words):
    code = main(["-q", "transcribe", "--model", str(checkpoint[0]), *flags, str(FIXTURES[0])])
    err = capsys.readouterr().err
    assert code == 2 and words in err and err.count("\n") == 1


@pytest.mark.parametrize("noise", [0.0, 1e-3])
def test_silent_stretch_of_a_long_file_is_skipped(tmp_path, monkeypatch, noise):
    """A long recording with 12 s without speech in it (digital silence, or steady noise at -60 dB over the whole
    clip), cut at pauses into pieces of at most 5 s with the shipped Speech2Text recogniser: the pieces that hold no
    speech are not decoded (before, digital silence failed the file, "input_features: contains NaN", and a noise-only
    piece makes a model invent words), the two utterances are, each in its own piece without the seconds of pause
    beside it (chunking.trim: with them this model, which never heard such pauses, read "hello hello")."""
    import soundfile as sf

    from speechseq.metrics import cer
    from speechseq.speech_seq2seq import SpeechSeq2Seq
    from speechseq.transcribe import transcribe

    rows = []
    original = SpeechSeq2Seq.generate

    def spy(self, *args, **kwargs):
        rows.append(len(kwargs["input_features"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SpeechSeq2Seq, "generate", spy)
    model = Path(__file__).resolve().parents[1] / "models" / "synth-en"
    speech = load_audio(Path(__file__).parent / "fixtures" / "hello_world.wav")
    audio = np.concatenate([speech, np.zeros(12 * 16000, np.float32), speech])
    audio += noise * np.random.default_rng(0).standard_normal(len(audio)).astype(np.float32)
    clip = tmp_path / "gap.wav"
    sf.write(clip, audio, 16000, subtype="FLOAT")
    [row] = transcribe(model, [clip], progress=False, chunk_length_s=5, chunking="pauses")
    assert rows == [2]  # the two utterances, one batch
    # what the model reads in a piece that ends 0.45 s after the speech (0.25 s kept, 0.2 s added; its training
    # utterances end 0.35 s after it, and it reads the fixture alone right): "hello world hello world" give or take a
    # letter or two
    assert cer(["hello world hello world"], [row["text"]]) <= 0.2, row["text"]
