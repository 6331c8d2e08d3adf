"""Errors medseg raises for bad input.

Every message says what is wrong, names the file, case or value, says what was
expected and how to fix it. Each class also subclasses the matching builtin, so
``except ValueError`` in a user's script keeps working. The CLI prints a
:class:`MedsegError` as one line and exits with status 2.
"""

from __future__ import annotations


class MedsegError(Exception):
    """Base class of every error medseg raises for bad input or bad settings."""


class ConfigError(MedsegError, ValueError):
    """A config file, ``--set`` override or argument is invalid."""


class ScanReadError(MedsegError, ValueError):
    """A scan file or DICOM folder cannot be read exactly (corrupt, truncated, unsupported)."""


class DicomSeriesError(ScanReadError):
    """A DICOM folder does not hold exactly one regular, untilted series."""


class GeometryError(MedsegError, ValueError):
    """A geometry is missing, inconsistent, or does not match what was expected."""


class DatasetError(MedsegError, ValueError):
    """A dataset folder has problems (all of them are listed in the message)."""


class CheckpointError(MedsegError, ValueError):
    """A checkpoint or model folder is corrupt, unsafe, or does not match the run."""


class OutputExistsError(MedsegError, FileExistsError):
    """An output file exists (pass ``overwrite=True`` / ``--overwrite``) or would replace an input."""


class ArrayValueError(MedsegError, ValueError):
    """An array given to medseg holds invalid values (fractional/negative labels, NaN/Inf, unsupported dtype)."""


class OutputWriteError(MedsegError, OSError):
    """An output file cannot be written (missing or read-only folder, disk full, failed check)."""


class TrainingError(MedsegError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN/Inf)."""
