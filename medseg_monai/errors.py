"""Errors a user can fix, and how they are shown: one line, on stderr and in the log."""

from __future__ import annotations

import logging
import re
from typing import Any

__all__ = ["InputError", "OneLineInputErrorFormatter", "RunInterrupted", "is_input_error", "redact"]

_CREDENTIALS = re.compile(r"(?<=://)[^/\s?#]*@")  # the user:password@ of a URL


def redact(text: str) -> str:
    """``text`` with the ``user:password@`` of every URL in it shown as ``***@``: a tracking URI's
    credentials (``MLFLOW_TRACKING_URI=http://user:password@host``) never reach a log or error line."""
    return _CREDENTIALS.sub("***@", text)


class InputError(Exception):
    """Bad input (a missing checkpoint, an unreadable file, a wrong setting). The message is one line
    that names the file, key or value at fault; bundle runs print it as ``error: <message>``."""


class RunInterrupted(Exception):
    """A training stopped by a signal (SIGTERM, SIGINT) after saving what ``--resume true`` needs;
    bundle runs print it as one ``error:`` line and exit non-zero."""


def is_input_error(exc: BaseException | None) -> BaseException | None:
    """The first exception in ``exc``'s chain that a user fixes (``InputError``, ``RunInterrupted``, an
    unreadable file), or None: MONAI wraps what fails in a config or a transform in its own errors."""
    from nibabel.filebasedimages import ImageFileError

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (InputError, RunInterrupted, OSError, ImageFileError)):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class OneLineInputErrorFormatter(logging.Formatter):
    """A log formatter that shows an input error as its one-line message instead of the traceback
    MONAI's handlers log with it, so the log says what stderr's ``error:`` line says; any other
    exception keeps its traceback. ``medseg_monai.runtime.tidy_logs`` puts it on the root
    logger's handlers (MONAI refuses formatter classes from outside ``logging`` in logging.conf)."""

    def formatException(self, ei: Any) -> str:  # noqa: N802 (logging's name)
        found = is_input_error(ei[1])
        return f"error: {redact(str(found))}" if found is not None else redact(super().formatException(ei))
