"""The parts every run is built from, in the order every run builds them: seed, then the data (a split too
small or labels that cannot be encoded are refused before any weights load), then the backbone (its family
checked against the objective first), then the objective. Training, the NTK command and the benchmarks share it.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
from omegaconf import DictConfig

from locality.backbones import Backbone, load_backbone, peek_family
from locality.core.config import ModelConf
from locality.data.sources import Splits, load_splits
from locality.objectives import Objective, Task, build_objective, objective_class


@dataclass
class Parts:
    splits: Splits
    backbone: Backbone
    objective: Objective


def assemble(cfg: DictConfig) -> Parts:
    """Seeded data, backbone and objective for a validated config."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    splits = load_splits(cfg.data, n_probe=cfg.measure.n_probe)
    spec = ModelConf(**cfg.model)
    objective_cls = objective_class(cfg.objective, family=peek_family(spec))
    backbone = load_backbone(spec, objective_cls.head_kind, require=objective_cls.check_family)
    objective = build_objective(cfg.objective, backbone, Task(tuple(splits.label_names)))
    return Parts(splits, backbone, objective)
