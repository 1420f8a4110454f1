"""User-facing errors: one exception type for mistakes a user can fix, reported as one clear paragraph.

Anything raised as `UserError` before training starts is printed without a traceback and the run
exits with status 2 (set HYDRA_FULL_ERROR=1 to see the traceback). Everything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import os
import sys
import textwrap

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's configuration or environment, explained in plain words."""


def report(error: UserError) -> None:
    """Print a user error as one wrapped paragraph on stderr."""
    text = " ".join(str(error).split())
    print("\n" + textwrap.fill(f"locality: {text}", width=100) + "\n", file=sys.stderr)


def wants_traceback() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"
