"""The empirical NTK at initialization, per block: `python -m locality.ntk [train overrides] [ntk.key=value]`.

The model, objective and controls are built as `locality.train` builds them (same config, `conf/train.yaml`),
then the kernel (`locality.measure.ntk`) is computed on the first `ntk.n_examples` training examples, before
any training, in eval mode with eager attention (forward-mode AD has no SDPA rule), over the objective's
outputs:

- `cls`: the class logits (O = number of classes);
- `clm`, `mlm`, `tok`: the mean log-probability of the target tokens of each example (O = 1; clm: every
  next token, mlm: the masked tokens, tok: every tagged token). A vocabulary-sized O would be impractical.

`ntk.params`: `all` (every trainable parameter after the controls, task head included), `blocks` (trainable
parameters of the blocks), `lora` (the LoRA adapters; needs control=lora). The kernel is split over the
partition block_00 ... block_{L-1} plus the other parts (embeddings, final_norm, head): K = sum of the parts.

ntk.json holds the whole kernel's eigenvalues, trace and condition number, and per block (a depth profile in
the canonical layer names): trace, trace share, own lambda_min, and the lambda_min gain
lambda_min(K) - lambda_min(K - K_block) (see `group_contributions`). It is written into the directory the
training run of the same config uses (`<outputs_root>/runs/<run name>/ntk.json`; the `ntk` settings are not
part of the run's identity), replacing an earlier ntk.json.

`ntk.select=k` picks k blocks for LoRA: greedy forward selection, each step adding the block whose kernel
raises lambda_min of (the kernel of the non-block trainable parameters, e.g. a new head, + the blocks chosen
so far) the most (ties to the larger trace), and prints the `control.lora.layers=[...]` override.
A training run takes the same profile with `measure.ntk=true` (`locality.instrument.ntk_profile`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from locality.core.errors import UserError
from locality.instrument.ntk_profile import PARAMS, format_summary, ntk_profile
from locality.measure.ntk import (
    DEFAULT_BUDGET,
    METHODS,
)


@dataclass
class NtkConf:
    n_examples: int = 32  # the first n training examples
    params: str = "all"  # all | blocks | lora
    select: int = 0  # > 0: rank blocks and print a control.lora.layers override with this many
    method: str = "auto"  # auto | jacobian | vp (see locality.measure.ntk)
    memory_gb: float = DEFAULT_BUDGET / 2**30  # memory budget of one Jacobian chunk
    example_chunk: int = 1  # examples per forward


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="ntk", name="default", node=NtkConf)


def compose_config(overrides: list[str]):
    """The training config (as `locality.train` composes it) and the `ntk` settings, apart."""
    from omegaconf import OmegaConf

    from locality.core.config import compose_train

    register()
    cfg = compose_train(["+ntk=default", *overrides])
    ntk = NtkConf(**OmegaConf.to_container(cfg.ntk))
    train_cfg = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "ntk"])
    if ntk.params not in PARAMS or ntk.method not in METHODS:
        raise UserError(
            f"ntk.params must be one of {', '.join(PARAMS)} and ntk.method one of {', '.join(METHODS)}; "
            f"got params={ntk.params!r}, method={ntk.method!r}."
        )
    if ntk.n_examples < 1 or ntk.select < 0 or ntk.memory_gb <= 0 or ntk.example_chunk < 1:
        raise UserError(
            "ntk.n_examples and ntk.example_chunk must be >= 1, ntk.select >= 0, ntk.memory_gb > 0."
        )
    return train_cfg, ntk


def build_module(cfg):
    """Data, backbone, objective, controls and module, exactly as `locality.train` builds them."""
    from hydra.utils import instantiate

    from locality.run.assembly import assemble
    from locality.run.checks import preflight, validate
    from locality.run.module import LocalityModule

    cfg = validate(cfg)
    controls = preflight(cfg).controls
    parts = assemble(cfg)
    optimizer, scheduler = instantiate(cfg.optim), instantiate(cfg.scheduler)
    module = LocalityModule(parts.backbone, parts.objective, optimizer, scheduler, controls)
    module.configure_model()
    return module, parts.splits


def main(argv: list[str] | None = None) -> int:
    from locality.run.command import run_command

    return run_command(__doc__, ntk, argv)


def ntk(overrides: list[str]) -> int:
    from omegaconf import OmegaConf

    from locality.core.identity import run_name
    from locality.core.integrity import write_json_atomic

    cfg, settings = compose_config(overrides)
    run_dir = Path(cfg.outputs_root) / "runs" / run_name(cfg)
    module, splits = build_module(cfg)
    examples = splits.train[: settings.n_examples]
    if len(examples) < settings.n_examples:
        raise UserError(f"ntk.n_examples={settings.n_examples} but the training split has {len(examples)}.")
    torch.manual_seed(cfg.seed)  # mlm's masking
    result = ntk_profile(
        module,
        examples,
        settings.params,
        settings.select,
        settings.method,
        int(settings.memory_gb * 2**30),
        settings.example_chunk,
    )
    result["settings"] = OmegaConf.to_container(OmegaConf.structured(settings))
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "ntk.json", result)
    print(format_summary(result))
    if "select" in result:
        print(f"control=lora control.lora.layers=[{','.join(map(str, result['select']['layers']))}]")
    print(f"\nntk: {run_dir / 'ntk.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
