"""``speechseq transcribe``: audio files, folders and lists in, text to stdout or JSON lines to ``--output``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("transcribe", help="transcribe or translate audio files with a checkpoint",
                       description="Batched, length-bucketed transcription; text to stdout or --output jsonl.")
    p.add_argument("inputs", nargs="+", metavar="AUDIO", help="audio files, folders, or manifests (.txt/.tsv/.jsonl)")
    p.add_argument("--model", required=True, help="checkpoint directory (HF or speechseq) or hub id")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-beams", type=int, help="1 = greedy (default: the checkpoint's generation settings)")
    p.add_argument("--max-new-tokens", type=int,
                   help="default: the checkpoint's max_length (generation_config.json, else config.json, else 20 new "
                        "tokens as in transformers)")
    p.add_argument("--chunk-length-s", type=float, default=30.0,
                   help="decode longer files in pieces of at most this many seconds (see --chunking; memory stays "
                        "flat however long the file; 0: decode each file whole; default %(default)s)")
    p.add_argument("--stride-length-s", type=float,
                   help="with --chunking windows: the overlap on each side of a window, in seconds (default: a "
                        "sixth of --chunk-length-s)")
    p.add_argument("--chunking", choices=["pauses", "windows"], default="pauses",
                   help="how files longer than --chunk-length-s are cut: pieces cut at every pause of 0.5 s or "
                        "more and in the longest pause of their second half, whose texts are joined (a piece "
                        "decoded to the length limit, or at over twice the file's usual token rate, is halved at a "
                        "pause and decoded again), or overlapping windows whose tokens are stitched as in "
                        "transformers' ASR pipeline (default %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--output", help="write JSON lines (file, text, seconds) here instead of text to stdout")
    p.set_defaults(func=run, compiles=True)


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


MANIFEST_KEYS = ("audio", "path", "file", "audio_filepath")


def _manifest(path: Path) -> list[Path]:
    """A list of audio paths: one per line (txt), first column (tsv/csv), or "audio"/"path"/"file" key (jsonl)."""
    from speechseq.errors import InputError, read_text

    text = read_text(path)
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            key = next((k for k in MANIFEST_KEYS if k in row), None) if isinstance(row, dict) else None
            if key is None:
                raise InputError(f"{path}:{n}: expected a JSON object with an 'audio' or 'path' key")
            entry = row[key]
            if not isinstance(entry, str) or not entry:
                raise InputError(f"{path}:{n}: '{key}' should be a file path (a non-empty string), got {entry!r}")
        else:
            entry = line.split("\t" if path.suffix == ".tsv" else ("," if path.suffix == ".csv" else "\n"))[0]
        f = Path(entry) if Path(entry).is_absolute() else path.parent / entry
        if not f.is_file():
            raise InputError(f"{path}:{n}: audio file {entry} not found")
        out.append(f)
    return out


def _output_target(output: str, inputs: Sequence[str], files: Sequence[Path]) -> Path:
    """The file ``--output`` will replace, checked before any work: not an input (audio, folder or list), not a
    folder, in a folder that exists. A symlink is followed, so the file it points to is replaced, not the link."""
    from speechseq.errors import InputError

    target = Path(output).resolve()
    own = target.stat() if target.exists() else None  # every input exists; compared by inode: links count too
    if own and any(os.path.samestat(own, Path(p).stat()) for p in (*inputs, *files)):
        raise InputError(f"--output {output}: is one of the inputs; writing there would destroy it, choose another "
                         "file")
    if target.is_dir():
        raise InputError(f"--output {output}: is a folder; give a file path")
    if not target.parent.is_dir():
        raise InputError(f"--output {output}: folder {target.parent} does not exist")
    if target.is_file() and not os.access(target, os.W_OK):  # a rename would replace it regardless
        raise InputError(f"--output {output}: cannot write (the file is read-only)")
    return target


@contextlib.contextmanager
def _output(target: Path, shown: str) -> Iterator[Callable[[str], None]]:
    """A ``write(text)`` function into ``--output``'s file, kept only when the block succeeds
    (``storage.atomic_file``): a run that fails (bad audio, an interrupt, a full disk) leaves an earlier file as it
    was. Something that is not a regular file (a pipe, ``/dev/full``) or a path in ``/dev`` (``/dev/stdout``, even
    when that leads to a file) is written directly: it is a stream, and renaming over it would not write to it.
    Failures to open, write or finish the file are one-line ``InputError``s; the block's own errors pass unchanged."""
    from speechseq.checkpoints import storage
    from speechseq.errors import InputError

    def failed(e: OSError) -> InputError:
        return InputError(f"--output {shown}: cannot write ({e.strerror or e})")

    stream = target.exists() and (not target.is_file() or Path(shown).absolute().parts[1:2] == ("dev",))
    in_block = False  # an OSError raised while the block runs is the block's (reading a checkpoint, say)
    try:
        with open(target, "w", encoding="utf-8") if stream else storage.atomic_file(target) as f:
            def write(text: str) -> None:
                try:
                    f.write(text)
                except OSError as e:
                    raise failed(e) from None

            in_block = True
            yield write
            in_block = False
    except OSError as e:
        if in_block:
            raise
        raise failed(e) from None


def run(args: argparse.Namespace) -> int:
    from speechseq.transcribe import transcribe

    files = _audio_inputs(args.inputs)
    gen = dict(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
    rows = transcribe(args.model, files, batch_size=args.batch_size, dtype=args.dtype, progress=not args.quiet,
                      chunk_length_s=args.chunk_length_s, stride_length_s=args.stride_length_s,
                      chunking=args.chunking, **gen)
    if not args.output:
        for row in rows:
            print(f"{row['file']}\t{row['text']}", flush=True)
        return 0
    # the output is checked and opened before the work starts: transcribe() runs when its first row is asked for
    with _output(_output_target(args.output, args.inputs, files), args.output) as write:
        for row in rows:
            write(json.dumps(row, ensure_ascii=False) + "\n")
    return 0
