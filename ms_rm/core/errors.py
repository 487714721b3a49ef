"""The errors ms_rm raises on purpose.

Every error a user can meet is one of these, with a message that names the file, key or
argument at fault and says what to do. The CLI prints them as one line; anything else that
escapes is a bug.
"""


class MsRmError(Exception):
    """Base class of every error ms_rm raises on purpose."""


class ConfigError(MsRmError, ValueError):
    """A config file or config value is missing, malformed or contradicts itself."""


class CheckpointError(MsRmError):
    """A checkpoint file is missing, unreadable, corrupt, or does not fit the model."""


class InputError(MsRmError, ValueError):
    """A call received an argument of the wrong shape, dtype or range."""


class MissingDependencyError(MsRmError, ImportError):
    """An optional dependency (torch, for reading .pt files) is not installed."""
