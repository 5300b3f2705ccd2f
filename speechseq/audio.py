"""Audio in: read files (soundfile), resample (soxr), and turn waveforms into model inputs.

``FeatureExtractor`` reproduces transformers' ``Wav2Vec2FeatureExtractor`` numerically (same numpy operations in the
same dtypes), so ``input_values`` match transformers bit for bit; a ``preprocessor_config.json`` of
``Speech2TextFeatureExtractor`` loads ``fbank.Speech2TextFeatureExtractor`` instead (filterbank ``input_features``).
``padding="buckets"`` pads to one of a few fixed lengths (``bucket_length``) so a jitted encoder compiles once per
bucket, and ``batches_by_length`` groups many files into batches of similar length.

Shapes: B batch, N samples (after padding), C channels.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np

from speechseq.config import check_number, number
from speechseq.errors import ConfigError, InputError, first_line
from speechseq.checkpoints.storage import write_json

PREPROCESSOR_CONFIG = "preprocessor_config.json"

# Padding buckets, in seconds: powers of two up to 16 s, then 30 s (the usual longest utterance / chunk length), then
# multiples of 30 s. Padding wastes at most half of a batch below 30 s, and the number of shapes a jitted encoder sees
# stays small: 6 below 30 s, one per extra 30 s beyond.
DEFAULT_BUCKET_SECONDS = (1, 2, 4, 8, 16, 30)


def load_audio(path: str | os.PathLike, sampling_rate: int = 16000) -> np.ndarray:
    """Read an audio file as float32 mono samples [N] at ``sampling_rate`` Hz.

    Any format libsndfile reads (wav, flac, ogg, and mp3 with libsndfile >= 1.1). Multi-channel audio is downmixed
    by averaging the channels; other sampling rates are resampled with soxr (quality "HQ").
    Raises a one-line ``InputError`` naming the file when it is missing, not audio, empty, or holds NaN/inf samples.
    """
    import soundfile as sf
    import soxr

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: audio file not found")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # [N, C]
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise InputError(f"{path}: cannot read as audio ({first_line(e)})") from None
    if data.shape[0] == 0:
        raise InputError(f"{path}: contains no audio samples")
    if not np.isfinite(data).all():
        raise InputError(f"{path}: contains NaN or infinite samples")
    audio = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1)
    if rate != sampling_rate:
        audio = soxr.resample(audio, rate, sampling_rate, quality="HQ")
    return np.ascontiguousarray(audio, dtype=np.float32)


def bucket_length(n: int, buckets: Sequence[int] | None = None) -> int:
    """The padded length for ``n`` samples: the smallest bucket >= n, beyond the last bucket a multiple of it.

    ``buckets`` are lengths in samples, ascending; the default is ``DEFAULT_BUCKET_SECONDS`` at 16 kHz
    (16000, 32000, 64000, 128000, 256000, 480000, then 960000, 1440000, ...).
    """
    if n < 0:
        raise InputError(f"bucket_length: n must be >= 0, got {n}")
    buckets = sorted(buckets) if buckets else [s * 16000 for s in DEFAULT_BUCKET_SECONDS]
    if buckets[0] <= 0:
        raise InputError(f"bucket_length: buckets must be positive lengths, got {list(buckets)}")
    for b in buckets:
        if n <= b:
            return int(b)
    last = buckets[-1]
    return int(-(-n // last) * last)


def batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices into ``lengths`` grouped into batches of at most ``batch_size``, longest first, so that similar
    lengths share a batch (little padding) and an out-of-memory batch shows up first. Ties keep input order."""
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def waveforms(audios: Sequence[np.ndarray] | np.ndarray, sampling_rate: int | None, expected: int) -> list[np.ndarray]:
    """A feature extractor's input checked: one [N] array or a list of them, mono, not empty, at ``expected`` Hz
    (``sampling_rate``: what the caller says the audio is at, None to trust it). One-line ``InputError`` otherwise."""
    if sampling_rate is not None and sampling_rate != expected:
        raise InputError(f"sampling_rate: audio at {sampling_rate} Hz but the feature extractor expects "
                         f"{expected} Hz; resample it first (load_audio(path, sampling_rate={expected}) does)")
    if isinstance(audios, np.ndarray) and audios.ndim == 1:
        audios = [audios]
    if len(audios) == 0:
        raise InputError("audios: expected at least one waveform, got none")
    out = []
    for i, a in enumerate(audios):
        a = np.asarray(a)
        if a.ndim != 1:
            raise InputError(f"audios[{i}]: expected mono samples of shape [N], got shape {a.shape} "
                             "(downmix multi-channel audio first; load_audio does)")
        if a.shape[0] == 0:
            raise InputError(f"audios[{i}]: contains no samples")
        out.append(a)
    return out


@dataclass(frozen=True)
class FeatureExtractor:
    """Wav2Vec2FeatureExtractor semantics, read from and written to ``preprocessor_config.json``.

    Defaults are transformers' own. ``extra`` keeps the other keys of the file so that ``to_dict`` writes them back.
    """

    INPUT_KIND: ClassVar[str] = "waveform"  # it makes input_values (config.INPUT_KINDS)

    feature_size: int = 1
    sampling_rate: int = 16000
    padding_value: float = 0.0
    do_normalize: bool = True
    return_attention_mask: bool = False
    padding_side: str = "right"
    extra: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if self.feature_size != 1:
            raise ConfigError(f"{PREPROCESSOR_CONFIG}: feature_size must be 1 (raw audio), got {self.feature_size}")
        if self.padding_side != "right":
            raise ConfigError(f"{PREPROCESSOR_CONFIG}: padding_side must be 'right', got {self.padding_side!r}")
        check_number(self.sampling_rate, f"{PREPROCESSOR_CONFIG}: field 'sampling_rate'")
        check_number(self.padding_value, f"{PREPROCESSOR_CONFIG}: field 'padding_value'", integer=False, low=None)

    # ---- config file ---------------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = PREPROCESSOR_CONFIG) -> Any:
        """From a ``preprocessor_config.json`` dict (HF keys); unknown keys go to ``extra``. ``where`` (the file)
        starts the one-line error for a bad sampling rate (0 or "16k" would fail later as a division by zero or
        a resampling error). A ``Speech2TextFeatureExtractor`` file gives that class (``fbank``), which makes
        filterbank ``input_features``."""
        kind = d.get("feature_extractor_type", "Wav2Vec2FeatureExtractor")
        if kind == "Speech2TextFeatureExtractor" and cls is FeatureExtractor:
            from speechseq.fbank import Speech2TextFeatureExtractor

            return Speech2TextFeatureExtractor.from_dict(d, where)
        if kind != "Wav2Vec2FeatureExtractor":
            raise ConfigError(f"{PREPROCESSOR_CONFIG}: feature_extractor_type {kind!r} is not supported "
                              "(expected 'Wav2Vec2FeatureExtractor' or 'Speech2TextFeatureExtractor')")
        names = ("feature_size", "sampling_rate", "padding_value", "do_normalize", "return_attention_mask",
                 "padding_side")
        known = {k: d[k] for k in names if k in d}
        known["sampling_rate"] = number(d, "sampling_rate", where, cls.sampling_rate)
        extra = {k: v for k, v in d.items() if k not in names and k != "feature_extractor_type"}
        return cls(**known, extra=extra)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike) -> "FeatureExtractor":
        """From a checkpoint folder or hub id (its ``preprocessor_config.json``; defaults when there is none), or
        from a path to the json file itself."""
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            from speechseq.hub import resolve

            path = resolve(name_or_path) / PREPROCESSOR_CONFIG
            if not path.is_file():
                return cls()
        try:
            d = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot read as JSON ({first_line(e)})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(d, str(path))

    def to_dict(self) -> dict[str, Any]:
        """The ``preprocessor_config.json`` dict, with transformers' keys."""
        d = asdict(self)
        extra = d.pop("extra")
        return {**extra, **d, "feature_extractor_type": "Wav2Vec2FeatureExtractor"}

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``preprocessor_config.json`` into ``directory`` (created if needed); returns the file's path."""
        path = Path(directory) / PREPROCESSOR_CONFIG
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, self.to_dict())
        return path

    # ---- features --------------------------------------------------------------------------------------------------

    def __call__(
        self,
        audios: Sequence[np.ndarray] | np.ndarray,
        sampling_rate: int | None = None,
        padding: str = "longest",
        max_length: int | None = None,
        return_attention_mask: bool | None = None,
        buckets: Sequence[int] | None = None,
    ) -> dict[str, np.ndarray]:
        """Waveforms (a list of [N_i] arrays, or one [N] array) -> ``{"input_values": [B, N] float32,
        "attention_mask": [B, N] int32}`` (the mask only when ``return_attention_mask``, default from the config).

        padding: "longest" (N = longest input), "max_length" (N = ``max_length``), or "buckets"
        (N = ``bucket_length(longest, buckets)``; default buckets ``DEFAULT_BUCKET_SECONDS`` at this sampling rate).

        As in transformers: with ``do_normalize`` each row is scaled to zero mean, unit variance (epsilon 1e-7), in
        the input's float precision; with an attention mask the statistics use the valid samples only and padding is
        set to ``padding_value`` afterwards; without one they use the whole padded row, padding included.
        """
        rows = []
        for a in waveforms(audios, sampling_rate, self.sampling_rate):
            # transformers casts float64 to float32 before normalising; other dtypes (ints) normalise in float64
            rows.append(a.astype(np.float32) if a.dtype == np.float64 else a)
        lengths = [r.shape[0] for r in rows]
        longest = max(lengths)

        if padding == "longest":
            n = longest
        elif padding == "max_length":
            if max_length is None:
                raise InputError('max_length: required with padding="max_length"')
            n = max_length
        elif padding == "buckets":
            n = bucket_length(longest, buckets or [s * self.sampling_rate for s in DEFAULT_BUCKET_SECONDS])
        else:
            raise InputError(f'padding: expected "longest", "max_length" or "buckets", got {padding!r}')
        if longest > n:
            raise InputError(f"audios: {longest} samples do not fit max_length {n} (no truncation; split long audio)")

        use_mask = self.return_attention_mask if return_attention_mask is None else return_attention_mask
        dtype = np.result_type(*rows) if self.do_normalize else np.float32
        if not np.issubdtype(dtype, np.floating):
            dtype = np.float64
        values = np.full((len(rows), n), self.padding_value, dtype=dtype)
        mask = np.zeros((len(rows), n), dtype=np.int32)
        for i, r in enumerate(rows):
            values[i, : r.shape[0]] = r
            mask[i, : r.shape[0]] = 1

        if self.do_normalize:
            for i, length in enumerate(lengths if use_mask else [n] * len(rows)):
                # the same numpy expression as transformers' zero_mean_unit_var_norm, for bit-equal results
                vector = values[i]
                normed = (vector - vector[:length].mean()) / np.sqrt(vector[:length].var() + 1e-7)
                if length < n:
                    normed[length:] = self.padding_value
                values[i] = normed
        out = {"input_values": values.astype(np.float32, copy=False)}
        if use_mask:
            out["attention_mask"] = mask
        return out
