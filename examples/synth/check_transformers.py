"""Transcribe a manifest with the same checkpoint in speechseq and in transformers PyTorch and compare the texts.

    python examples/synth/check_transformers.py models/synth-en data/synth/test.jsonl data/synth/test_voice.jsonl

transformers runs ``SpeechEncoderDecoderModel.generate`` (both take the checkpoint's generation settings) on
each utterance alone, featurised by its own ``AutoFeatureExtractor`` and decoded by its own ``AutoTokenizer``;
speechseq runs ``speechseq.transcribe`` on each file alone. Both see the file's features padded to the length bucket
``transcribe`` pads it to (a Speech2Text encoder's convolutions see padding frames, in both libraries, so other
padding can change a near-tie). Prints how many transcripts are identical and each one that is not; exit status 1
when any differs. Needs torch and transformers (``pip install -e ".[test]"``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import transformers


def load_transformers(model_dir: Path) -> "transformers.SpeechEncoderDecoderModel":
    """The checkpoint as transformers' ``SpeechEncoderDecoderModel``, in eval mode. A Speech2Text encoder is built
    by hand: ``from_pretrained`` would make the encoder with ``AutoModel``, which for ``speech_to_text`` is the whole
    encoder-decoder ``Speech2TextModel``, not its ``Speech2TextEncoder``."""
    import safetensors.torch
    import transformers
    from transformers.models.speech_to_text.modeling_speech_to_text import Speech2TextEncoder

    config = transformers.SpeechEncoderDecoderConfig.from_pretrained(model_dir)
    if config.encoder.model_type != "speech_to_text":
        return transformers.SpeechEncoderDecoderModel.from_pretrained(model_dir).eval()
    model = transformers.SpeechEncoderDecoderModel(
        config=config, encoder=Speech2TextEncoder(config.encoder),
        decoder=transformers.AutoModelForCausalLM.from_config(config.decoder))
    found = model.load_state_dict(safetensors.torch.load_file(model_dir / "model.safetensors"), strict=False)
    tied = ("lm_head.weight", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias")  # the tied LM head
    if found.unexpected_keys or any(not key.endswith(tied) for key in found.missing_keys):
        raise ValueError(f"{model_dir}: tensors missing {found.missing_keys}, unexpected {found.unexpected_keys}")
    model.tie_weights()
    model.generation_config = transformers.GenerationConfig.from_pretrained(model_dir)
    return model.eval()


def transformers_texts(model_dir: Path, files: list[Path]) -> list[str]:
    """transformers PyTorch's transcript of each file, one utterance at a time, featurised by its own
    feature extractor and padded (zero features, mask 0) to the length ``speechseq.transcribe`` pads it to."""
    import torch
    import transformers

    from speechseq.audio import load_audio
    from speechseq.processor import Processor

    buckets = Processor.from_pretrained(model_dir).feature_extractor  # speechseq's, for the padded length only
    model = load_transformers(model_dir)
    features = transformers.AutoFeatureExtractor.from_pretrained(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    texts = []
    with torch.no_grad():
        for f in files:
            audio = load_audio(f, features.sampling_rate)
            inputs = features(audio, sampling_rate=features.sampling_rate, return_tensors="pt",
                              return_attention_mask=True, padding="max_length",
                              max_length=buckets([audio], padding="buckets")["input_features"].shape[1])
            main = inputs.pop(model.main_input_name if model.main_input_name in inputs else "input_features")
            ids = model.generate(main, **inputs, do_sample=False)
            texts.append(tokenizer.decode(ids[0], skip_special_tokens=True).strip())
    return texts


def speechseq_texts(model_dir: Path, files: list[Path]) -> list[str]:
    """speechseq's transcript of each file (``speechseq.transcribe``, one file at a time)."""
    from speechseq.transcribe import transcribe

    return [r["text"] for r in transcribe(model_dir, files, batch_size=1, progress=False)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="checkpoint folder in the Hugging Face layout")
    parser.add_argument("manifests", type=Path, nargs="+", help="JSONL manifests (audio paths relative to them)")
    args = parser.parse_args(argv)
    files, refs = [], []
    for manifest in args.manifests:
        for line in manifest.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            files.append(manifest.parent / row["audio"])
            refs.append(row["text"])
    ours = speechseq_texts(args.model, files)
    theirs = transformers_texts(args.model, files)
    differ = [(f, a, b) for f, a, b in zip(files, ours, theirs) if a != b]
    for f, a, b in differ:
        print(f"{f}:\n  speechseq    {a}\n  transformers {b}")
    print(f"{len(files) - len(differ)} of {len(files)} transcripts identical in speechseq and transformers "
          f"({sum(a == r for a, r in zip(ours, refs))} equal to the reference)")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
