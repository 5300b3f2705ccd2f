"""``speechseq train CONFIG [--set section.key=value ...] [--resume] [--mesh SPEC] [--coordinator HOST:PORT
--num-processes N --process-id I]``, and ``--print-config``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
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
    scale = p.add_argument_group(
        "many devices and processes",
        "Run the same command in every process (one per host, or per GPU), with the same CONFIG and a shared "
        "train.output_dir: each process reads its own rows of every batch, all write the checkpoints, process 0 "
        "writes the logs and the final model. Without --coordinator, --num-processes and --process-id, what JAX "
        "detects from the launcher (Cloud TPU pod slices, SLURM, Open MPI, Kubernetes, JAX_COORDINATOR_ADDRESS with "
        "JAX_NUM_PROCESSES and JAX_PROCESS_ID) is used; nothing detected is one process.")
    scale.add_argument("--mesh", metavar="SPEC",
                       help="device mesh over all processes' devices, e.g. data=2,fsdp=4,tensor=1 (same as --set "
                            "mesh.shape=SPEC; default data=-1 when several processes run, else one device)")
    scale.add_argument("--coordinator", metavar="HOST:PORT",
                       help="address of process 0, where jax.distributed's coordinator listens")
    scale.add_argument("--num-processes", type=int, metavar="N", help="processes in the run")
    scale.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 to N-1")
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
    overrides = [*args.overrides, *([f"mesh.shape={args.mesh}"] if args.mesh is not None else [])]
    config = load_config(args.config, overrides)

    from speechseq.sharding import initialize_distributed  # before anything starts jax's backends

    initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    from speechseq.training.loop import train

    # orbax logs through absl's logger ("Waiting for previous save to complete took 1.1 seconds ..." on a busy
    # machine); the command's own lines say what happened, and a stopped run says it in one
    logging.getLogger("absl").setLevel(logging.ERROR)
    if args.quiet:  # speechseq -q train: no progress bar
        config = dataclasses.replace(config, log=dataclasses.replace(config.log, progress=False))
    result = train(config, resume=args.resume)
    print(json.dumps(result))
    return 0
