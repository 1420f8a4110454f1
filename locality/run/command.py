"""The shared shape of locality's command lines that take Hydra overrides without being a Hydra app
(`locality.plan`, `locality.pretrain`, `locality.ntk`): `-h`/`--help` prints the command's module docstring,
the libraries' start-up chatter is quieted, and a user error is one paragraph and exit 2 (as in
`locality.train`), never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from locality.core.errors import EXIT_USER_ERROR, UserError, report
from locality.core.quiet import quiet_libraries


def run_command(doc: str, body: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    """Run `body(overrides)` as a command line; returns the exit status."""
    overrides = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in overrides):
        print(doc)
        return 0
    quiet_libraries()
    try:
        return body(overrides)
    except UserError as err:
        report(err)
        return EXIT_USER_ERROR
