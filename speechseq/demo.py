"""End-to-end demo: build a model from a config, save it in the Hugging Face layout, load it back, run it on speech.

    python -m speechseq.demo                       # or: make demo
    python -m speechseq.demo --config configs/demo-hubert-gpt2.json --audio my.wav --out /tmp/model

The weights are random (untrained), so the output tokens mean nothing; the demo shows the machinery working: the
checkpoint files, load time, compile time versus the cached second call, and the shapes that come out. It needs the
source checkout (for ``configs/`` and ``tests/fixtures/``) unless ``--config`` and ``--audio`` are given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import wave
from pathlib import Path
from typing import Sequence

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "demo-wav2vec2-bert.json"
FIXTURES = REPO / "tests" / "fixtures"
DEFAULT_AUDIO = ("hello_world.wav", "quick_brown_fox.wav", "speech_to_text.wav")
SAMPLE_RATE = 16_000
NUM_TEXT_TOKENS = 3  # decoder inputs: the start token + this many arbitrary ids (no tokenizer in this release)

RANDOM_NOTE = ("NOTE: the weights are RANDOM (untrained), so the tokens printed below are meaningless. "
               "A trained model ships in a later release.")


class DemoError(Exception):
    """Bad input to the demo: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------------------------------------------------
# Audio: stdlib ``wave`` reading and the Wav2Vec2FeatureExtractor normalisation


def read_wav(path: Path) -> np.ndarray:
    """A 16 kHz 16-bit PCM WAV file -> float32 samples in [-1, 1] (channels averaged to mono)."""
    try:
        with wave.open(str(path), "rb") as f:
            rate, width, channels, n = f.getframerate(), f.getsampwidth(), f.getnchannels(), f.getnframes()
            data = f.readframes(n)
    except FileNotFoundError:
        raise DemoError(f"{path}: audio file not found") from None
    except IsADirectoryError:
        raise DemoError(f"{path}: expected a WAV file, got a directory") from None
    except (wave.Error, EOFError) as e:
        raise DemoError(f"{path}: not a readable PCM WAV file ({e or type(e).__name__})") from None
    if width != 2:
        raise DemoError(f"{path}: expected 16-bit PCM samples, got {8 * width}-bit")
    if rate != SAMPLE_RATE:
        raise DemoError(f"{path}: expected {SAMPLE_RATE} Hz audio, got {rate} Hz "
                        f"(resample first, e.g. sox in.wav -r {SAMPLE_RATE} out.wav)")
    samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    samples = samples[: len(samples) // channels * channels].reshape(-1, channels).mean(axis=1, dtype=np.float32)
    if samples.size == 0:
        raise DemoError(f"{path}: contains no audio samples")
    return samples


def batch_audio(waves: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Utterances -> (input_values [B, N] float32, attention_mask [B, N] int32).

    Each utterance is normalised to zero mean and unit variance over its own samples, then zero-padded, as
    ``Wav2Vec2FeatureExtractor(do_normalize=True, padding_value=0.0)`` does.
    """
    n = max(len(w) for w in waves)
    values = np.zeros((len(waves), n), np.float32)
    mask = np.zeros((len(waves), n), np.int32)
    for i, w in enumerate(waves):
        values[i, : len(w)] = (w - w.mean()) / np.sqrt(w.var() + 1e-7)
        mask[i, : len(w)] = 1
    return values, mask


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


def describe(cfg) -> tuple[str, str]:
    e, d = cfg.encoder, cfg.decoder
    enc = (f"{e.model_type} encoder: {len(e.conv_dim)} conv layers x {e.conv_dim[0]} channels "
           f"(stride {int(np.prod(e.conv_stride))} samples = {1000 * np.prod(e.conv_stride) / SAMPLE_RATE:.0f} ms "
           f"per frame), {e.num_layers} transformer layers, hidden {e.hidden_size}, {e.num_heads} heads")
    dec = (f"{d.model_type} decoder: {d.num_layers} layers with cross-attention, hidden {d.hidden_size}, "
           f"{d.num_heads} heads, vocabulary {d.vocab_size}")
    if cfg.has_enc_to_dec_proj:
        dec += f" (enc_to_dec_proj {e.output_size} -> {d.hidden_size})"
    return enc, dec


# ----------------------------------------------------------------------------------------------------------------------
# The demo


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m speechseq.demo",
        description="Build a speech encoder-decoder from a Hugging Face config, save it as a Hugging Face "
                    "checkpoint, load it back and run it on WAV files. The weights are random (untrained): the "
                    "output tokens are meaningless.",
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="HF speech-encoder-decoder config.json (default: %(default)s)")
    parser.add_argument("--audio", type=Path, nargs="+", default=[FIXTURES / a for a in DEFAULT_AUDIO],
                        metavar="WAV", help="16 kHz 16-bit PCM WAV files (default: the three files in "
                                            f"{FIXTURES})")
    parser.add_argument("--out", type=Path, default=Path("demo_out") / "model",
                        help="directory to save the checkpoint in (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random init seed (default: %(default)s)")
    return parser.parse_args(argv)


def read_config(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        hint = " (run from a source checkout of speechseq, or pass --config)" if path == DEFAULT_CONFIG else ""
        raise DemoError(f"{path}: config file not found{hint}") from None
    except (IsADirectoryError, UnicodeDecodeError, PermissionError) as e:
        raise DemoError(f"{path}: cannot read config ({type(e).__name__})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DemoError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DemoError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def run(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    import jax

    from speechseq import SpeechSeq2Seq
    from speechseq.config import config_from_dict

    # Check every input before the work starts, so a bad argument costs nothing and prints one line.
    config = config_from_dict(read_config(args.config), display(args.config))
    waves = [read_wav(p) for p in args.audio]
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
    for line in describe(model.config):
        print(f"               {line}")

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

    values, mask = batch_audio(waves)
    print(f"[5/6] audio    {len(waves)} file(s), 16 kHz int16 -> float32, zero mean / unit variance per utterance:")
    for p, w in zip(args.audio, waves):
        print(f"                 {p.name:<24} {len(w) / SAMPLE_RATE:5.2f} s  {len(w):>7,} samples")
    print(f"               padded batch: input_values {list(values.shape)} float32, "
          f"attention_mask {list(mask.shape)} ({int(mask.sum()):,} real samples)")

    cfg = loaded.config
    first = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else 0
    rng = np.random.default_rng(args.seed)
    text_ids = rng.integers(0, cfg.decoder.vocab_size, size=NUM_TEXT_TOKENS)
    decoder_input_ids = np.tile(np.concatenate([[first], text_ids]), (len(waves), 1)).astype(np.int32)
    print(f"[6/6] forward  teacher-forced pass, decoder_input_ids {list(decoder_input_ids.shape)} = start token "
          f"{first} + {NUM_TEXT_TOKENS} arbitrary ids {text_ids.tolist()} (no tokenizer yet)")

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
