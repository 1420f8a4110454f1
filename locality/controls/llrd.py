"""Layer-wise learning-rate decay: block l trains at lr * decay^(L-1-l), embeddings at lr * decay^L.

The head and the final norm keep the base learning rate. A common practice (ELECTRA, BEiT) that shapes
the depth profile by construction; compare it with the equal-step control, which shapes the step.
"""

from __future__ import annotations

from locality.controls.base import Control


class LayerwiseLRDecay(Control):
    name = "llrd"
    supports_sharding = True

    def __init__(self, decay: float = 0.8):
        if not 0 < decay <= 1:
            raise ValueError(f"llrd decay must be in (0, 1], got {decay}")
        self.decay = decay
        self.scales: dict[str, float] = {}

    def param_groups(self, module, groups: list[dict]) -> list[dict]:
        n = len(module.blocks)
        scale_of = {}
        for i, block in enumerate(module.blocks):
            for p in block.parameters():
                scale_of[id(p)] = self.decay ** (n - 1 - i)
        if "embeddings" in module.parts:
            for p in module.parts["embeddings"].parameters():
                scale_of[id(p)] = self.decay**n
        base_lr = module.optimizer_settings["lr"]
        out = []
        for group in groups:
            by_scale: dict[float, list] = {}
            for p in group["params"]:
                by_scale.setdefault(scale_of.get(id(p), 1.0), []).append(p)
            for scale, params in sorted(by_scale.items()):
                out.append({**group, "params": params, "lr": base_lr * scale})
        self.scales = {f"block_{i:02d}": self.decay ** (n - 1 - i) for i in range(n)}
        return out

    def summary(self) -> dict:
        return {"decay": self.decay, "lr_scale": self.scales}
