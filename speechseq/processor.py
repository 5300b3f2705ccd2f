"""``Processor``: the checkpoint's feature extractor and tokenizer together, called like transformers' processors.

Its audio output is keyed by what the feature extractor makes (``input_values`` for raw audio, ``input_features`` for
filterbank features; ``INPUT_KIND`` as in ``config.INPUT_KINDS``), so ``model(**processor(audio=..., text=...))`` and
``model.generate(**processor(audio=...))`` reach an encoder of the matching kind, and one of the other kind refuses
the input in one line."""

from __future__ import annotations

import os
from typing import Any, Iterable, Sequence

import numpy as np

from speechseq.audio import FeatureExtractor
from speechseq.hub import resolve
from speechseq.text import Tokenizer


class Processor:
    """Audio -> model inputs, text -> labels, token ids -> text."""

    def __init__(self, feature_extractor: FeatureExtractor, tokenizer: Tokenizer | None):
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, require_tokenizer: bool = True) -> "Processor":
        """``preprocessor_config.json`` (transformers' defaults when absent) and the tokenizer files of a checkpoint."""
        path = resolve(name_or_path)
        tokenizer = Tokenizer.from_pretrained(path) if require_tokenizer else _optional_tokenizer(path)
        return cls(FeatureExtractor.from_pretrained(path), tokenizer)

    def __call__(self, audio: Sequence[np.ndarray] | np.ndarray | None = None, sampling_rate: int | None = None,
                 text: Sequence[str] | str | None = None, padding: str = "longest", **kwargs: Any) -> dict:
        """The feature extractor's model input from audio (``input_values`` [B, N] or ``input_features``
        [B, S, F], + ``attention_mask``), and ``labels`` [B, T] (-100 at padding) from text, as
        ``processor(audio=..., text=...)`` in transformers."""
        out: dict = {}
        if audio is not None:
            out.update(self.feature_extractor(audio, sampling_rate=sampling_rate, padding=padding, **kwargs))
        if text is not None:
            out["labels"] = self.tokenizer.encode_labels([text] if isinstance(text, str) else list(text))
        return out

    @property
    def input_kind(self) -> str:
        """What the feature extractor makes: "waveform" (``input_values``) or "features" (``input_features``)."""
        return self.feature_extractor.INPUT_KIND

    def batch_decode(self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def _optional_tokenizer(path: Any) -> Tokenizer | None:
    from speechseq.errors import CheckpointError

    try:
        return Tokenizer.from_pretrained(path)
    except CheckpointError:
        return None
