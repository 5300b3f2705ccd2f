"""Peak memory, time and WER of `speechseq transcribe` on long recordings: cut at pauses, in windows, and whole.

    python benchmarks/long_audio.py [--minutes 1 4 10 30] [--whole-up-to 4] [--model CKPT] [--workdir DIR]
    python benchmarks/long_audio.py --model models/synth-en --sentences-from data/synth/test.jsonl \
        --chunk-length-s 6 --whole-up-to 0 --minutes 1 4 10

Synthesizes multi-sentence English speech with espeak-ng (sentences from Python's own documentation,
`pydoc_data.topics`, spoken one after another), then runs `speechseq transcribe` on each clip in a fresh process,
cut into overlapping windows whose tokens are stitched (`--chunking windows`; `--chunk-length-s 30`, a 5 s stride
on each side by default), cut at pauses (`--chunking pauses`: pieces of at most `--chunk-length-s`, their texts
joined) and, up to `--whole-up-to` minutes, as one window (`--chunk-length-s 0`: the encoder's self-attention
over the whole clip, quadratic in its length), and prints peak resident memory (ru_maxrss) and wall time beside the
RSS of a process that only loads the model.

`--model` takes a checkpoint that really transcribes (with its tokenizer and preprocessor); with one, the word
error rate of each run against the spoken text is printed too (needs `jiwer`; both sides lower-cased, punctuation
dropped), beside the WER of the same sentences spoken one per clip by the same voice and transcribed as a batch
("sentences": what perfect segmentation would give, so the difference is what windowing and stitching cost).
`--sentences-from MANIFEST` speaks the text column of a manifest (e.g. a held-out set of the data the model was
trained on) instead of Python's documentation; `--chunk-length-s` sets the window for a model trained on short
utterances (a decoder with few positions cannot emit a 30-s window's text); `--gap-s S` joins the manifest's own
recordings S seconds apart instead (digital silence, or with `--gap-noise` noise as loud as each recording's own
pause), and "sentences" decodes those recordings. Without it, a model of the demo's
size (configs/demo-wav2vec2-bert.json) with random weights and a 1000-token word-level tokenizer stands in: its
memory and time are representative, its text is not.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sentences() -> list[str]:
    """Plain English sentences (letters and light punctuation only) from Python's bundled documentation."""
    from pydoc_data.topics import topics

    text = " ".join(topics.values())
    out = [s for s in re.split(r"(?<=[.!?])\s+", text)
           if re.fullmatch(r"[A-Z][A-Za-z ,;'\-]+[.]", s) and 5 <= len(s.split()) <= 30]
    return out


def manifest_sentences(path: Path) -> list[str]:
    from speechseq.data import read_manifest

    return [example.text for example in read_manifest(path)]


def speak(text: str, path: Path, work: Path) -> None:
    """``text`` spoken by espeak-ng (en-us, 160 words a minute) as 16 kHz 16-bit WAV in ``path``."""
    import soundfile as sf

    from speechseq.audio import load_audio

    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng not found: apt-get install espeak-ng (Debian/Ubuntu)")
    (work / "text.txt").write_text(text)
    raw = work / "raw.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "160", "-w", str(raw), "-f", str(work / "text.txt")],
                   check=True)
    sf.write(path, load_audio(raw, 16000), 16000, subtype="PCM_16")


def synthesize(path: Path, minutes: float, work: Path, pool: list[str]) -> list[str]:
    """Write about ``minutes`` of 16 kHz speech to ``path``; returns the sentences spoken."""
    words_needed = int(minutes * 160)  # espeak-ng -s 160: 160 words a minute
    spoken, n = [], 0
    while n < words_needed:
        s = pool[len(spoken) % len(pool)]
        spoken.append(s)
        n += len(s.split())
    # one sentence per line: espeak-ng pauses at the line ends as at a full stop
    speak("\n".join(spoken), path, work)
    return spoken


def random_model(path: Path) -> None:
    """The demo's model size, random weights, a word-level tokenizer and a preprocessor: a checkpoint
    `speechseq transcribe` runs."""
    import tokenizers

    from speechseq import SpeechSeq2Seq
    from speechseq.audio import FeatureExtractor
    from speechseq.checkpoints.storage import write_json

    config = json.loads((ROOT / "configs" / "demo-wav2vec2-bert.json").read_text())
    SpeechSeq2Seq.from_config(config, seed=0).save_pretrained(path)
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]"] + [f"w{i}" for i in range(998)])}
    vocab.update({"[CLS]": 101, "[SEP]": 102})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    write_json(path / "tokenizer_config.json",
               {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"})
    FeatureExtractor(return_attention_mask=True).save_pretrained(path)


def measure(cmd: list[str]) -> tuple[float, float, int, str]:
    """Wall seconds, peak RSS (bytes), exit status and stdout of ``cmd`` run in a fresh child process."""
    code = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
            "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); dt = time.perf_counter() - t; "
            "print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, r.returncode); "
            "print(r.stdout, end='')")
    out = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, check=True).stdout
    head, _, rest = out.partition("\n")
    dt, rss, rc = head.split()
    return float(dt), float(rss), int(rc), rest


def word_error_rate(references: list[str], hypotheses: list[str]) -> str:
    from speechseq.metrics import wer

    return f"{100 * wer(references, hypotheses, normalize=True):.1f}%"


def transcripts(out: str) -> list[str]:
    """The text column of `speechseq transcribe`'s output lines (``file<TAB>text``), in input order."""
    return [line.split("\t", 1)[1] if "\t" in line else "" for line in out.splitlines()]


def recording(path: Path, minutes: float, manifest: Path, gap_s: float, noise: bool) -> list:
    """About ``minutes`` of the manifest's own utterances (its audio as it is: noise, gain, voices) one after another
    in ``path``, ``gap_s`` seconds apart: digital silence, or (``noise``) white noise as loud as each utterance's
    last 0.1 s (its own trailing pause), like a speaker pausing between sentences. Returns the manifest rows used."""
    import numpy as np
    import soundfile as sf

    from speechseq.audio import load_audio
    from speechseq.data import read_manifest

    rows, rng = read_manifest(manifest), np.random.default_rng(0)
    parts, used, samples = [], [], 0
    while samples < minutes * 60 * 16000:
        row = rows[len(used) % len(rows)]
        audio = load_audio(row.audio, 16000)
        gap = rng.standard_normal(int(gap_s * 16000)) * (audio[-1600:].std() if noise else 0.0)
        parts += [audio, gap.astype(np.float32)]
        used.append(row)
        samples += len(audio) + len(gap)
    sf.write(path, np.concatenate(parts), 16000, subtype="FLOAT")
    return used


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, nargs="+", default=[1, 4, 10, 30])
    ap.add_argument("--whole-up-to", type=float, default=4, help="also decode clips up to this long as one window")
    ap.add_argument("--model", help="a checkpoint that transcribes (default: random weights, demo size)")
    ap.add_argument("--sentences-from", type=Path, metavar="MANIFEST",
                    help="speak this manifest's text column (default: sentences of Python's documentation)")
    ap.add_argument("--chunk-length-s", type=float, default=30.0, help="transcribe's window (default 30)")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="per window (random model: it never stops)")
    ap.add_argument("--gap-s", type=float, help="with --sentences-from: join the manifest's own recordings this "
                    "many seconds apart instead of speaking its text in one go (espeak-ng leaves 30-40 ms between "
                    "sentences)")
    ap.add_argument("--gap-noise", action="store_true", help="with --gap-s: fill the gaps with noise as loud as each "
                    "recording's own pause (default: digital silence)")
    ap.add_argument("--workdir", default="/tmp/speechseq-long-audio")
    args = ap.parse_args()
    if args.gap_s is not None and args.sentences_from is None:
        ap.error("--gap-s joins the recordings of a manifest: give --sentences-from")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        model = str(work / "model")
        if not (work / "model" / "tokenizer.json").exists():
            random_model(work / "model")
    pool = manifest_sentences(args.sentences_from) if args.sentences_from else sentences()
    tag = args.sentences_from.stem if args.sentences_from else "pydoc"
    if args.gap_s is not None:
        tag += f"-gap{args.gap_s:g}{'noise' if args.gap_noise else 'zeros'}"
    base = [sys.executable, "-m", "speechseq.cli", "-q", "--cache-dir", str(work / "jax-cache"), "transcribe",
            "--model", model]
    if args.model is None:
        base += ["--max-new-tokens", str(args.max_new_tokens)]
    load_only = [sys.executable, "-c", f"from speechseq import SpeechSeq2Seq; SpeechSeq2Seq.from_pretrained({model!r})"]
    _, rss0, _, _ = measure(load_only)
    print(f"model {model}; a process that only loads it: {rss0 / 2**30:.2f} GiB; sentences: {tag}; "
          f"window {args.chunk_length_s:g} s")
    print(f"{'minutes':>7} {'mode':>9} {'peak RSS':>9} {'seconds':>8} {'x real':>7} {'WER':>6}")
    import soundfile as sf

    for minutes in args.minutes:
        clip = work / f"speech-{tag}-{minutes:g}min.wav"
        text_file = work / f"speech-{tag}-{minutes:g}min.txt"
        files_file = work / f"speech-{tag}-{minutes:g}min.files"
        if not clip.exists() and args.gap_s is not None:
            used = recording(clip, minutes, args.sentences_from, args.gap_s, args.gap_noise)
            files_file.write_text("\n".join(row.audio for row in used))
            text_file.write_text("\n".join(row.text for row in used))
        elif not clip.exists():
            t = time.perf_counter()
            text_file.write_text("\n".join(synthesize(clip, minutes, work, pool)))
            print(f"  (synthesized {clip.name} in {time.perf_counter() - t:.0f} s)", file=sys.stderr)
        spoken = text_file.read_text().splitlines()
        seconds = sf.info(str(clip)).duration
        modes = [(how, ["--chunk-length-s", f"{args.chunk_length_s:g}", "--chunking", how])
                 for how in ("windows", "pauses")]
        modes += [("whole", ["--chunk-length-s", "0"])] if minutes <= args.whole_up_to else []
        for mode, flags in modes:
            dt, rss, rc, out = measure(base + flags + [str(clip)])
            wer = "-"
            if rc == 0 and args.model:
                wer = word_error_rate([" ".join(spoken)], transcripts(out)[:1] or [""])
            status = f"{rss / 2**30:8.2f}G" if rc == 0 else f"{'exit ' + str(rc):>9}"
            print(f"{minutes:7g} {mode:>9} {status} {dt:8.1f} {seconds / dt:7.1f} {wer:>6}", flush=True)
        if args.model:  # the same sentences, one clip each: perfect segmentation
            folder = work / f"sentences-{tag}-{minutes:g}min"
            if args.gap_s is not None:
                files = files_file.read_text().splitlines()
            else:
                if not folder.exists():
                    folder.mkdir()
                    for i, sentence in enumerate(spoken):
                        speak(sentence, folder / f"{i:04d}.wav", work)
                files = [str(folder / f"{i:04d}.wav") for i in range(len(spoken))]
            dt, rss, rc, out = measure(base + ["--chunk-length-s", "0"] + files)
            wer = word_error_rate(spoken, transcripts(out)) if rc == 0 else "-"
            status = f"{rss / 2**30:8.2f}G" if rc == 0 else f"{'exit ' + str(rc):>9}"
            print(f"{minutes:7g} {'sentences':>9} {status} {dt:8.1f} {seconds / dt:7.1f} {wer:>6}", flush=True)


if __name__ == "__main__":
    main()
