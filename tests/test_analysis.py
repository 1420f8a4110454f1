"""The analysis groups runs by their full identity: replicates are pooled, different settings never are."""

from __future__ import annotations

from locality.analysis.aggregate import layers_table, runs_table
from locality.analysis.summary import summary_markdown


def result(seed: int, control: str, setting: str, slope: float) -> dict:
    config = f"{setting}{control[0]}"
    return {
        "schema": "locality.results/1",
        "_path": f"/runs/{config}-s{seed}",
        "run": {
            "name": f"m-cls-{control}-s{seed}-{config}",
            "model": "m",
            "family": "decoder",
            "block_type": "sequential",
            "objective": "cls",
            "control": control,
            "seed": seed,
            "config_hash": config,
            "setting_hash": setting,
        },
        "depth": [0.0, 0.5, 1.0],
        "change": {"cosine": [0.0, slope / 2, slope]},
        "profile": {
            "cosine": {"slope": slope, "slope_ci": [slope - 0.1, slope + 0.1], "steepness": 1.0, "width": 0.5}
        },
        "init": {"loss": 1.0},
        "final": {"loss": 0.5},
    }


def test_settings_are_never_pooled_and_seeds_are():
    results = [
        result(0, "standard", "aaaa", 1.0),
        result(1, "standard", "aaaa", 3.0),  # replicates
        result(0, "standard", "bbbb", 10.0),  # same model/objective/control, another lr: not a seed
        result(0, "equal_step", "aaaa", 0.5),
    ]
    runs = runs_table(results)
    summary = summary_markdown(runs, "cosine")
    row_a = next(line for line in summary.splitlines() if "| aaaa |" in line)
    row_b = next(line for line in summary.splitlines() if "| bbbb |" in line)
    assert "+2 ± 1.41 (n=2)" in row_a and "+0.5 [+0.4, +0.6]" in row_a  # the two seeds, beside equal-step
    assert "+10 [+9.9, +10.1]" in row_b and "n=" not in row_b
    assert set(layers_table(results).setting_hash) == {"aaaa", "bbbb"}


def test_results_from_before_run_identities_are_their_own_setting():
    old = result(0, "standard", "x", 1.0)
    del old["run"]["config_hash"], old["run"]["setting_hash"]
    runs = runs_table([old, result(1, "standard", "x", 2.0)])
    assert runs.setting_hash.tolist() == [old["run"]["name"], "x"]


def synthetic_study(n_models: int = 15, seeds: int = 4, seed: int = 0) -> list[dict]:
    """A study with known structure: slope grows with the objective distance; equal-step halves it for
    parallel blocks; width depends on the model, not the objective."""
    import numpy as np

    rng = np.random.default_rng(seed)
    families = ["encoder", "decoder", "decoder", "ssm", "rnn"]
    out = []
    for m in range(n_models):
        family = families[m % len(families)]
        block = "recurrent" if family in ("ssm", "rnn") else ("parallel" if m % 3 == 0 else "sequential")
        n_layers = 6 + m % 7
        depth = [i / n_layers for i in range(n_layers + 1)]
        for objective in ("clm" if family != "encoder" else "mlm", "cls"):
            kl_norm = 0.2 + 0.6 * (objective == "cls") + 0.1 * m / n_models
            for control in ("standard", "equal_step"):
                for s in range(seeds):
                    slope = 0.8 * kl_norm * (0.5 if control == "equal_step" and block == "parallel" else 1.0)
                    slope += rng.normal(0, 0.03)
                    change = [max(0.0, slope * d * d + rng.normal(0, 0.002)) for d in depth]
                    width_count = 2 + m % 4
                    name = f"model{m:02d}-{objective}-{control}-s{s}-{m:02d}{objective}{control[0]}"
                    out.append(
                        {
                            "schema": "locality.results/1",
                            "_path": f"/sweep/{name}",
                            "run": {
                                "name": name,
                                "model": f"model{m:02d}",
                                "family": family,
                                "block_type": block,
                                "objective": objective,
                                "control": control,
                                "seed": s,
                                "n_params": 1e8 * (1 + m),
                                "config_hash": f"{m:02d}{objective}{control[0]}",
                                "setting_hash": f"{m:02d}{objective}",
                            },
                            "depth": depth,
                            "change": {"cosine_tokens": change},
                            "profile": {
                                "cosine_tokens": {
                                    "slope": slope,
                                    "slope_ci": [slope - 0.05, slope + 0.05],
                                    "slope_per_layer": slope / n_layers,
                                    "steepness": 3 * kl_norm + rng.normal(0, 0.1),
                                    "width": 0.3,
                                    "width_count": width_count + int(rng.integers(0, 2)),
                                }
                            },
                            "init": {
                                "loss": 2.0,
                                "kl_norm": kl_norm,
                                "grad_rel_slope": slope + rng.normal(0, 0.05),
                                "grad_rel": [0.01] * n_layers,
                            },
                            "final": {"loss": 1.0},
                            "dynamics": [
                                {"step": k * 10, "slope": {"cosine_tokens": slope * k / 5}} for k in range(6)
                            ],
                        }
                    )
    return out


def test_the_papers_tables_recover_a_known_structure():
    from locality.analysis import tables

    results = synthetic_study()
    runs = runs_table(results)
    head = tables.headline(runs, ["cosine_tokens"])
    assert head.iloc[0].to_dict() | {"exceptions": ""} == {
        "metric": "cosine_tokens",
        "n_runs": 120,
        "n_positive": 120,
        "fraction_positive": 1.0,
        "n_ci_above_zero": 120,
        "exceptions": "",
        "n_did_not_train": 0,
    }
    survival = tables.equal_step_survival(runs, "cosine_tokens")
    assert survival.n_runs.sum() == 120 and set(survival.objective_class) == {"causal LM", "other"}
    rho = tables.steepness_vs_distance(runs, "cosine_tokens").set_index("control")
    steep = rho[rho.y == "cosine_tokens_steepness"]
    # runs of a setting share one step-0 distance (both controls, every seed here): one point per setting
    assert steep.loc["all", "rho"] > 0.8 and steep.loc["all", "rho_lo"] > 0.6 and steep.loc["all", "n"] == 30
    width = tables.width_variance(runs, "cosine_tokens").set_index("factor")
    assert width.loc["architecture (model)", "eta_sq"] > 0.5 > width.loc["objective", "eta_sq"]
    step0 = tables.step0_prediction(runs, "cosine_tokens")
    assert set(step0.control) == {"standard", "equal_step"} and (step0.rho > 0.5).all()


def test_analyze_writes_tables_and_figures_at_240_runs(tmp_path):
    import json

    from locality.analyze import main

    for r in synthetic_study():
        run_dir = tmp_path / "sweep" / r["run"]["name"]
        run_dir.mkdir(parents=True)
        (run_dir / "results.json").write_text(json.dumps({k: v for k, v in r.items() if k != "_path"}))
        for tool_file in (".hydra/config.yaml", "wandb/run-1/files/config.yaml"):  # not runs of their own
            (run_dir / tool_file).parent.mkdir(parents=True)
            (run_dir / tool_file).write_text("{}")
    (tmp_path / "sweep" / "killed-run").mkdir()
    (tmp_path / "sweep" / "killed-run" / "config.yaml").write_text("seed: 0")
    (tmp_path / "sweep" / "broken-run").mkdir()
    (tmp_path / "sweep" / "broken-run" / "results.json").write_text("{not json")
    wrong = synthetic_study(n_models=1, seeds=1)[0]  # valid JSON, but a slope that is a string
    wrong["profile"]["cosine_tokens"]["slope"] = "0.3"
    (tmp_path / "sweep" / "string-slope").mkdir()
    (tmp_path / "sweep" / "string-slope" / "results.json").write_text(json.dumps(wrong))
    (tmp_path / "sweep" / "failed-run").mkdir()
    (tmp_path / "sweep" / "failed-run" / "failed.json").write_text('{"reason": "non-finite loss", "step": 9}')
    out = tmp_path / "analysis"
    assert main([str(tmp_path / "sweep"), "--out", str(out)]) == 0
    assert {p.name for p in (out / "tables").iterdir()} == {
        "headline.csv",
        "equal_step_survival.csv",
        "steepness_vs_distance.csv",
        "width_variance.csv",
        "step0_prediction.csv",
    }
    assert {p.name for p in (out / "figures").iterdir()} == {
        "profiles_cosine_tokens.png",
        "slopes_cosine_tokens.png",
        "steepness_vs_distance_cosine_tokens.png",
        "dynamics_cosine_tokens.png",
    }
    summary = (out / "summary.md").read_text()
    assert "broken-run" in summary and "| failed-run | 9 | non-finite loss |" in summary
    assert "string-slope/results.json: ResultsError: profile.cosine_tokens.slope is not a number" in summary
    assert "**1 incomplete runs**" in summary and "- killed-run" in summary and ".hydra" not in summary
    import pandas as pd

    assert pd.read_csv(out / "tables" / "headline.csv").metric.iloc[0] == "cosine_tokens"


def test_linearized_runs_are_compared_with_standard_within_a_setting():
    from locality.analysis.tables import linearized_vs_standard

    results = [
        result(0, "standard", "aaaa", 1.0),
        result(1, "standard", "aaaa", 3.0),
        result(0, "linearized", "aaaa", 0.5),
        result(0, "linearized", "bbbb", 9.0),  # no standard run in its setting: not compared
    ]
    for r, loss in zip(results, (0.4, 0.6, 0.9, 0.1), strict=True):
        r["final"]["loss"] = loss
    table = linearized_vs_standard(runs_table(results), "cosine")
    assert table.setting_hash.tolist() == ["aaaa"]
    row = table.iloc[0]
    assert (row.n_standard, row.n_linearized) == (2, 1)
    assert (row.slope_standard, row.slope_linearized, row.slope_ratio) == (2.0, 0.5, 0.25)
    assert (row.final_loss_standard, row.final_loss_linearized) == (0.5, 0.9)


def test_a_run_that_did_not_train_is_listed_and_counted_nowhere():
    from locality.analysis import tables

    zero_steps = result(
        0, "standard", "cccc", 4.4e-18
    )  # what a 0-step run reported: "positive", CI above zero
    zero_steps["profile"]["cosine"]["slope_ci"] = [1e-18, 8e-18]
    zero_steps["run"]["steps"] = 0
    frozen = result(1, "standard", "cccc", 2e-9)
    frozen["run"]["steps"] = 40
    frozen["change"]["weight_rel"] = [None, 3e-8, 4e-7]  # every block below the floor (1e-6 of its norm)
    moved = result(2, "standard", "cccc", 0.5)
    moved["change"]["weight_rel"] = [None, 3e-8, 2e-6]  # one block above it: trained
    runs = runs_table([zero_steps, frozen, moved])
    assert runs.did_not_train.tolist() == [True, True, False]
    head = tables.headline(runs, ["cosine"]).iloc[0]
    assert (head.n_runs, head.n_positive, head.n_ci_above_zero, head.n_did_not_train) == (1, 1, 1, 2)
    summary = summary_markdown(runs, "cosine")
    assert "**2 runs did not train**" in summary and "0 optimizer steps" in summary
    assert "no block's weights moved by 1e-06 of their norm (max 4.0e-07)" in summary
    assert "4.4e-18" not in summary.split("## Slope per setting")[1]


def test_small_slopes_print_in_significant_digits():
    from locality.analysis.summary import number

    assert number(4.4e-18) == "+4.4e-18" and number(0.000123) == "+0.000123" and number(-0.5) == "-0.5"
    row = next(
        line
        for line in summary_markdown(
            runs_table([result(0, "standard", "dddd", 0.00042)]), "cosine"
        ).splitlines()
        if "| dddd |" in line
    )
    assert "+0.00042 [-0.0996, +0.1]" in row


def test_equal_step_survival_needs_an_effect_not_only_a_ci_above_zero():
    from locality.analysis import tables
    from locality.analysis.summary import survives

    standard = result(0, "standard", "eeee", 0.4)
    real = result(0, "equal_step", "eeee", 0.3)
    negligible = result(1, "equal_step", "eeee", 0.3)
    negligible["change"]["cosine"] = [10.0, 10.1, 10.3]  # slope 0.3 on a level of ~10: a 3% tilt
    negligible["profile"]["cosine"]["slope_ci"] = [0.2, 0.4]
    runs = runs_table([standard, real, negligible])
    assert runs.cosine_slope_relative.round(3).tolist() == [2.0, 2.0, 0.03]
    table = tables.equal_step_survival(runs, "cosine").iloc[0]
    assert (table.n_runs, table.n_ci_above_zero, table.n_survive) == (2, 2, 1)
    assert survives(runs, "cosine") == "no"
    assert survives(runs_table([standard, real]), "cosine") == "yes"


def test_rank_correlations_get_no_interval_from_few_or_shared_points():
    import numpy as np
    import pandas as pd

    from locality.analysis.tables import spearman_with_ci, steepness_vs_distance

    x = pd.Series(np.arange(7.0))
    few = spearman_with_ci(x, x**2)
    assert (
        few["rho"] == 1.0
        and np.isnan(few["rho_lo"])
        and np.isnan(few["p_value"])
        and "n < 8" in few["interval"]
    )
    rng = np.random.default_rng(0)
    x = pd.Series(np.arange(12.0))
    y = x + pd.Series(rng.normal(0, 3, 12))
    full = spearman_with_ci(x, y)
    assert full["rho_lo"] < full["rho"] < full["rho_hi"]
    assert (full["p_value"] < 0.05) == (full["rho_lo"] > 0)  # one method for both
    shared = spearman_with_ci(pd.concat([x, x]), pd.concat([y, y + 0.1]))
    assert "share x" in shared["interval"] and np.isnan(shared["rho_lo"])
    # two controls that share their step-0 distance are one point, not two
    results = []
    for i in range(6):
        for control in ("standard", "equal_step"):
            r = result(0, control, f"s{i:03d}", 0.1 * (i + 1))
            r["init"]["kl_norm"] = 0.1 * i
            results.append(r)
    table = steepness_vs_distance(runs_table(results), "cosine").set_index(["control", "y"])
    assert table.loc[("all", "cosine_slope"), "n"] == 6 and table.loc[("all", "cosine_slope"), "rho"] == 1.0
    assert np.isnan(table.loc[("all", "cosine_slope"), "rho_lo"])


def test_a_run_whose_weights_did_not_move_says_so_in_its_results(train):
    # distilling to the pretrained model itself (alpha = 0) without dropout: gradients at float32 noise
    # (~1e-9), which plain SGD turns into no movement (AdamW would normalise them into full-size steps); a
    # learning rate low enough to do the same is refused up front
    quiet = [f"+model.config_overrides.{k}=0.0" for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")]
    args = ("model=tiny_gpt2", "model.init=random", *quiet, "optim=sgd", "objective=distill")
    result = train(*args, "objective.alpha=0.0")
    assert result["run"]["did_not_train"].startswith("no block's weights moved by 1e-06 of their norm")
    assert train(*args, "objective.alpha=1.0")["run"]["did_not_train"] is None


def test_analyze_writes_svg_figures_on_request(tmp_path):
    import json

    from locality.analyze import main

    for r in synthetic_study(n_models=2, seeds=2):
        run_dir = tmp_path / "sweep" / r["run"]["name"]
        run_dir.mkdir(parents=True)
        (run_dir / "results.json").write_text(json.dumps({k: v for k, v in r.items() if k != "_path"}))
    assert main([str(tmp_path / "sweep"), "--out", str(tmp_path / "a"), "--svg"]) == 0
    svg = tmp_path / "a" / "figures" / "profiles_cosine_tokens.svg"
    assert svg.read_text().lstrip().startswith("<?xml") and (svg.with_suffix(".png")).is_file()


def test_only_change_metrics_are_offered_as_metrics(tmp_path):
    import json

    import pandas as pd

    from locality.analyze import main

    for r in synthetic_study(n_models=2, seeds=2):
        run_dir = tmp_path / "sweep" / r["run"]["name"]
        run_dir.mkdir(parents=True)
        (run_dir / "results.json").write_text(json.dumps({k: v for k, v in r.items() if k != "_path"}))
    assert main([str(tmp_path / "sweep"), "--out", str(tmp_path / "a")]) == 0
    assert pd.read_csv(tmp_path / "a" / "tables" / "headline.csv").metric.tolist() == ["cosine_tokens"]


def test_a_run_stopped_by_max_time_says_so(train):
    result = train(
        "model=tiny_gpt2", "objective=cls", "trainer.max_steps=100000", "+trainer.max_time=00:00:00:03"
    )
    assert result["run"]["stopped_early"] and result["run"]["steps"] < 100000
    summary = summary_markdown(runs_table([result]), "cosine")
    assert "stopped early" in summary or "did not train" in summary
