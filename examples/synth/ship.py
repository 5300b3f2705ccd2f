"""Make the shipped recogniser's folder from a trained run: the model in the Hugging Face layout, its training
curves, a few held-out test clips for the demo, and the test-set figures.

    python examples/synth/ship.py runs/synth data/synth models/synth-en

Writes into the new folder OUT (never replacing anything; it appears whole or not at all):

- the run's ``model-hf/`` files (``config.json``, ``model.safetensors``, tokenizer, ``preprocessor_config.json``,
  ``generation_config.json``): what ``speechseq transcribe --model OUT`` and transformers'
  ``SpeechEncoderDecoderModel.from_pretrained(OUT)`` load;
- ``curves.png``, the run's training loss and validation curves;
- ``samples/``: the first ``--samples`` utterances of ``test.jsonl`` and of ``test_voice.jsonl`` as 16-bit FLAC, with
  ``samples.jsonl`` (``id``, ``audio``, ``text``, ``voice``, ``set``), which ``python -m speechseq.demo`` transcribes;
- ``results.json``: ``speechseq evaluate``'s greedy WER and CER on both whole test sets, the same under the
  checkpoint's own decoding (``"beam"``) when ``generation_config.json`` asks for beam search, and the training
  run's step count: the figures the model card states.

The model card (``README.md``) is written by hand from ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "preprocessor_config.json", "generation_config.json")
TEST_SETS = ("test", "test_voice")
MAX_MB = 25


def ship(run: Path, data: Path, out: Path, samples: int = 8, batch_size: int = 32) -> dict:
    """Write OUT (see the module docstring) and return ``results.json``'s content."""
    import soundfile as sf

    from speechseq.checkpoints.storage import atomic_dir, write_json
    from speechseq.data import read_manifest
    from speechseq.errors import InputError
    from speechseq.processor import Processor
    from speechseq.speech_seq2seq import SpeechSeq2Seq
    from speechseq.training.loop import evaluate

    hf = run / "model-hf"
    for name in MODEL_FILES:
        if not (hf / name).is_file():
            raise InputError(f"{hf / name}: not found (is {run} a finished `speechseq train` run?)")
    size = sum((hf / n).stat().st_size for n in MODEL_FILES) / 2**20
    if size > MAX_MB:
        raise InputError(f"{hf}: {size:.1f} MiB, more than the {MAX_MB} MiB a shipped model may take")
    manifests = {name: data / f"{name}.jsonl" for name in TEST_SETS}
    for path in manifests.values():
        if not path.is_file():
            raise InputError(f"{path}: not found (make the data set with examples/synth/make_data.py)")

    model = SpeechSeq2Seq.from_pretrained(hf)
    processor = Processor.from_pretrained(hf)
    results: dict = {"model": str(run), "data": str(data)}
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        results["steps"] = max(json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line)

    def measure(num_beams: int) -> dict:
        out = {}
        for name, path in manifests.items():
            result = evaluate(model, read_manifest(path), processor=processor, batch_size=batch_size,
                              num_beams=num_beams)
            out[name] = {k: result[k] for k in ("utterances", "wer", "cer", "audio_seconds", "rtf")}
            print(f"{name:<11} {result['utterances']} utterances, {num_beams} beam(s): WER {100 * result['wer']:.2f}%, "
                  f"CER {100 * result['cer']:.2f}%")
        return out

    results.update(measure(1))
    beams = model.generation_config().num_beams
    if beams > 1:
        results["beam"] = {"num_beams": beams, **measure(beams)}
    with atomic_dir(out) as tmp:
        for name in MODEL_FILES:
            shutil.copy2(hf / name, tmp / name)
        if (run / "curves.png").is_file():
            shutil.copy2(run / "curves.png", tmp / "curves.png")
        (tmp / "samples").mkdir()
        rows = []
        for name, path in manifests.items():
            for line in path.read_text(encoding="utf-8").splitlines()[:samples]:
                row = json.loads(line)
                audio, rate = sf.read(path.parent / row["audio"], dtype="float32")
                file = f"{row['id']}.flac"
                sf.write(tmp / "samples" / file, audio, rate, subtype="PCM_16")
                rows.append({"id": row["id"], "audio": file, "text": row["text"], "voice": row["voice"],
                             "set": name})
        (tmp / "samples" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        write_json(tmp / "results.json", results)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="the training run's output_dir (runs/synth)")
    parser.add_argument("data", type=Path, help="the data set (data/synth)")
    parser.add_argument("out", type=Path, help="the folder to write (must not exist)")
    parser.add_argument("--samples", type=int, default=8, help="clips taken from each test set (default 8)")
    args = parser.parse_args(argv)
    from speechseq.errors import SpeechSeqError

    try:
        ship(args.run, args.data, args.out, args.samples)
    except SpeechSeqError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
