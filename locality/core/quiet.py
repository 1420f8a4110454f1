"""Keep the terminal for progress and results: library chatter (transformers, Lightning) down to warnings."""

from __future__ import annotations


def quiet_libraries() -> None:
    """Keep the terminal for progress and the profile: library chatter goes to warnings level."""
    import logging
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*(LeafSpec|does not have many workers|litlogger).*")
