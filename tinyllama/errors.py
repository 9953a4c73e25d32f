"""Errors a user can cause and fix. The CLI prints them as one clear message (no traceback)."""


class TinyLlamaError(Exception):
    """Base class: the message says what is wrong and what to do about it."""


class ConfigError(TinyLlamaError, ValueError):
    """A config value or combination is invalid."""


class DataError(TinyLlamaError):
    """Input text, a tokenizer or packed data is missing, empty, too small or mismatched."""


class CheckpointError(TinyLlamaError):
    """A checkpoint is missing, incomplete, corrupt or incompatible."""
