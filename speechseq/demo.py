"""The demo: a speech recogniser trained with speechseq's own trainer turns speech into text.

    python -m speechseq.demo                           # or: make demo
    python -m speechseq.demo --audio my.wav other.flac # your own clips (the model knows espeak-ng's English only)

It loads the model shipped in ``models/synth-en`` (a Speech2Text filterbank encoder and an mBART decoder trained
from scratch on 81 hours of espeak-ng speech; its README says how, on what, and how well), transcribes the three
clips in ``tests/fixtures`` and the held-out test sentences in ``models/synth-en/samples`` (sentences and, for some,
a voice the model never heard in training), prints each reference beside the model's text with the word error rate,
and shows how to use the model from Python and the command line. It needs the source checkout (for ``models/`` and
``tests/fixtures/``) unless ``--model`` and ``--audio`` are given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models" / "synth-en"
FIXTURES = REPO / "tests" / "fixtures"
# the fixture clips and what they say (tests/fixtures/README.md)
FIXTURE_TEXT = {"hello_world.wav": "hello world", "quick_brown_fox.wav": "the quick brown fox",
                "speech_to_text.wav": "speech to text in jax"}


class DemoError(Exception):
    """Bad input to the demo: printed as one line, exit status 2."""


def display(path: Path) -> str:
    """``path`` relative to the working directory when it is inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m speechseq.demo",
        description="Transcribe speech with the recogniser shipped in models/synth-en (trained by speechseq on "
                    "espeak-ng speech): the fixture clips and held-out test sentences, with the word error rate.")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help="checkpoint folder, speechseq or Hugging Face layout (default: %(default)s)")
    parser.add_argument("--audio", type=Path, nargs="+", metavar="FILE",
                        help="audio files to transcribe instead (any format soundfile reads, any sampling rate)")
    parser.add_argument("--batch-size", type=int, default=8, help="clips decoded at once (default: %(default)s)")
    return parser.parse_args(argv)


def clips(args: argparse.Namespace) -> list[tuple[Path, str | None, str]]:
    """(audio file, reference text or None, what it is) for every clip to transcribe."""
    if args.audio:
        return [(p, None, "yours") for p in args.audio]
    out: list[tuple[Path, str | None, str]] = [(FIXTURES / name, text, "fixture")
                                               for name, text in FIXTURE_TEXT.items()]
    manifest = args.model / "samples" / "samples.jsonl"
    if manifest.is_file():
        for line in manifest.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            out.append((manifest.parent / row["audio"], row["text"], row["set"]))
    return out


def run(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    if not (args.model / "config.json").is_file():
        hint = " (run from a source checkout of speechseq, or pass --model)" if args.model == DEFAULT_MODEL else ""
        raise DemoError(f"{display(args.model)}: no config.json: not a checkpoint folder{hint}")
    if args.batch_size < 1:
        raise DemoError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    todo = clips(args)
    for path, _, _ in todo:
        if not path.is_file():
            raise DemoError(f"{display(path)}: audio file not found")

    import jax

    from speechseq import SpeechSeq2Seq
    from speechseq.checkpoints.convert import describe_config
    from speechseq.metrics import wer
    from speechseq.processor import Processor
    from speechseq.transcribe import transcribe

    print("speechseq demo: a speech recogniser trained with speechseq, from audio to text")
    print(f"JAX {jax.__version__} on {jax.devices()[0].platform.upper()}")
    t = time.perf_counter()
    model = SpeechSeq2Seq.from_pretrained(args.model)
    processor = Processor.from_pretrained(args.model)
    params = sum(int(x.size) for x in jax.tree_util.tree_leaves(model.params))
    print(f"\n[1/3] model       {display(args.model)}: {params / 1e6:.1f} M parameters, loaded in "
          f"{time.perf_counter() - t:.1f} s")
    for key, value in describe_config(model.config).items():
        print(f"                  {key}: {value}")

    t = time.perf_counter()
    results = list(transcribe(model, [p for p, _, _ in todo], processor=processor, batch_size=args.batch_size,
                              progress=False))
    took = time.perf_counter() - t
    audio_s = sum(r["audio_seconds"] for r in results)
    beams = model.generation_config().num_beams  # the checkpoint's decoding, which transcribe used
    decoding = "greedy" if beams == 1 else f"beam search ({beams} beams)"
    print(f"\n[2/3] transcribe  {len(todo)} clips, {audio_s:.1f} s of audio, {decoding}, in {took:.1f} s (the first "
          "batches of each shape compile)")
    width = max(len(p.name) for p, _, _ in todo)
    for (path, ref, kind), result in zip(todo, results):
        hyp = result["text"]
        print(f"  {path.name:<{width}}  {kind}")
        if ref is None:
            print(f"      model: {hyp}")
            continue
        mark = "ok" if hyp == ref else f"{100 * wer([ref], [hyp]):.0f}% WER"
        print(f"      said : {ref}\n      model: {hyp}   [{mark}]")
    groups: dict[str, list[tuple[str, str]]] = {}
    for (_, ref, kind), result in zip(todo, results):
        if ref is not None:
            groups.setdefault(kind, []).append((ref, result["text"]))
    for kind, pairs in groups.items():
        refs, hyps = zip(*pairs)
        exact = sum(r == h for r, h in pairs)
        print(f"  {kind:<12} WER {100 * wer(list(refs), list(hyps)):5.1f}%  ({exact} of {len(pairs)} exactly right)")
    if not args.audio and args.model == DEFAULT_MODEL:
        print('  (the model learnt to write the words of its training text; "brown" and "jax" are not among them: '
              "it spells a word it never saw as it sounds)")

    model_arg = display(args.model)
    print(f"\n[3/3] use it      the model is in {model_arg} (README.md there: data, training, test-set WER)")
    print(f"  command line:   speechseq transcribe --model {model_arg} clip.wav")
    print(f"                  speechseq evaluate --model {model_arg} manifest.jsonl")
    print("  Python:         from speechseq.transcribe import transcribe")
    print(f"                  for r in transcribe('{model_arg}', ['clip.wav']): print(r['text'])")
    if model.config.encoder.model_type == "speech_to_text":  # AutoModel would build the whole Speech2TextModel
        print("  transformers:   SpeechEncoderDecoderModel(encoder=Speech2TextEncoder(...), decoder=...) + the "
              "safetensors file: load_transformers in examples/synth/check_transformers.py")
    else:
        print(f"  transformers:   SpeechEncoderDecoderModel.from_pretrained('{model_arg}')")
    print(f"\ndone in {time.perf_counter() - start:.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from speechseq.errors import SpeechSeqError
    except ImportError as e:  # pragma: no cover - a broken install
        print(f"error: cannot import speechseq ({e})", file=sys.stderr)
        return 2
    try:
        run(args)
    except (DemoError, SpeechSeqError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
