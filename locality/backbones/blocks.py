"""Find a model's ordered residual blocks: the longest `nn.ModuleList` of same-class modules (or `blocks_path`)."""

from __future__ import annotations

from torch import nn

from locality.core.errors import UserError


def find_blocks(base: nn.Module, blocks_path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The residual blocks of a base model: `blocks_path` if given, else the longest same-class ModuleList."""
    if blocks_path:
        try:
            blocks = base.get_submodule(blocks_path)
        except AttributeError as err:
            raise UserError(
                f"model.blocks_path='{blocks_path}' names no submodule of {type(base).__name__}. "
                f"ModuleLists it has: {_module_lists(base)}."
            ) from err
        return blocks_path, blocks
    candidates = [
        (name, m)
        for name, m in base.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1
    ]
    if not candidates:
        raise UserError(
            f"Could not find the residual blocks of {type(base).__name__}: it has no ModuleList of "
            "same-class modules. Set model.blocks_path to the attribute path of its block list."
        )
    name, blocks = max(candidates, key=lambda c: (len(c[1]), -c[0].count(".")))
    return name, blocks


def _module_lists(base: nn.Module) -> list[str]:
    return [name for name, m in base.named_modules() if isinstance(m, nn.ModuleList)]
