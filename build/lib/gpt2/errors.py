"""User-facing errors: a mistake in a config value, a path or a file, reported as one line.

Library code raises `UserError` (a ValueError) with a message that names the problem and the fix; the
command-line entry points print it as `error: <message>` and exit with status 2. Anything else is a bug and
keeps its traceback. Set GPT2_DEBUG=1 to see tracebacks for user errors too.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class UserError(ValueError):
    """Bad input from the user: config values, paths, corrupt files, prompts."""


def exit_on_user_error(fn: F) -> F:
    """Wrap a CLI function: a UserError becomes one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if os.environ.get("GPT2_DEBUG"):
                raise
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
