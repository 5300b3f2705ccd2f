"""Where one ``generate`` call spends its time, per XLA op: the decode benchmark's model and inputs, one profiled call.

    python benchmarks/profile_decode.py                 # wav2vec2-base + bert-base, batch 4, 5 s, 32 new tokens
    python benchmarks/profile_decode.py --beams 4 --top 15
    python benchmarks/profile_decode.py --quick         # tiny model: a smoke test
    python benchmarks/profile_decode.py --by-shape      # the token loop's time per op kind and output shape

For each ``num_beams`` value it compiles ``SpeechSeq2Seq.generate`` (EOS suppressed, as in ``decode.py``), runs it
once more under ``jax.profiler`` and reads the trace's op events (a Perfetto JSON trace, no extra packages). Ops
that ran once per token (as many times as there are new tokens, or a multiple) are the token loop; the rest run once
per call (encoder, cross-attention K/V, set-up). Dots and convolutions are the ``ynn_fusion`` (YNNPACK), ``dot``
and ``conv*`` ops on XLA CPU and the ``ffi_call`` ops of speechseq's CPU kernel (``speechseq.kernels``); everything
else is elementwise work, copies, top-k (``custom-call``), gathers. Times
are summed over the threads that ran them, so on a busy machine read the split between the groups rather than the
totals. CPU only: other backends name their ops differently.

``--by-shape`` also has XLA dump the optimized program (``--xla_dump_to``, a temporary folder) and sums the token
loop's time per (dot or not, output shape): the 12 cross-attention scores dots of a step, say, show up as one line. That
is how the scores dots' cost was found (keys read column-major; now stored ``[B, N, H, S]``).

Unlike ``decode.py``'s timings, the split is stable on a shared machine: the share of the step outside the dots
is the same when every op is slowed alike. It is how the beam step's top-k (2.0 ms of a 55 ms step) was found.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from decode import build_checkpoint, speechseq_generate, strategy_name

CONTROL = ("while", "conditional", "call")  # ops that hold other ops: their time is their body's
DOTS = ("ynn_fusion", "dot", "conv", "ffi_call")  # YNNPACK / Eigen dots, convolutions, speechseq.kernels' dots


def is_dot(name: str) -> bool:
    return name.startswith(DOTS)


def op_times(trace_dir: Path) -> tuple[collections.Counter, collections.Counter]:
    """(total microseconds, calls) per XLA op name in the Perfetto trace under ``trace_dir``."""
    path = glob.glob(str(trace_dir / "**" / "*.json.gz"), recursive=True)
    if not path:
        raise SystemExit(f"{trace_dir}: jax.profiler wrote no Perfetto trace (*.json.gz)")
    with gzip.open(path[0]) as f:
        events = json.load(f)["traceEvents"]
    total, calls = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("args", {}).get("hlo_op")
        if e.get("ph") != "X" or not name or name.startswith(CONTROL):
            continue
        total[name] += e["dur"]
        calls[name] += 1
    return total, calls


def loop_ops(total: collections.Counter, calls: collections.Counter, steps: int) -> set[str]:
    """The ops that ran once per token: as many times as there are new tokens, or a multiple."""
    return {n for n in total if calls[n] >= steps and calls[n] % steps == 0}


def report(total: collections.Counter, calls: collections.Counter, steps: int, top: int) -> str:
    per_step = loop_ops(total, calls, steps)
    groups = {"token loop": per_step, "once per call": set(total) - per_step}
    lines = []
    for title, ops in groups.items():
        div = steps if title == "token loop" else 1
        unit = "ms per step" if div > 1 else "ms"
        dots = sum(total[n] for n in ops if is_dot(n)) / div / 1e3
        rest = sum(total[n] for n in ops if not is_dot(n)) / div / 1e3
        lines.append(f"  {title}: {dots + rest:.2f} {unit} = dots {dots:.2f} + other ops {rest:.2f} "
                     f"({100 * rest / max(dots + rest, 1e-9):.0f}% outside the dots)")
        others = sorted((n for n in ops if not is_dot(n)), key=lambda n: -total[n])[:top]
        for n in others:
            lines.append(f"    {total[n] / div / 1e3:8.3f} {unit}  x{calls[n] // div:<4} {n}")
    return "\n".join(lines)


def shapes_of(hlo_dir: Path) -> dict[str, str]:
    """Op name -> output shape, from the newest optimized ``generate`` program that XLA dumped into ``hlo_dir``."""
    dumps = sorted(hlo_dir.glob("*jit_generate*after_optimizations.txt"), key=lambda f: f.stat().st_mtime)
    if not dumps:
        raise SystemExit(f"{hlo_dir}: XLA dumped no optimized generate program (XLA_FLAGS overridden?)")
    return op_shapes(dumps[-1].read_text())


def op_shapes(hlo_text: str) -> dict[str, str]:
    """Op name -> output shape in an optimized HLO module's text (``compiled.as_text()`` or an XLA dump)."""
    found = re.findall(r"^\s*(?:ROOT )?%(\S+) = (\S+) ", hlo_text, re.M)
    return {n: shape if not shape.startswith("(") else shape.rstrip(",") + ", ...)" for n, shape in found}


def by_shape(total: collections.Counter, calls: collections.Counter, steps: int, shapes: dict[str, str],
             top: int) -> str:
    """The token loop's time summed per (dot or not, output shape), largest first."""
    time, count = collections.Counter(), collections.Counter()
    for n in loop_ops(total, calls, steps):
        key = ("dot   " if is_dot(n) else "other ") + shapes.get(n, "?")
        time[key] += total[n] / steps / 1e3
        count[key] += calls[n] // steps
    lines = ["  token loop by op kind and output shape (ms per step, ops per step):"]
    lines += [f"    {t:8.3f}  x{count[k]:<4} {k}" for k, t in time.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and 1 s of audio: a smoke test")
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 4], help="num_beams values to profile")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=None, help="audio length (default 5, or 1 with --quick)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--top", type=int, default=10, help="ops outside the dots to list per group")
    parser.add_argument("--by-shape", action="store_true",
                        help="also sum the token loop per op kind and output shape (XLA dumps the program)")
    args = parser.parse_args()
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (one-off ops are told apart by running once)")

    samples = int((args.seconds or (1.0 if args.quick else 5.0)) * 16000)
    with tempfile.TemporaryDirectory(prefix="speechseq-profile-") as tmp:
        hlo_dir = Path(tmp) / "hlo"
        if args.by_shape:  # before jax starts its CPU client, which reads XLA_FLAGS
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={hlo_dir}"
                                       " --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*generate.*").strip()
        import jax

        from speechseq import SpeechSeq2Seq

        ckpt = Path(tmp) / "ckpt"
        build_checkpoint(ckpt, args.quick, args.batch, samples)
        model = SpeechSeq2Seq.from_pretrained(ckpt)
        x = jax.device_put(np.load(ckpt / "audio.npy"))
        for beams in args.beams:
            speechseq_generate(model, x, beams, args.new_tokens)  # compile
            trace = Path(tmp) / f"trace-{beams}"
            with jax.profiler.trace(str(trace), create_perfetto_trace=True):
                speechseq_generate(model, x, beams, args.new_tokens)
            print(f"{strategy_name(beams)} ({args.batch * beams} rows), {args.new_tokens} new tokens, one call:")
            times = op_times(trace)
            print(report(*times, args.new_tokens, args.top), flush=True)
            if args.by_shape:
                print(by_shape(*times, args.new_tokens, shapes_of(hlo_dir), 2 * args.top), flush=True)


if __name__ == "__main__":
    main()
