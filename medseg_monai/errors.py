"""The suite's input error: bad input that a user can fix, reported in one line."""

from __future__ import annotations

__all__ = ["InputError", "RunInterrupted"]


class InputError(Exception):
    """Bad input (a missing checkpoint, an unreadable file, a wrong setting). The message is one line
    that names the file, key or value at fault; bundle runs print it as ``error: <message>``."""


class RunInterrupted(Exception):
    """A training stopped by a signal (SIGTERM, SIGINT) after saving what ``--resume true`` needs;
    bundle runs print it as one ``error:`` line and exit non-zero."""
