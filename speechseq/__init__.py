"""speechseq: speech encoder-decoder models (Wav2Vec2/HuBERT + BERT/RoBERTa/GPT-2/BART/mBART) as pure JAX functions."""

from speechseq.config import DecoderConfig, EncoderConfig, SpeechSeq2SeqConfig  # noqa: F401
from speechseq.errors import CheckpointError, ConfigError, InputError, SpeechSeqError  # noqa: F401

__version__ = "0.1.0"


def __getattr__(name: str):
    # imported on first use, so that ``import speechseq.cli`` (the command) starts without jax
    if name == "SpeechSeq2Seq":
        from speechseq.speech_seq2seq import SpeechSeq2Seq

        return SpeechSeq2Seq
    if name == "Processor":  # also pulls in soundfile, tokenizers and sentencepiece
        from speechseq.processor import Processor

        return Processor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "SpeechSeq2Seq", "Processor"])
