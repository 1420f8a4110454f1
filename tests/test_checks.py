"""Bad input is refused before any work: every row of README's "Bad input" table, run as written.

Each row holds the overrides a user types and the start of what locality answers. A row is composed through
Hydra, validated, preflighted and its data loaded (the checks before the model loads); the answer must
contain the row's text. Placeholders ($EMPTY_DIR, $SST2_JSON, ...) stand for files this module writes.
A few rows also go through the real CLI: exit 2, one paragraph, no traceback, no run directory.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf

from locality.core.config import register_resolvers
from locality.core.errors import UserError
from locality.core.paths import conf_dir
from locality.data.sources import load_splits
from locality.run.checks import min_bootstrap, preflight, validate

README = Path(__file__).parents[1] / "README.md"
register_resolvers()  # the group schemas and ${run_name:}, as `locality.train` registers them


def readme_rows() -> list[tuple[str, str]]:
    text = README.read_text()
    table = text.split("<!-- bad-input-table -->")[1] if "<!-- bad-input-table -->" in text else ""
    rows = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`"):
            rows.append((cells[0].strip("`"), cells[1].rstrip("…").strip()))
    return rows


ROWS = readme_rows()


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    (root / "junk").mkdir()
    (root / "junk" / "config.json").write_text("<html>not json</html>")
    (root / "untyped").mkdir()
    (root / "untyped" / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (root / "a_file").write_text("not a directory")
    (root / "no_weights").mkdir()
    (root / "no_weights" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    data = root / "sst2"
    data.mkdir()
    for split, n in (("train", 1500), ("validation", 100)):
        pd.DataFrame(
            {
                "sentence": [
                    f"{split} sentence {i} about a {'good' if i % 2 else 'bad'} film" for i in range(n)
                ],
                "label": [i % 2 for i in range(n)],
            }
        ).to_json(data / f"{split}.json", orient="records", lines=True)
    files = f"{{train:{data}/train.json,validation:{data}/validation.json}}"
    return {
        "$MISSING_DIR": str(root / "missing"),
        "$EMPTY_DIR": str(root / "empty"),
        "$JUNK_DIR": str(root / "junk"),
        "$UNTYPED_DIR": str(root / "untyped"),
        "$A_FILE": str(root / "a_file"),
        "$NO_WEIGHTS_DIR": str(root / "no_weights"),
        "$SST2_JSON": f"data=sst2 data.path=json data.subset=null data.data_files={files}",
    }


def substitute(text: str, places: dict[str, str]) -> str:
    for name, value in sorted(places.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(name, value)
    return text


def answer(overrides: list[str], tmp_path: Path) -> str:
    """What locality says to these overrides before loading a model (empty when it accepts them)."""
    try:
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            cfg = compose("train", overrides=[f"outputs_root={tmp_path}", *overrides])
        cfg = validate(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
        preflight(cfg)
        load_splits(cfg.data, n_probe=cfg.measure.n_probe)
    except (UserError, HydraException) as err:
        return " ".join(str(err).split())
    return ""


def test_readme_lists_at_least_30_cases():
    import re

    assert len(ROWS) >= 30
    stated = re.search(r"The (\d+) cases below are each run", README.read_text())
    assert stated and int(stated.group(1)) == len(ROWS), "README's count of bad-input cases is stale"
    assert len({row[0] for row in ROWS}) == len(ROWS), "a case is listed twice"


@pytest.mark.parametrize(("typed", "says"), ROWS, ids=[row[0][:60] for row in ROWS])
def test_every_readme_row_is_refused_with_its_message(typed, says, places, tmp_path, monkeypatch):
    if "accelerator=gpu" in typed:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    monkeypatch.setattr("locality.backbones.load_backbone", _must_not_load)
    got = answer(substitute(typed, places).split(), tmp_path)
    assert got, f"`{typed}` was accepted"
    assert substitute(says, places) in got


def _must_not_load(*args, **kwargs):
    raise AssertionError("a model was loaded before the input was checked")


def test_good_input_passes_every_check(tmp_path):
    assert answer(["model=tiny_gpt2", "control=lora", "control.lora.layers=[-1,0]"], tmp_path) == ""
    assert answer(["model=tiny_gpt2", "control=freeze", "control.freeze.bottom=4"], tmp_path) == ""


def test_bootstrap_floor_follows_the_interval():
    assert (min_bootstrap(0.95), min_bootstrap(0.9), min_bootstrap(0.99)) == (40, 20, 200)


@pytest.mark.parametrize(
    "typed",
    [
        "optim.lr=0",
        "control=lora control.lora.layers=[7] model=tiny_gpt2",
        "model=hf model.name_or_path=$EMPTY_DIR",
    ],
)
def test_cli_exits_2_with_one_paragraph_and_creates_nothing(typed, places, tmp_path):
    out = tmp_path / "outputs"
    env = {**os.environ, "LOCALITY_OUTPUTS": str(out), "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "locality.train", *substitute(typed, places).split(), "logger=none"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and re.search(r"^locality: ", proc.stderr, re.M)
    assert not out.exists(), "a refused run created its directory"


def test_a_sweep_job_that_is_refused_records_why(train, tmp_path):
    """In a sweep Hydra creates the job's directory first: the refusal goes to failed.json there."""
    run_dir = tmp_path / "sweep-job"
    run_dir.mkdir()
    with pytest.raises(UserError):
        train("optim.lr=0", f"hydra.run.dir={run_dir}")
    failed = json.loads((run_dir / "failed.json").read_text())
    assert "optim.lr=0" in failed["reason"] and failed["step"] is None
    assert not (run_dir / "results.json").exists()


def test_a_sweep_cannot_write_outside_the_outputs_root(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "LOCALITY_OUTPUTS": str(tmp_path / "out")}
    command = [sys.executable, "-m", "locality.train", "-m", "sweep_name=../../escaped", "model=tiny_gpt2"]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and "must be one plain directory name" in proc.stderr
    assert not list(tmp_path.rglob("escaped")) and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("typed", "says"),
    [
        ("measure.n_probe=100000", "too few for the probe set"),
        ("data=pydoc_topics objective=cls", "objective=cls needs a labelled dataset"),
    ],
)
def test_built_in_data_is_checked_before_the_run_directory_exists(tmp_path, typed, says):
    import os
    import subprocess
    import sys

    env = {**os.environ, "LOCALITY_OUTPUTS": str(tmp_path / "out")}
    command = [sys.executable, "-m", "locality.train", "model=tiny_gpt2", *typed.split()]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and says in " ".join(proc.stderr.split()), proc.stderr[-1500:]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("env", "value", "says"),
    [
        ("LOCALITY_PRETRAIN_STEPS", "abc", "$LOCALITY_PRETRAIN_STEPS='abc' must be a whole number"),
        ("LOCALITY_PRETRAIN_STEPS", "0", "model.pretrain needs steps >= 1"),
        ("LOCALITY_CACHE", "/dev/null", "$LOCALITY_CACHE='/dev/null' cannot hold locality's cache"),
        ("LOCALITY_CACHE", "$READ_ONLY/cache", "cannot hold locality's cache: files cannot be created"),
    ],
)
def test_environment_settings_are_checked_before_any_work(tmp_path, monkeypatch, env, value, says):
    import os

    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o500)
    if os.geteuid() == 0 and "READ_ONLY" in value:
        pytest.skip("root writes into read-only directories")
    value = value.replace("$READ_ONLY", str(read_only))
    monkeypatch.setenv(env, value)
    monkeypatch.setattr("locality.backbones.load_backbone", _must_not_load)
    assert says in answer(["model=tiny_gpt2"], tmp_path)


def test_an_outputs_root_through_a_symlink_loop_is_refused(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    says = answer(["model=tiny_gpt2", f"outputs_root={tmp_path / 'loop'}"], tmp_path)
    assert "cannot hold run outputs: it cannot be resolved (Symlink loop" in says


def test_measurement_estimates_count_each_part_from_the_shape():
    from locality.core import estimates

    measure = OmegaConf.create(
        {
            "n_probe": 512,
            "pooling": "tokens",
            "token_positions": 8,
            "metrics": ["cosine", "cka_debiased"],
            "cross_layer": False,
            "ntk": True,
            "ntk_examples": 100,
            "ntk_params": "blocks",
        }
    )
    parts = estimates.measurement_bytes(measure, estimates.Shape(width=64, n_blocks=4, n_params=10**6))
    rows = 512 * 8
    assert parts == {
        "captured features (n_probe, pooling, token_positions)": 2 * rows * 64 * 5 * 4,
        "Gram-metric work (n_probe, pooling, token_positions)": 10 * rows**2 * 8,
        "NTK kernels (ntk_examples)": 4 * 100**2 * 8,
    }
    measure.metrics = ["cosine"]
    assert len(estimates.measurement_bytes(measure, estimates.Shape(64, 4, 10**6))) == 2  # no Gram metric


def test_a_long_ntk_is_announced_once_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("locality.core.estimates.flops_per_second", lambda: 1e6)  # a slow machine
    overrides = ["model=tiny_gpt2", "measure.ntk=true", "trainer.accelerator=cpu"]
    assert answer(overrides, tmp_path) == "" and answer(overrides, tmp_path) == ""
    said = capsys.readouterr().err
    assert said.count("locality: measure.ntk on 32 examples will take roughly") == 1
