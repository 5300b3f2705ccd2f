"""The ``speechseq`` command: transcribe, convert, export, inspect.

Every subcommand prints ``--help``, shows progress on long work on stderr, and on bad input exits with status 2
and one line ``speechseq: error: ...`` (no traceback). Compiled programs are kept in JAX's persistent cache
(``--cache-dir``, default ``$SPEECHSEQ_CACHE_DIR`` or ``~/.cache/speechseq/jax``), so a second run starts warm.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from speechseq.errors import SpeechSeqError

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus")


def _cache_dir(arg: str | None) -> str:
    return arg or os.environ.get("SPEECHSEQ_CACHE_DIR") or str(Path.home() / ".cache" / "speechseq" / "jax")


def enable_compilation_cache(directory: str) -> None:
    import jax

    Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# ---------------------------------------------------------------------------------------------------------------------


def cmd_convert(args: argparse.Namespace) -> int:
    from speechseq.convert import convert

    t0 = time.perf_counter()
    report = convert(args.src, args.dst, dtype=args.dtype, force=args.force, progress=not args.quiet)
    print(f"converted {args.src} -> {args.dst} in {time.perf_counter() - t0:.1f} s"
          + (f" ({len(report.unexpected)} unused source tensors: {', '.join(report.unexpected[:5])})"
             if report.unexpected else ""))
    if args.verify:
        verify(args.src, args.dst)
    return 0


def verify(src: str, dst: str) -> None:
    """Logits of transformers (PyTorch) on the source vs speechseq on the converted checkpoint, on random audio."""
    try:
        import torch
        import transformers
    except ImportError:
        print("verify: skipped (torch and transformers are not installed)")
        return
    import numpy as np

    from speechseq import SpeechSeq2Seq
    from speechseq.hub import resolve

    ours = SpeechSeq2Seq.from_pretrained(dst)
    ref = transformers.SpeechEncoderDecoderModel.from_pretrained(str(resolve(src))).eval()
    rng = np.random.default_rng(0)
    audio = rng.normal(0, 1, (2, 16000)).astype(np.float32)
    ids = rng.integers(0, ours.config.decoder.vocab_size, (2, 8))
    with torch.no_grad():
        want = ref(input_values=torch.tensor(audio), decoder_input_ids=torch.tensor(ids)).logits.float().numpy()
    got = np.asarray(ours(audio, decoder_input_ids=ids).logits)
    print(f"verify: max |logits - transformers| = {np.abs(got - want).max():.3g} on random audio")


def cmd_export(args: argparse.Namespace) -> int:
    from speechseq.convert import export

    t0 = time.perf_counter()
    export(args.src, args.dst, force=args.force, progress=not args.quiet)
    print(f"exported {args.src} -> {args.dst} (Hugging Face layout) in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from speechseq.convert import describe

    info = describe(args.src)
    tok = _tokenizer_summary(Path(info["path"]))
    if tok:
        info["tokenizer"] = tok
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key in ("fresh_weights", "unused_weights"):
            value = f"{len(value)}" + (f": {', '.join(value[:6])}{' ...' if len(value) > 6 else ''}" if value else "")
        elif key == "parameters":
            value = f"{value:,} ({value / 1e6:.1f} M)"
        print(f"{key:>16}: {value}")
    return 0


def _tokenizer_summary(path: Path) -> str | None:
    try:
        from speechseq.text import Tokenizer

        tok = Tokenizer.from_pretrained(path)
    except (SpeechSeqError, ImportError):
        return None
    return f"vocabulary {tok.vocab_size}, special tokens {tok.special_tokens}"


def _audio_inputs(items: Sequence[str]) -> list[Path]:
    from speechseq.errors import InputError

    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in AUDIO_EXTENSIONS)
            if not found:
                raise InputError(f"{p}: folder holds no audio files ({', '.join(AUDIO_EXTENSIONS)})")
            files += found
        elif p.suffix.lower() in (".txt", ".tsv", ".jsonl", ".csv") and p.is_file():
            files += _manifest(p)
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"{p}: no such file or folder")
    return files


def _manifest(path: Path) -> list[Path]:
    """A list of audio paths: one per line (txt), first column (tsv/csv), or "audio"/"path"/"file" key (jsonl)."""
    from speechseq.errors import InputError

    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
                entry = next(row[k] for k in ("audio", "path", "file", "audio_filepath") if k in row)
            except (json.JSONDecodeError, StopIteration, TypeError):
                raise InputError(f"{path}:{n}: expected a JSON object with an 'audio' or 'path' key") from None
        else:
            entry = line.split("\t" if path.suffix == ".tsv" else ("," if path.suffix == ".csv" else "\n"))[0]
        f = Path(entry) if Path(entry).is_absolute() else path.parent / entry
        if not f.is_file():
            raise InputError(f"{path}:{n}: audio file {entry} not found")
        out.append(f)
    return out


def cmd_transcribe(args: argparse.Namespace) -> int:
    from speechseq.transcribe import transcribe

    files = _audio_inputs(args.inputs)
    gen = dict(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
    out = open(args.output, "w", encoding="utf-8") if args.output else None
    try:
        for row in transcribe(args.model, files, batch_size=args.batch_size, dtype=args.dtype,
                              progress=not args.quiet, **gen):
            if out:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
            else:
                print(f"{row['file']}\t{row['text']}", flush=True)
    finally:
        if out:
            out.close()
    return 0


# ---------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="speechseq", description="Speech encoder-decoder models in JAX.")
    parser.add_argument("--cache-dir", help="JAX persistent compilation cache (default ~/.cache/speechseq/jax)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("transcribe", help="transcribe or translate audio files with a checkpoint",
                       description="Batched, length-bucketed transcription; text to stdout or --output jsonl.")
    p.add_argument("inputs", nargs="+", metavar="AUDIO", help="audio files, folders, or manifests (.txt/.tsv/.jsonl)")
    p.add_argument("--model", required=True, help="checkpoint directory (HF or speechseq) or hub id")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-beams", type=int, help="1 = greedy (default: the checkpoint's generation settings)")
    p.add_argument("--max-new-tokens", type=int,
                   help="default: the checkpoint's max_length (generation_config.json, else config.json, else 20 new "
                        "tokens as in transformers)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--output", help="write JSON lines (file, text, seconds) here instead of text to stdout")
    p.set_defaults(func=cmd_transcribe)

    p = sub.add_parser("convert", help="Hugging Face PyTorch checkpoint -> speechseq (orbax) checkpoint")
    p.add_argument("src", help="HF checkpoint directory or hub id (safetensors or pytorch_model.bin, sharded or not)")
    p.add_argument("dst", help="new speechseq checkpoint directory")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="store params in this dtype")
    p.add_argument("--force", action="store_true", help="replace an existing destination")
    p.add_argument("--verify", action="store_true", help="compare logits with transformers (needs torch)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="speechseq checkpoint -> Hugging Face layout (config.json + model.safetensors)")
    p.add_argument("src", help="speechseq checkpoint directory")
    p.add_argument("dst", help="new Hugging Face checkpoint directory")
    p.add_argument("--force", action="store_true", help="replace an existing destination")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("inspect", help="families, sizes, parameter count, dtypes, tokens, fresh weights")
    p.add_argument("src", help="checkpoint directory (HF or speechseq) or hub id")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "transcribe":
            enable_compilation_cache(_cache_dir(args.cache_dir))
        return args.func(args)
    except SpeechSeqError as e:
        print(f"speechseq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("speechseq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
