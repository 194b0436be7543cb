"""Errors a user can act on. Each message says what was wrong and what to do."""


class SadagError(Exception):
    """Base class: the CLI prints these as one clean message instead of a traceback."""


class ConfigError(SadagError, ValueError):
    """A configuration value is out of range or inconsistent."""


class ModelError(SadagError):
    """Unknown model name, or weights that do not fit the model."""


class ExportFormatError(ModelError):
    """An export that cannot be written, is not a sadag export, or whose tensors do not fit its metadata."""


class DataError(SadagError):
    """Missing, empty or unreadable image data."""


class NumericalError(SadagError):
    """A loss became NaN or infinite."""
