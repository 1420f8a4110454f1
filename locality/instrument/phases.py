"""One line per phase of a run that prints nothing else while it works, with its elapsed time.

    locality: pre-capture of 512 probe sequences: 3.1 s (cached)

Rank zero alone prints, to stderr (beside the progress bar; stdout keeps the profile table).
"""

from __future__ import annotations

import sys

from lightning.pytorch.utilities import rank_zero_only


def announce(what: str, seconds: float, note: str | None = None) -> None:
    if rank_zero_only.rank != 0:
        return
    print(f"locality: {what}: {seconds:.1f} s" + (f" ({note})" if note else ""), file=sys.stderr, flush=True)
