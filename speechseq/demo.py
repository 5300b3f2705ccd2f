"""End-to-end demo: build a model from a config, save it in the Hugging Face layout, load it back, run it on speech.

    python -m speechseq.demo                       # or: make demo
    python -m speechseq.demo --config configs/demo-hubert-gpt2.json --audio my.wav --out /tmp/model

The weights are random (untrained), so the output tokens mean nothing; the demo shows the machinery working: the
checkpoint files, load time, compile time versus the cached second call, and the shapes that come out. It needs the
source checkout (for ``configs/`` and ``tests/fixtures/``) unless ``--config`` and ``--audio`` are given.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "demo-wav2vec2-bert.json"
FIXTURES = REPO / "tests" / "fixtures"
DEFAULT_AUDIO = ("hello_world.wav", "quick_brown_fox.wav", "speech_to_text.wav")
# decoder inputs: the start token + this many arbitrary ids (the demo model is random and comes without a tokenizer)
NUM_TEXT_TOKENS = 3

RANDOM_NOTE = ("NOTE: the weights are RANDOM (untrained), so the tokens printed below are meaningless. "
               "A trained model ships in a later release.")


class DemoError(Exception):
    """Bad input to the demo: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------------------------------------------------
# Printing helpers


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def display(path: Path) -> str:
    """``path`` relative to the working directory when it is inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------------------------------------------------
# The demo


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m speechseq.demo",
        description="Build a speech encoder-decoder from a Hugging Face config, save it as a Hugging Face "
                    "checkpoint, load it back and run it on audio files. The weights are random (untrained): the "
                    "output tokens are meaningless.",
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="HF speech-encoder-decoder config.json (default: %(default)s)")
    parser.add_argument("--audio", type=Path, nargs="+", default=[FIXTURES / a for a in DEFAULT_AUDIO],
                        metavar="FILE", help="audio files, any format soundfile reads, resampled to 16 kHz "
                                             f"(default: the three WAV files in {FIXTURES})")
    parser.add_argument("--out", type=Path, default=Path("demo_out") / "model",
                        help="directory to save the checkpoint in (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random init seed (default: %(default)s)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    import jax

    from speechseq import SpeechSeq2Seq
    from speechseq.audio import FeatureExtractor, load_audio
    from speechseq.config import config_from_dict, read_json
    from speechseq.checkpoints.convert import describe_config

    # Check every input before the work starts, so a bad argument costs nothing and prints one line.
    if args.config == DEFAULT_CONFIG and not DEFAULT_CONFIG.exists():
        raise DemoError(f"{DEFAULT_CONFIG}: config file not found (run from a source checkout of speechseq, or pass "
                        "--config)")
    config = config_from_dict(read_json(args.config), display(args.config))
    # Wav2Vec2FeatureExtractor's defaults, with the attention mask (the demo's clips have different lengths)
    features = FeatureExtractor(return_attention_mask=True)
    rate = features.sampling_rate
    waves = [load_audio(p, rate) for p in args.audio]
    if args.out.exists() and not args.out.is_dir():
        raise DemoError(f"{args.out}: exists and is not a directory (--out)")

    print("speechseq demo: speech encoder-decoder in JAX, config -> random init -> save -> load -> forward")
    print(RANDOM_NOTE)
    print(f"JAX {jax.__version__} on {jax.devices()[0].platform.upper()} ({jax.device_count()} device(s))")
    print()

    print(f"[1/6] config   {display(args.config)}")
    t = time.perf_counter()
    model = SpeechSeq2Seq.from_config(config, seed=args.seed)
    init_s = time.perf_counter() - t
    for key, value in describe_config(model.config).items():
        print(f"               {key}: {value}")

    leaves = jax.tree_util.tree_leaves(model.params)
    n_params = sum(int(x.size) for x in leaves)
    n_bytes = sum(int(x.size) * x.dtype.itemsize for x in leaves)
    print(f"[2/6] init     random weights (seed {args.seed}): {n_params:,} parameters in {len(leaves)} arrays "
          f"({human_bytes(n_bytes)} float32) in {init_s:.2f} s")

    t = time.perf_counter()
    model.save_pretrained(args.out)
    save_s = time.perf_counter() - t
    print(f"[3/6] save     save_pretrained('{display(args.out)}') in {save_s:.2f} s, Hugging Face layout "
          "(PyTorch names, loadable by transformers.SpeechEncoderDecoderModel):")
    for f in sorted(p for p in args.out.iterdir() if p.is_file()):
        print(f"                 {f.name:<20} {human_bytes(f.stat().st_size):>10}")

    t = time.perf_counter()
    loaded = SpeechSeq2Seq.from_pretrained(args.out)
    load_s = time.perf_counter() - t
    same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               zip(leaves, jax.tree_util.tree_leaves(loaded.params)))
    print(f"[4/6] load     SpeechSeq2Seq.from_pretrained('{display(args.out)}') in {load_s:.2f} s; "
          f"weights identical to the saved model: {'yes' if same else 'NO'}")
    if not same:
        raise DemoError("the reloaded weights differ from the saved ones (please report this bug)")

    batch = features(waves)
    values, mask = batch["input_values"], batch["attention_mask"]
    print(f"[5/6] audio    {len(waves)} file(s): load_audio (mono, {rate // 1000} kHz float32) -> FeatureExtractor "
          "(zero mean / unit variance per utterance, padded to the longest):")
    for p, w in zip(args.audio, waves):
        print(f"                 {p.name:<24} {len(w) / rate:5.2f} s  {len(w):>7,} samples")
    print(f"               padded batch: input_values {list(values.shape)} float32, "
          f"attention_mask {list(mask.shape)} ({int(mask.sum()):,} real samples)")

    cfg = loaded.config
    first = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else 0
    rng = np.random.default_rng(args.seed)
    text_ids = rng.integers(0, cfg.decoder.vocab_size, size=NUM_TEXT_TOKENS)
    decoder_input_ids = np.tile(np.concatenate([[first], text_ids]), (len(waves), 1)).astype(np.int32)
    print(f"[6/6] forward  teacher-forced pass, decoder_input_ids {list(decoder_input_ids.shape)} = start token "
          f"{first} + {NUM_TEXT_TOKENS} arbitrary ids {text_ids.tolist()} (the demo model has no tokenizer)")

    timings = []
    for _ in range(2):
        t = time.perf_counter()
        out = loaded(values, mask, decoder_input_ids=decoder_input_ids)
        out.logits.block_until_ready()
        timings.append(time.perf_counter() - t)
    print(f"                 first call  (trace + XLA compile + run): {timings[0]:6.2f} s")
    print(f"                 second call (same shapes, cached program): {timings[1]:6.3f} s")
    frames = out.encoder_last_hidden_state.shape
    print(f"               encoder_last_hidden_state {list(frames)} ({frames[1]} frames for "
          f"{values.shape[1]:,} samples); logits {list(out.logits.shape)} float32")
    tokens = np.asarray(jax.device_get(out.logits)).argmax(-1)
    print("               greedy argmax tokens per position (RANDOM weights: meaningless):")
    for p, row in zip(args.audio, tokens):
        print(f"                 {p.name:<24} {row.tolist()}")
    print()
    print(f"done in {time.perf_counter() - start:.1f} s. Remember: the weights are random (untrained), so these "
          "tokens mean nothing; a trained model ships in a later release.")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from speechseq.errors import SpeechSeqError
    except ImportError as e:  # pragma: no cover - a broken install
        print(f"error: cannot import speechseq ({e})", file=sys.stderr)
        return 2
    try:
        run(args)
    except (DemoError, SpeechSeqError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
