"""`python -m locality.pretrain model=tiny_<family> [model.pretrain.steps=N] [force=true]`: pretrain a tiny preset.

The recipe and the cache are `locality.backbones.pretrained` (a tiny preset's first fine-tuning run pretrains
it there too); this command only composes the config, validates it and pretrains or reports the cached entry.
"""

from __future__ import annotations

import sys

from locality.backbones import load_tokenizer, peek_family
from locality.backbones.pretrained import pretrained_checkpoint, summary_line
from locality.core.config import ModelConf, compose_train
from locality.core.errors import UserError
from locality.run.checks import validate
from locality.run.command import run_command


def main(argv: list[str] | None = None) -> int:
    return run_command(__doc__, pretrain, argv)


def pretrain(overrides: list[str]) -> int:
    if not any(a.startswith("model=") for a in overrides):
        raise UserError(
            "Name the preset to pretrain: `python -m locality.pretrain model=tiny_gpt2` (any "
            "tiny_* preset; `model.pretrain.steps=N` etc. change the recipe, force=true redoes it)."
        )
    cfg = validate(compose_train(overrides))
    spec = ModelConf(**cfg.model)
    if spec.arch is None:
        raise UserError(
            f"model={spec.name} loads a checkpoint ({spec.name_or_path}); locality.pretrain "
            "pretrains presets built from a config: tiny_* (e.g. model=tiny_gpt2)."
        )
    tokenizer = load_tokenizer(spec, None)
    result = pretrained_checkpoint(spec, tokenizer, peek_family(spec), force=bool(cfg.force))
    if not result.trained_now:
        print(f"{spec.name}: cached (no pretraining) at {result.path}")
        print(summary_line(spec.name, result.info))
    print(f"init_from: pretrained:{result.key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
