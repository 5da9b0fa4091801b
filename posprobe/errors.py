"""Errors raised by posprobe.

Owns the exception hierarchy. Every message says what happened, why, and what to do about it, so that a user
never has to read a traceback from inside torch or transformers to understand a mistake in their input.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PosprobeError(Exception):
    """Base class of every error posprobe raises on purpose."""


class UnknownNameError(PosprobeError, KeyError):
    """A name (model, probe, task, metric, intervention) is not one posprobe knows."""

    def __init__(self, kind: str, name: str, valid: Iterable[str], hint: str = "") -> None:
        valid = sorted(valid)
        close = difflib.get_close_matches(str(name), valid, n=1)
        suggestion = f" Did you mean {close[0]!r}?" if close else ""
        message = (f"Unknown {kind} {name!r}.{suggestion} Valid {kind}s: {', '.join(valid)}."
                   f"{(' ' + hint) if hint else ''}")
        super().__init__(message)
        self.kind, self.name, self.valid = kind, name, valid

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


class ModelLoadError(PosprobeError):
    """A model could not be loaded or wrapped."""


class MissingDependencyError(ModelLoadError, ImportError):
    """An optional package is needed for what was asked and is not installed."""

    def __init__(self, what: str, install: str) -> None:
        super().__init__(f"{what} needs a package that is not installed. Install it with:\n    {install}")
        self.install = install


class UnsupportedModelError(ModelLoadError, TypeError):
    """The object or architecture is not something posprobe can probe."""


class InputError(PosprobeError, ValueError):
    """The input ids, positions or lengths given to a run are invalid for this model."""


class ProbeError(PosprobeError):
    """A probe cannot run with the given configuration or model."""


class ScanFormatError(PosprobeError):
    """A saved scan directory is missing, corrupted or of an incompatible format."""


class InterventionError(PosprobeError):
    """An intervention cannot be applied as configured."""


class OutputPathError(PosprobeError, ValueError):
    """An output path cannot or must not be written (an existing file, a foreign directory, no permission)."""


class MemoryBudgetError(PosprobeError, MemoryError):
    """A pass would not fit in the free memory of its device (estimated before running it; nothing was run)."""


class ContextLengthError(InputError):
    """A sequence (prompt plus generated tokens) is longer than the model supports.

    Raised by the access while running that sequence; `evaluate_positions` records it for the one trial whose
    prompt is too long and goes on (unlike other posprobe errors, which stop the run).
    """
