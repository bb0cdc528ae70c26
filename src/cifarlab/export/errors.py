"""The error of an export that failed: exit status 4, not the user's input (2)."""

from __future__ import annotations

from cifarlab.errors import CifarlabError

#: Exit status of an export that failed or fails verification (2 is bad input, 3 a failed training).
EXIT_EXPORT_FAILED = 4


class ExportFailed(CifarlabError):
    """The exporter failed, or the export does not compute what its checkpoint computes.

    Not the user's input: exit status 4, so scripts can tell it from a bad command line (2).
    The message has the numbers.
    """

    exit_code = EXIT_EXPORT_FAILED


def first_line(exc: BaseException) -> str:
    """``TypeName: first line of the message`` (at most 200 characters), for one-line errors."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"
