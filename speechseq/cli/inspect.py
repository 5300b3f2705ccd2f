"""``speechseq inspect``: a checkpoint's families, sizes, parameter count, dtypes, tokens and fresh weights."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from speechseq.errors import SpeechSeqError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("inspect", help="families, sizes, parameter count, dtypes, tokens, fresh weights")
    p.add_argument("src", help="checkpoint directory (HF or speechseq) or hub id")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from speechseq.checkpoints.convert import describe

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
