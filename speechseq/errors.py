"""User-facing errors: every message is one line naming the file, field or argument and what was expected."""


class SpeechSeqError(ValueError):
    """One-line, user-facing error."""


class CheckpointError(SpeechSeqError):
    """A checkpoint file or directory cannot be read as expected."""


class ConfigError(SpeechSeqError):
    """A configuration field is missing, unsupported or inconsistent."""


class InputError(SpeechSeqError):
    """An argument passed to a model function has the wrong rank, dtype or size."""
