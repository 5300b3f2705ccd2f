"""Time and peak memory of `speechseq convert` and `speechseq export` on a ~300M-parameter random checkpoint.

    python benchmarks/convert.py [--workdir /tmp/speechseq-convert-bench] [--keep]

Builds a wav2vec2-large-sized encoder (stable layer norm, 24 layers, hidden 1024) + a 2-layer BERT decoder with
random weights in transformers, saves it as model.safetensors, then runs each command in a fresh process and
reports its wall time and peak resident memory (ru_maxrss) beside the checkpoint size. The target is a peak under
1.5x the checkpoint size; the baseline of a process that only imports speechseq (JAX) is printed too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def build(path: Path) -> int:
    import torch
    import transformers as T

    enc = T.Wav2Vec2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                           feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)
    dec = T.BertConfig(hidden_size=1024, num_hidden_layers=2, num_attention_heads=16, intermediate_size=4096,
                       is_decoder=True, add_cross_attention=True)
    cfg = T.SpeechEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id = 101, 0
    torch.manual_seed(0)
    model = T.SpeechEncoderDecoderModel(cfg)
    model.save_pretrained(path, max_shard_size="20GB")
    return sum(p.numel() for p in model.parameters())


def measure(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (bytes) of ``cmd`` run in a fresh child process."""
    code = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
            "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); dt = time.perf_counter() - t; "
            "print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, r.returncode)")
    out = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, check=True).stdout
    dt, rss, rc = out.split()
    if rc != "0":
        raise SystemExit(f"{' '.join(cmd)} failed with status {rc}")
    return float(dt), float(rss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/speechseq-convert-bench")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t = time.perf_counter()
    n = build(work / "hf")
    size = sum(f.stat().st_size for f in (work / "hf").iterdir())
    print(f"checkpoint: {n / 1e6:.0f} M parameters, {size / 2**30:.2f} GiB safetensors (built in "
          f"{time.perf_counter() - t:.0f} s)")
    exe = str(Path(sys.executable).with_name("speechseq"))
    _, base = measure([sys.executable, "-c", "import speechseq, jax, orbax.checkpoint"])
    rows = [("import only (baseline)", 0.0, base)]
    for name, cmd in [("convert", [exe, "-q", "convert", str(work / "hf"), str(work / "ss")]),
                      ("export", [exe, "-q", "export", str(work / "ss"), str(work / "back")])]:
        dt, rss = measure(cmd)
        rows.append((name, dt, rss))
    print(f"\n{'step':<24}{'wall s':>8}{'peak RSS GiB':>14}{'x ckpt size':>13}")
    for name, dt, rss in rows:
        print(f"{name:<24}{dt:>8.1f}{rss / 2**30:>14.2f}{rss / size:>13.2f}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
