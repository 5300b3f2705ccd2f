"""User-facing errors: every message is one line naming the file, field or argument and what was expected."""

from __future__ import annotations

import os


class SpeechSeqError(ValueError):
    """One-line, user-facing error."""


class CheckpointError(SpeechSeqError):
    """A checkpoint file or directory cannot be read as expected."""


class ConfigError(SpeechSeqError):
    """A configuration field is missing, unsupported or inconsistent."""


class InputError(SpeechSeqError):
    """An argument passed to a model function has the wrong rank, dtype or size."""


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message, or its class name when the message is empty: how a one-line error quotes
    the exception of a library (soundfile, orbax, the hub client, tokenizers), whose messages can run to many lines."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file (a manifest, a list of files), with one-line ``InputError``s naming it when it is not
    UTF-8 or cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
