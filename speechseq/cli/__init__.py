"""The ``speechseq`` command: transcribe, convert, export, inspect (one module per command in this package).

Every subcommand prints ``--help``, shows progress on long work on stderr, and on bad input exits with status 2
and one line ``speechseq: error: ...`` (no traceback). Compiled programs are kept in JAX's persistent cache
(``--cache-dir``, default ``$SPEECHSEQ_CACHE_DIR`` or ``~/.cache/speechseq/jax``), so a second run starts warm.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from speechseq.cli import convert, evaluate, inspect, train, transcribe
from speechseq.errors import SpeechSeqError

COMMANDS = (transcribe, convert, inspect, train, evaluate)  # each: add_parser(sub), run(args) -> status


def _cache_dir(arg: str | None) -> str:
    return arg or os.environ.get("SPEECHSEQ_CACHE_DIR") or str(Path.home() / ".cache" / "speechseq" / "jax")


def enable_compilation_cache(directory: str) -> None:
    import jax

    Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="speechseq", description="Speech encoder-decoder models in JAX.")
    parser.add_argument("--cache-dir", help="JAX persistent compilation cache (default ~/.cache/speechseq/jax)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "compiles", False):
            enable_compilation_cache(_cache_dir(args.cache_dir))
        return args.func(args)
    except SpeechSeqError as e:
        print(f"speechseq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # SIGINT, or SIGTERM while writing a checkpoint (storage.Interrupted)
        signum = getattr(e, "signum", 2)
        detail = getattr(e, "detail", "")  # e.g. the checkpoint a terminated training run saved
        print(("speechseq: interrupted" if signum == 2 else "speechseq: terminated") + (f": {detail}" if detail else ""),
              file=sys.stderr)
        return 128 + signum
