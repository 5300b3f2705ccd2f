"""User-facing errors: every message is one line naming the file, field or argument and what was expected."""


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
