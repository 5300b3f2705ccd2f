"""``speechseq convert`` (Hugging Face PyTorch checkpoint -> speechseq) and ``speechseq export`` (and back)."""

from __future__ import annotations

import argparse
import time
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("convert", help="Hugging Face PyTorch checkpoint -> speechseq (orbax) checkpoint")
    p.add_argument("src", help="HF checkpoint directory or hub id (safetensors or pytorch_model.bin, sharded or not)")
    p.add_argument("dst", help="new speechseq checkpoint directory")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="store params in this dtype")
    p.add_argument("--force", action="store_true", help="replace an existing destination")
    p.add_argument("--verify", action="store_true", help="compare logits with transformers (needs torch)")
    p.set_defaults(func=run_convert)

    p = sub.add_parser("export", help="speechseq checkpoint -> Hugging Face layout (config.json + model.safetensors)")
    p.add_argument("src", help="speechseq checkpoint directory")
    p.add_argument("dst", help="new Hugging Face checkpoint directory")
    p.add_argument("--force", action="store_true", help="replace an existing destination")
    p.set_defaults(func=run_export)


def run_convert(args: argparse.Namespace) -> int:
    from speechseq.checkpoints.convert import convert

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


def run_export(args: argparse.Namespace) -> int:
    from speechseq.checkpoints.convert import export

    t0 = time.perf_counter()
    export(args.src, args.dst, force=args.force, progress=not args.quiet)
    print(f"exported {args.src} -> {args.dst} (Hugging Face layout) in {time.perf_counter() - t0:.1f} s")
    return 0
