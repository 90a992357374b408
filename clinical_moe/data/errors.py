"""The one error type every file loader raises, so callers can skip bad files and count why.

A loader that meets a file it cannot use raises :class:`LoaderError` carrying the offending path and a
short machine-readable ``reason`` code. The preprocessing cache catches it, records the reason, and
moves on; everything else (a bug, a keyboard interrupt) still propagates.
"""

from __future__ import annotations

import importlib
from os import PathLike
from types import ModuleType

#: Reason codes in use. The list documents the vocabulary; it is not enforced, so a new loader can
#: add a code without touching this module.
REASONS: dict[str, str] = {
    "missing_file": "the file (or a file it points to, e.g. a .dat) does not exist",
    "corrupt": "the file exists but is not what its name says (not a DICOM, undecodable bytes)",
    "truncated": "the file ends before the data it announces",
    "bad_header": "header or metadata fields are missing, malformed or inconsistent",
    "wrong_rate": "the sampling rate is missing or not positive",
    "wrong_duration": "the header's rate x length gives less signal than a study must have",
    "nan_signal": "too much of the signal is missing (NaN)",
    "unknown_leads": "the ECG lead names cannot be mapped onto the 12 standard leads",
    "decode_unavailable": "the compression needs an optional decoder that is not installed",
    "unsupported": "a valid file of a kind this loader does not handle (colour, multi-frame)",
    "missing_column": "a table lacks a required column",
    "empty": "a table has no rows",
    "bad_value": "a table holds values that cannot be parsed",
}


class LoaderError(ValueError):
    """A file could not be loaded.

    Attributes:
        path: The file at fault, as a string.
        reason: Short code naming the kind of failure (see :data:`REASONS`), used to count skips.
        detail: Human-readable explanation, without the path.
    """

    def __init__(self, path: str | PathLike[str], reason: str, detail: str):
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{self.path}: {detail} [reason={reason}]")

    def __reduce__(self):
        # Keeps the error picklable, so it survives being raised in a worker process.
        return (type(self), (self.path, self.reason, self.detail))


def import_optional(module: str, pip_name: str | None = None, purpose: str = "") -> ModuleType:
    """Import a heavy optional dependency, or fail with an install hint.

    Args:
        module: Dotted module name, e.g. ``"pydicom"``.
        pip_name: The distribution to install when it differs from the module name.
        purpose: What the caller needs it for, quoted in the error.

    Raises:
        ImportError: Naming the package and the ``pip install`` line that provides it.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        what = f" to {purpose}" if purpose else ""
        raise ImportError(
            f"{module} is needed{what}: pip install {pip_name or module} "
            f'(or pip install "clinical-moe")'
        ) from err
