"""User mistakes (bad config, data, paths, options): one clear message, exit code 2, no traceback.

Library code raises ``UserError`` (a ``ValueError``) with a message that names the bad key, file,
record or value and says what is valid. Entry points (``dlo ...``, ``recipes/*.py``) run their main
function through ``run_entry_point``, which prints such errors as ``<prog>: error: <message>`` and
returns exit code 2. ``DLO_DEBUG=1`` (or ``--debug`` where a command offers it) re-raises instead,
so a real bug keeps its traceback.

An ``OSError`` that names a file (permission denied, read-only file system, disk full) is one such line too,
naming the path and what the system said. Legal but suspicious input (an expansion that leaves base layers
unused, a capacity at which a layer runs almost nothing, duplicate training records) is a ``DloWarning``: a
Python warning, so library users filter it as any other; under an entry point it is printed as
``<prog>: warning: <message>``, once, by the first process of a machine, and the command goes on.
"""

from __future__ import annotations

import errno
import os
import sys
import warnings
from collections.abc import Callable

EXIT_USER_ERROR = 2
# Exceptions that carry a message meant for the user. A ValueError from deep inside a dependency can be a
# user mistake too (a bad dtype string, a malformed JSON file); its message is shown as is.
# OSError covers what the system refuses (permission, a read-only or full disk, /proc): the path says what to fix.
USER_ERRORS = (ValueError, OSError, KeyError)
# What the system's complaint means for the user, by errno.
OS_ERROR_HINTS = {
    errno.ENOSPC: "the disk is full: free space or write elsewhere",
    errno.EDQUOT: "the disk quota is exhausted: free space or write elsewhere",
    errno.EFBIG: "a file would exceed the file size limit: raise ulimit -f or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.EACCES: "no permission: write elsewhere or change the permissions",
    errno.EPERM: "not permitted: write elsewhere",
}
# Kernel file systems: a path under them is never a place for a model or a report.
KERNEL_FILESYSTEMS = ("/proc", "/sys")


class UserError(ValueError):
    """A mistake in what the user gave: shown as one line, never as a traceback."""


class DloWarning(UserWarning):
    """Input dlo accepts but that is probably not what the user meant; the work goes on."""


def warn(message: str):
    """Emit ``message`` as a ``DloWarning`` attributed to the caller's caller (the user's call)."""
    warnings.warn(message, DloWarning, stacklevel=3)


def kernel_filesystem(path: str) -> str | None:
    """``/proc`` or ``/sys`` when the absolute ``path`` lies under one of them, else None."""
    return next((root for root in KERNEL_FILESYSTEMS if path == root or path.startswith(root + os.sep)), None)


def describe_os_error(err: OSError, path: str | None = None) -> str:
    """One line for an OSError: the path (``path``, e.g. the output the user named, else the error's own), what
    the system said and, where it helps, what to do about it."""
    where = path or err.filename
    if where is None:
        return str(err)
    return f"{os.fspath(where)}: {os_error_reason(err, os.fspath(where))}"


def os_error_reason(err: OSError, path: str) -> str:
    """What the system said about ``path`` and, where it helps, what to do about it."""
    root = kernel_filesystem(os.path.abspath(path))
    hint = (f"{root} is the kernel's virtual file system; write to a directory on disk" if root
            else OS_ERROR_HINTS.get(err.errno))
    return (err.strerror or str(err)) + (f" ({hint})" if hint else "")


def debug_enabled() -> bool:
    return os.environ.get("DLO_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def run_entry_point(main: Callable[[], int | None], prog: str, debug: bool = False) -> int:
    """Run ``main``; user errors become ``prog: error: message`` on stderr and exit code 2, dlo's warnings
    ``prog: warning: message``."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("once", category=DloWarning)  # the same complaint once, whoever repeats it
            warnings.showwarning = _one_line_warnings(prog, warnings.showwarning)
            return main() or 0
    except USER_ERRORS as err:
        if debug or debug_enabled():
            raise
        if isinstance(err, KeyError) and err.args:
            message = err.args[0]
        elif isinstance(err, OSError):
            message = describe_os_error(err)
        else:
            message = err
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR


def _one_line_warnings(prog: str, show: Callable) -> Callable:
    """A ``warnings.showwarning`` printing a DloWarning as one line (no source line), by the first process of a
    machine only (every process of a launch checks the same input); other warnings go to ``show``."""

    def show_warning(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, DloWarning):
            return show(message, category, filename, lineno, file, line)
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print(f"{prog}: warning: {message}", file=sys.stderr, flush=True)

    return show_warning
