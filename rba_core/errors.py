"""Errors a user can cause. Each message names the input at fault and how to fix it."""


class RbaError(Exception):
    """Base class: the command line prints these as one line instead of a traceback."""


class CheckpointError(RbaError):
    """A checkpoint folder or file is missing, corrupt, or does not match the model."""


class ConfigError(RbaError, ValueError):
    """A configuration field is missing, of the wrong type, or out of range."""


class AudioError(RbaError):
    """An audio file cannot be read or is not usable as speech input."""


class AudioTooLong(AudioError):
    """An audio file is longer than its consumer takes (known from its header, before it is
    decoded)."""


class TokenizerError(RbaError):
    """Tokenizer files are missing or incompatible (for example a teacher with another vocabulary)."""


class ConversionError(RbaError):
    """A source model file (GGUF, CTranslate2) cannot be converted."""
