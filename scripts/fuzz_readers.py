#!/usr/bin/env python
"""A longer fuzz run of the checkpoint readers and config parsing than the test suite's fixed budget.

Runs the properties of tests/test_fuzz.py (``TARGETS``: safetensors, bin, index, config) in rounds of --examples
examples per target, each round with a fresh random seed, until --minutes have passed. The first failure stops the
run: hypothesis prints the shrunk input and a ``@reproduce_failure`` blob, and this script the round's seed.

    .venv/bin/python scripts/fuzz_readers.py --minutes 30
    .venv/bin/python scripts/fuzz_readers.py --minutes 5 --targets bin safetensors --examples 500
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hypothesis import given, seed, settings  # noqa: E402

import test_fuzz  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to run (default 10)")
    parser.add_argument("--targets", nargs="+", choices=sorted(test_fuzz.TARGETS), default=list(test_fuzz.TARGETS))
    parser.add_argument("--examples", type=int, default=300, help="examples per target and round (default 300)")
    args = parser.parse_args(argv)
    end = time.monotonic() + args.minutes * 60
    examples = dict.fromkeys(args.targets, 0)
    rounds = 0
    while time.monotonic() < end:
        for name in args.targets:
            strategy, check = test_fuzz.TARGETS[name]
            round_seed = random.getrandbits(64)
            budget = settings(test_fuzz.BASE_SETTINGS, max_examples=args.examples)
            run = seed(round_seed)(budget(given(strategy)(check)))
            try:
                run()
            except BaseException:
                print(f"fuzz_readers: {name} failed in round {rounds + 1} (seed {round_seed})", file=sys.stderr)
                raise
            examples[name] += args.examples
            if time.monotonic() >= end:
                break
        rounds += 1
        print(f"{time.monotonic() - end + args.minutes * 60:7.0f} s  round {rounds}: "
              + ", ".join(f"{k} {v}" for k, v in examples.items()), flush=True)
    print(f"fuzz_readers: no failure in {sum(examples.values())} examples ({args.minutes} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
