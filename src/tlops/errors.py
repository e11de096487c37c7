"""Errors a user can act on. The CLI prints them as one line and exits non-zero, never a traceback."""

from __future__ import annotations


class TlopsError(Exception):
    """A problem with the user's input or environment; the message says what and what to do."""

    exit_code = 2


class GateFailed(TlopsError):
    """A check ran and said no (validation, parity); exit code 1 as for any failed check."""

    exit_code = 1
