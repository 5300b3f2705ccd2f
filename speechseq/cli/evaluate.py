"""``speechseq evaluate --model CKPT MANIFEST``: per-utterance hypotheses to JSON lines, a summary to stdout."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="score a checkpoint on a manifest: WER, CER (BLEU for translation)",
                       description="Decode every utterance of a manifest, write the hypotheses as JSON lines and "
                                   "print WER, CER (and BLEU), the loss, utterances, audio seconds and the real-time "
                                   "factor.")
    p.add_argument("manifest", help="JSONL / CSV / TSV manifest (audio path and text) or a folder of audio + .txt")
    p.add_argument("--model", required=True, help="checkpoint directory (HF or speechseq) or hub id")
    p.add_argument("--output", help="JSON lines of {id, audio, reference, hypothesis, audio_seconds} (default: "
                                    "MANIFEST_NAME.hyps.jsonl in the working directory, never replacing a file "
                                    "unless named here)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-beams", type=int, help="1 = greedy (default: the checkpoint's generation settings)")
    p.add_argument("--max-new-tokens", type=int, help="default: the checkpoint's generation settings")
    p.add_argument("--task", choices=["transcribe", "translate"], default="transcribe",
                   help="translate adds BLEU (sacrebleu)")
    p.add_argument("--normalize", action="store_true",
                   help="lower-case and drop punctuation in hypotheses and references before scoring")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--audio-key", default="audio", help="manifest column of the audio path")
    p.add_argument("--text-key", default="text", help="manifest column of the reference text")
    p.add_argument("--on-bad", choices=["skip", "raise"], default="skip",
                   help="a bad row (missing file, empty text): skip and count it, or stop")
    p.add_argument("--num-workers", type=int, default=4, help="threads reading audio")
    p.set_defaults(func=run, compiles=True)


def _default_output(manifest: str) -> Path:
    from speechseq.errors import InputError

    path = Path(Path(manifest).resolve().name.split(".")[0] + ".hyps.jsonl")
    if path.exists():
        raise InputError(f"--output: {path} already exists; name it with --output to replace it, or choose another "
                         "file")
    return path


def run(args: argparse.Namespace) -> int:
    from speechseq.cli.transcribe import _output, _output_target
    from speechseq.data import read_manifest
    from speechseq.errors import InputError
    from speechseq.processor import Processor
    from speechseq.speech_seq2seq import SpeechSeq2Seq
    from speechseq.training.loop import evaluate

    if args.batch_size < 1:
        raise InputError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    examples = read_manifest(args.manifest, audio_key=args.audio_key, text_key=args.text_key, on_bad=args.on_bad)
    shown = args.output or str(_default_output(args.manifest))
    # checked before any work: not an input (the manifest or one of its audio files), not a folder
    target = _output_target(shown, [args.manifest], [Path(ex.audio) for ex in examples if Path(ex.audio).exists()])
    processor = Processor.from_pretrained(args.model)
    model = SpeechSeq2Seq.from_pretrained(args.model, dtype=args.dtype)
    result = evaluate(model, examples, processor=processor, batch_size=args.batch_size, task=args.task,
                      normalize=args.normalize, num_workers=args.num_workers, on_bad=args.on_bad,
                      progress=not args.quiet, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
    with _output(target, shown) as write:
        for row in result["rows"]:
            write(json.dumps(row, ensure_ascii=False) + "\n")
    summary = [("utterances", result["utterances"]), ("skipped", result["skipped"]),
               ("audio_seconds", result["audio_seconds"]), ("wer", f"{result['wer']:.4f}"),
               ("cer", f"{result['cer']:.4f}")]
    if "bleu" in result:
        summary.append(("bleu", f"{result['bleu']:.2f}"))
    summary += [("loss", f"{result['loss']:.4f}"), ("decode_seconds", result["seconds"]),
                ("real_time_factor", result["rtf"]), ("hypotheses", shown)]
    for name, value in summary:
        print(f"{name:<18}{value}")
    return 0
