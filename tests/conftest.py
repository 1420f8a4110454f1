"""Shared fixtures: an isolated cache and outputs dir, no network, and an in-process `train` runner."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# tiny_* presets start from an offline-pretrained checkpoint (locality.pretrain), pretrained on first use into the
# session's cache: a few steps keep that fast while every test still takes the real path (the step count is part
# of the cache key, so this never touches a real checkpoint). tests/test_pretrain.py raises it where it matters.
os.environ.setdefault("LOCALITY_PRETRAIN_STEPS", "8")

FAST = [
    "trainer=smoke",
    "measure=fast",
    "logger=none",
    "data.batch_size=4",
    "data.eval_batch_size=32",
    "data.n_validation=16",
    "objective.max_length=32",
]


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    os.environ["LOCALITY_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def train(tmp_path):
    """Compose the real Hydra config with overrides and run one training job in-process; returns results."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    from locality.core.paths import conf_dir
    from locality.train import run

    def _train(*overrides: str, fast: bool = True) -> dict:
        all_overrides = [*(FAST if fast else []), f"outputs_root={tmp_path}", *overrides]
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            cfg = compose("train", overrides=all_overrides, return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)  # run.dir resolves through ${hydra:...}
            with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
                cfg.hydra.runtime.output_dir = str(cfg.hydra.run.dir)
            HydraConfig.instance().set_config(cfg)
            return run(cfg)

    return _train


def RunIf(min_gpus: int = 1, bf16: bool = False):  # noqa: N802 (named like lightning-hydra-template's helper)
    """Marks a test `gpu` and skips it unless this machine has `min_gpus` CUDA devices (and bf16 on them):

        @RunIf(min_gpus=2)
        def test_on_two_gpus(): ...

    `pytest -m gpu` selects these tests; without CUDA every one is skipped, with the reason."""
    import torch

    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    reasons = []
    if found < min_gpus:
        reasons.append(f"needs {min_gpus} CUDA device{'s' if min_gpus > 1 else ''}, found {found}")
    if bf16 and found and not torch.cuda.is_bf16_supported():
        reasons.append("needs bf16 on the GPU")
    skip = pytest.mark.skipif(bool(reasons), reason="; ".join(reasons) or "runs")

    def mark(test):
        return pytest.mark.gpu(skip(test))

    return mark


def double_gpt2(attn: str = "eager"):
    """A 2-block, width-16 GPT-2 LM in float64, eval mode, seeded: for checks against exact derivatives."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=16,
        n_head=2,
        n_positions=16,
        vocab_size=40,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation=attn,
    )
    return GPT2LMHeadModel(config).double().eval()
