"""speechseq: speech encoder-decoder models (Wav2Vec2/HuBERT + BERT/RoBERTa/GPT-2/BART/mBART) as pure JAX functions."""

import importlib

from speechseq.config import DecoderConfig, EncoderConfig, SpeechSeq2SeqConfig  # noqa: F401
from speechseq.errors import CheckpointError, ConfigError, InputError, SpeechSeqError  # noqa: F401

__version__ = "0.1.0"


# imported on first use, so that ``import speechseq.cli`` (the command) starts without jax; ``Processor`` also pulls
# in soundfile, tokenizers and sentencepiece
_LAZY = {"SpeechSeq2Seq": "speechseq.speech_seq2seq", "Processor": "speechseq.processor"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
