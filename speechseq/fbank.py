"""Kaldi-compatible log-mel filterbanks and ``Speech2TextFeatureExtractor`` (transformers' numbers, numpy only).

transformers computes Speech2Text's features with ``audio_utils.spectrogram`` when torchaudio is absent: 25 ms
frames every 10 ms (400 / 160 samples at 16 kHz), DC offset removed per frame, pre-emphasis 0.97, a Povey window,
a 512-point FFT, the power spectrum through a Kaldi-scale mel bank (20 Hz to Nyquist, triangles in mel space), the
natural log floored at float32's epsilon; then utterance CMVN over each utterance's real frames. This module does
the same numpy operations in the same dtypes, on all frames at once, so the features equal transformers' to float32
rounding.

Shapes: B batch, N samples, F frames, M mel bins.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np

from speechseq.audio import DEFAULT_BUCKET_SECONDS, PREPROCESSOR_CONFIG, FeatureExtractor, bucket_length, waveforms
from speechseq.config import check_number, number
from speechseq.errors import ConfigError, InputError

FRAME_LENGTH, HOP_LENGTH, FFT_LENGTH = 400, 160, 512  # samples at 16 kHz: 25 ms, 10 ms
PREEMPHASIS = 0.97
MEL_FLOOR = 1.192092955078125e-07  # float32 epsilon, Kaldi's log floor
KIND = "Speech2TextFeatureExtractor"


@functools.lru_cache(maxsize=4)
def kaldi_mel_filters(num_mel_bins: int, sampling_rate: int) -> np.ndarray:
    """The Kaldi mel bank [FFT_LENGTH // 2 + 1, M] float64 (transformers' ``mel_filter_bank`` with mel_scale "kaldi",
    ``triangularize_in_mel_space``, 20 Hz to sampling_rate // 2, no norm)."""
    def mel(hz: Any) -> Any:
        return 1127.0 * np.log(1.0 + (hz / 700.0))

    bins = FFT_LENGTH // 2 + 1
    centers = np.linspace(mel(20), mel(sampling_rate // 2), num_mel_bins + 2)
    fft_mels = mel(sampling_rate / ((bins - 1) * 2) * np.arange(bins))
    diff = np.diff(centers)
    slopes = np.expand_dims(centers, 0) - np.expand_dims(fft_mels, 1)
    down, up = -slopes[:, :-2] / diff[:-1], slopes[:, 2:] / diff[1:]
    return np.maximum(np.zeros(1), np.minimum(down, up))


@functools.lru_cache(maxsize=1)
def povey_window() -> np.ndarray:
    """Kaldi's Povey window [FRAME_LENGTH] float64: a symmetric Hann window to the power 0.85."""
    return np.power(np.hanning(FRAME_LENGTH), 0.85)


def num_frames(samples: int) -> int:
    """Frames of ``samples`` samples (no centring: only whole frames)."""
    return 1 + (samples - FRAME_LENGTH) // HOP_LENGTH if samples >= FRAME_LENGTH else 0


def log_mel_fbank(waveform: np.ndarray, num_mel_bins: int = 80, sampling_rate: int = 16000) -> np.ndarray:
    """Audio [N] float32 in [-1, 1] -> Kaldi log-mel filterbank [F, M] float32 (F = ``num_frames(N)`` >= 1)."""
    w = (np.asarray(waveform, np.float32) * (2**15)).astype(np.float64)  # Kaldi reads 16-bit integer amplitudes
    n = num_frames(w.size)
    frames = np.lib.stride_tricks.sliding_window_view(w, FRAME_LENGTH)[::HOP_LENGTH][:n]  # [F, 400]
    frames = frames - frames.mean(axis=1, keepdims=True)
    emphasized = frames.copy()
    emphasized[:, 1:] -= PREEMPHASIS * frames[:, :-1]
    emphasized[:, 0] *= 1 - PREEMPHASIS
    # transformers stores the FFT as complex64 before taking the power in float64
    spectrum = np.fft.rfft(emphasized * povey_window(), n=FFT_LENGTH, axis=1).astype(np.complex64)
    power = np.abs(spectrum, dtype=np.float64) ** 2.0  # [F, 257]
    mel = np.maximum(MEL_FLOOR, np.dot(kaldi_mel_filters(num_mel_bins, sampling_rate).T, power.T))  # [M, F]
    return np.asarray(np.log(mel), np.float32).T


def utterance_cmvn(x: np.ndarray, length: int, normalize_means: bool = True, normalize_vars: bool = True,
                   padding_value: float = 0.0) -> np.ndarray:
    """Features [F, M] -> the same normalised over their first ``length`` frames (the rest set to
    ``padding_value``), float32: transformers' ``utterance_cmvn``."""
    if normalize_means:
        x = np.subtract(x, x[:length].mean(axis=0))
    if normalize_vars:
        x = np.divide(x, x[:length].std(axis=0))
    if length < x.shape[0]:
        x[length:] = padding_value
    return x.astype(np.float32)


@dataclass(frozen=True)
class Speech2TextFeatureExtractor:
    """transformers' ``Speech2TextFeatureExtractor`` (its numpy path), read from and written to
    ``preprocessor_config.json``; it makes ``input_features`` [B, F, M]. Defaults are transformers' own; ``extra``
    keeps the file's other keys for ``to_dict``."""

    INPUT_KIND: ClassVar[str] = "features"  # it makes input_features (config.INPUT_KINDS)

    feature_size: int = 80
    sampling_rate: int = 16000
    num_mel_bins: int = 80
    padding_value: float = 0.0
    dither: float = 0.0
    do_ceptral_normalize: bool = True
    normalize_means: bool = True
    normalize_vars: bool = True
    return_attention_mask: bool = True
    padding_side: str = "right"
    extra: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if self.padding_side != "right":
            raise ConfigError(f"{PREPROCESSOR_CONFIG}: padding_side must be 'right', got {self.padding_side!r}")
        if self.dither != 0:  # transformers draws it from numpy's global generator: no reproducible numbers
            raise ConfigError(f"{PREPROCESSOR_CONFIG}: field 'dither' must be 0 (random dithering is not supported), "
                              f"got {self.dither!r}")
        check_number(self.sampling_rate, f"{PREPROCESSOR_CONFIG}: field 'sampling_rate'")
        check_number(self.num_mel_bins, f"{PREPROCESSOR_CONFIG}: field 'num_mel_bins'")
        check_number(self.padding_value, f"{PREPROCESSOR_CONFIG}: field 'padding_value'", integer=False, low=None)

    # ---- config file ---------------------------------------------------------------------------------------------

    NAMES: ClassVar[tuple[str, ...]] = ("feature_size", "sampling_rate", "num_mel_bins", "padding_value", "dither",
                                        "do_ceptral_normalize", "normalize_means", "normalize_vars", "padding_side")

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = PREPROCESSOR_CONFIG) -> "Speech2TextFeatureExtractor":
        """From a ``preprocessor_config.json`` dict (HF keys); unknown keys go to ``extra``. transformers always
        returns the attention mask whatever the file says (its ``__init__`` sets it), and so does this class."""
        kind = d.get("feature_extractor_type", KIND)
        if kind != KIND:
            raise ConfigError(f"{where}: feature_extractor_type {kind!r} is not {KIND!r}")
        known = {k: d[k] for k in cls.NAMES if k in d}
        known["sampling_rate"] = number(d, "sampling_rate", where, cls.sampling_rate)
        extra = {k: v for k, v in d.items() if k not in cls.NAMES and k != "feature_extractor_type"}
        return cls(**known, extra=extra)

    # a checkpoint folder, hub id or json path (defaults when the folder has none), as ``FeatureExtractor``'s
    from_pretrained = classmethod(FeatureExtractor.from_pretrained.__func__)

    def to_dict(self) -> dict[str, Any]:
        """The ``preprocessor_config.json`` dict, with transformers' keys."""
        d = asdict(self)
        extra = d.pop("extra")
        return {**extra, **d, "feature_extractor_type": KIND}

    save_pretrained = FeatureExtractor.save_pretrained  # writes ``to_dict()`` atomically

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
        """Waveforms (a list of [N_i] arrays, or one [N] array) -> ``{"input_features": [B, F, M] float32,
        "attention_mask": [B, F] int32}`` (the mask unless ``return_attention_mask`` is False).

        padding: "longest" (F = most frames), "max_length" (F = ``max_length`` frames), or "buckets" (F = the frames
        of ``audio.bucket_length(longest audio, buckets)`` samples, so a jitted encoder sees few shapes).
        As transformers with padding: CMVN uses each utterance's real frames and sets the padding to
        ``padding_value``.
        """
        feats = []
        for i, a in enumerate(waveforms(audios, sampling_rate, self.sampling_rate)):
            a = a.astype(np.float32)
            if a.shape[0] < FRAME_LENGTH:
                raise InputError(f"audios[{i}]: {a.shape[0]} samples is too short; a filterbank frame needs "
                                 f"{FRAME_LENGTH} samples (25 ms)")
            feats.append(log_mel_fbank(a, self.num_mel_bins, self.sampling_rate))
        lengths = [f.shape[0] for f in feats]
        longest = max(lengths)
        if padding == "longest":
            n = longest
        elif padding == "max_length":
            if max_length is None:
                raise InputError('max_length: required with padding="max_length"')
            n = max_length
        elif padding == "buckets":
            samples = max(len(a) for a in audios)
            n = num_frames(bucket_length(samples, buckets or [s * self.sampling_rate for s in DEFAULT_BUCKET_SECONDS]))
        else:
            raise InputError(f'padding: expected "longest", "max_length" or "buckets", got {padding!r}')
        if longest > n:
            raise InputError(f"audios: {longest} frames do not fit max_length {n} (no truncation; split long audio)")

        values = np.full((len(feats), n, self.num_mel_bins), self.padding_value, dtype=np.float32)
        mask = np.zeros((len(feats), n), dtype=np.int32)
        for i, f in enumerate(feats):
            values[i, : f.shape[0]] = f
            mask[i, : f.shape[0]] = 1
            if self.do_ceptral_normalize:  # on the padded rows, as transformers pads before normalising
                values[i] = utterance_cmvn(values[i], f.shape[0], self.normalize_means, self.normalize_vars,
                                           self.padding_value)
        out = {"input_features": values}
        if self.return_attention_mask if return_attention_mask is None else return_attention_mask:
            out["attention_mask"] = mask
        return out
