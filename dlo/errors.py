"""User mistakes (bad config, data, paths, options): one clear message, exit code 2, no traceback.

Library code raises ``UserError`` (a ``ValueError``) with a message that names the bad key, file,
record or value and says what is valid. Entry points (``dlo ...``, ``recipes/*.py``) run their main
function through ``run_entry_point``, which prints such errors as ``<prog>: error: <message>`` and
returns exit code 2. ``DLO_DEBUG=1`` (or ``--debug`` where a command offers it) re-raises instead,
so a real bug keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

EXIT_USER_ERROR = 2
# Exceptions that carry a message meant for the user. A ValueError from deep inside a dependency can be a
# user mistake too (a bad dtype string, a malformed JSON file); its message is shown as is.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, KeyError)


class UserError(ValueError):
    """A mistake in what the user gave: shown as one line, never as a traceback."""


def debug_enabled() -> bool:
    return os.environ.get("DLO_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def run_entry_point(main: Callable[[], int | None], prog: str, debug: bool = False) -> int:
    """Run ``main``; user errors become ``prog: error: message`` on stderr and exit code 2."""
    try:
        return main() or 0
    except USER_ERRORS as err:
        if debug or debug_enabled():
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
