"""``speechseq train CONFIG [--set section.key=value ...] [--resume]``, and ``--print-config``."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="fine-tune a model as a TOML config file says",
                       description="Fine-tune a speech encoder-decoder: checkpoints, evaluation, logs and the final "
                                   "model go to train.output_dir. `speechseq train --print-config` lists every "
                                   "setting with its default.")
    p.add_argument("config", nargs="?", help="TOML config file (see examples/train_config.toml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                   help="override one setting, e.g. --set optim.learning_rate=3e-4 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in train.output_dir from its latest checkpoint (exactly as if never "
                        "stopped)")
    p.add_argument("--print-config", action="store_true",
                   help="print every setting with its default (or CONFIG's value) and doc as TOML, and exit")
    p.set_defaults(func=run, compiles=True)


def run(args: argparse.Namespace) -> int:
    from speechseq.errors import InputError
    from speechseq.training.config import TrainConfig, load_config, parse_config, to_toml

    if args.print_config:
        config = (load_config(args.config, args.overrides, validate=False) if args.config
                  else parse_config({}, "--set", args.overrides, validate=False) if args.overrides else TrainConfig())
        print(to_toml(config), end="")
        return 0
    if not args.config:
        raise InputError("train: give a CONFIG file (speechseq train --print-config shows every setting)")
    config = load_config(args.config, args.overrides)

    from speechseq.training.loop import train

    if args.quiet:  # speechseq -q train: no progress bar
        config = dataclasses.replace(config, log=dataclasses.replace(config.log, progress=False))
    result = train(config, resume=args.resume)
    print(json.dumps(result))
    return 0
