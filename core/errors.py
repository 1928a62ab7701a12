"""One exception hierarchy for anomscan: every failure a user can cause has a class here.

Messages say what was expected, what was found and what to do.
"""

from __future__ import annotations


class AnomscanError(Exception):
    """Base class of every error anomscan raises on purpose."""


class InvalidInputError(AnomscanError, ValueError):
    """An argument, configuration or array is outside what the function accepts."""


class InputFileError(AnomscanError):
    """A data file is missing, unreadable, truncated or not a ROOT file."""


class SchemaError(AnomscanError):
    """The branches of an input do not match the requested or detected event schema."""


class FitError(AnomscanError):
    """A background or signal fit could not be performed."""


class FitDidNotConvergeError(FitError):
    """Minuit did not reach a valid minimum with accurate covariance from any start."""


class ModelError(AnomscanError):
    """An autoencoder model, its ONNX file or its model card is missing or inconsistent."""


class ToolError(AnomscanError):
    """A tool was asked for that does not exist, or its input could not be read."""


class OutputError(AnomscanError):
    """An output can not be written where asked, or a folder is not anomscan's to replace."""


class StorageError(OutputError):
    """The disk is full, a file size limit is reached, or a folder is read-only."""


class FolderInUseError(OutputError):
    """Another live process holds the lock of a run folder or event-table folder."""


class OutputInUseError(OutputError):
    """Another live process is writing the same output file or folder (its lock is held)."""
