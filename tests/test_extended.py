"""The extension notebooks (09-11) under the smoke-extended profile: files, samplers, equal budgets."""

import json
import shutil

import pandas as pd
import pytest

from mtbert_utils import reproduce
from mtbert_utils.schedules import SCHEDULES, get_schedule

NOTEBOOKS = ["09_samplers", "10_sigma_and_order", "11_pcgrad_weights"]
EXPECTED_RESULTS = [f"runs/{nb}/index.json" for nb in NOTEBOOKS] + [
    "09_samplers_runs.csv", "09_samplers_summary.csv", "09_samplers_paired.csv", "09_samplers_single_task.csv",
    "09_samplers_reading.md",
    "10_sigma_and_order_sigma_runs.csv", "10_sigma_and_order_sigma_summary.csv", "10_sigma_and_order_order_runs.csv",
    "10_sigma_and_order_order_summary.csv", "10_sigma_and_order_position_summary.csv",
    "10_sigma_and_order_last_vs_first.csv", "10_sigma_and_order_reading.md",
    "11_pcgrad_weights_runs.csv", "11_pcgrad_weights_summary.csv", "11_pcgrad_weights_paired.csv",
    "11_pcgrad_weights_conflicts.csv", "11_pcgrad_weights_conflict_summary.csv", "11_pcgrad_weights_reading.md"]
EXPECTED_FIGURES = ["09_samplers_comparison.png", "10_sigma_and_order_sigma.png", "10_sigma_and_order_orders.png",
                    "11_pcgrad_weights_conflicts_and_effect.png"]
MODES = {"equal epochs", "equal examples"}


@pytest.fixture(scope="module")
def extended_run(run_profile):
    return run_profile("smoke-extended")


def test_every_result_and_figure_is_written(extended_run):
    results, figures, records = extended_run
    assert [r["notebook"] for r in records] == NOTEBOOKS
    missing = [p for p in EXPECTED_RESULTS if not (results / p).is_file()]
    missing += [p for p in EXPECTED_FIGURES if not (figures / p).is_file()]
    assert not missing, f"not written: {missing}"
    for fig in EXPECTED_FIGURES:
        assert (figures / fig).stat().st_size > 5_000, fig  # a real plot, not an empty canvas
    for nb in NOTEBOOKS:
        assert "**" in (results / f"{nb}_reading.md").read_text()  # a generated reading with verdicts


def test_every_sampler_in_both_budget_modes(extended_run):
    results, _, _ = extended_run
    runs = pd.read_csv(results / "09_samplers_runs.csv")
    assert set(runs["sampler"]) == set(SCHEDULES)
    counts = runs.groupby(["sampler", "budget_mode"]).size()
    assert set(counts.index) == {(s, m) for s in SCHEDULES for m in MODES}
    assert (counts == 2).all()  # two seeds each
    summary = pd.read_csv(results / "09_samplers_summary.csv")
    assert len(summary) == len(SCHEDULES) * len(MODES) and summary["mean_mean"].notna().all()
    paired = pd.read_csv(results / "09_samplers_paired.csv")
    claims = set(zip(paired["a"], paired["b"], paired["budget_mode"]))
    for mode in MODES:
        assert {("rr_over", "sequential", mode), ("sequential", "rr_under", mode)} <= claims


def test_equal_budget_runs_saw_the_same_number_of_examples(extended_run):
    results, _, _ = extended_run
    runs = pd.read_csv(results / "09_samplers_runs.csv")
    profile = reproduce.load_profile("smoke-extended")["params"]
    batch = profile["batch_size"]
    budget_runs = runs[runs["budget_mode"] == "equal examples"]
    budget = sum(profile["max_train"].values()) * 2  # sequential's examples in the notebook's 2 epochs
    trained = budget_runs[budget_runs["examples_budget"].notna()]
    assert set(trained["sampler"]) >= {"rr_under", "rr_over"} and (trained["examples_budget"] == budget).all()
    for _, r in budget_runs.iterrows():
        step = batch * (3 if r["sampler"].startswith("rr_") else 1)  # one optimizer step's worth of examples
        assert budget <= r["examples_seen"] < budget + step, (r["sampler"], r["seed"], r["examples_seen"])
    epochs = runs[runs["budget_mode"] == "equal epochs"].set_index(["sampler", "seed"])["examples_seen"]
    assert epochs["rr_over"].min() > epochs["sequential"].max() > epochs["rr_under"].max()  # why budgets matter


def test_annealed_budget_runs_end_at_the_final_alpha(extended_run):
    """Under an examples budget the annealed sampler anneals over the epochs the budget runs, so the last
    epoch it trains samples with the final alpha (0.2). Annealing over the scheduled epochs, spare included,
    would end the run one step short of it (alpha 0.6 after 2 of 3 epochs here)."""
    results, _, _ = extended_run
    files = sorted((results / "runs").glob("annealed-budget-*.json"))
    assert files, "no annealed equal-budget run was trained"
    for f in files:
        run = json.loads(f.read_text())
        schedule = get_schedule("annealed", **run["config"]["schedule_params"])
        last = len(run["history"]) - 1
        assert sum(run["examples_seen"].values()) >= run["config"]["examples_budget"]
        assert schedule.alpha(last) == pytest.approx(0.2), (f.name, last, schedule.epochs)


def test_sigma_sweep_order_and_pcgrad_tables(extended_run):
    results, _, _ = extended_run
    orders = pd.read_csv(results / "10_sigma_and_order_order_summary.csv")
    assert len(orders) == 6 and orders["order"].nunique() == 6
    sigma = pd.read_csv(results / "10_sigma_and_order_sigma_summary.csv")
    # notebook 10's default sigmas min, median, max, 2max of the profile's batches per task, distinct, ascending
    profile = reproduce.load_profile("smoke-extended")["params"]
    nb = sorted(-(-n // profile["batch_size"]) for n in profile["max_train"].values())
    assert list(sigma["sigma"]) == sorted({nb[0], nb[len(nb) // 2], nb[-1], 2 * nb[-1]})
    assert sigma.sort_values("sigma")["examples_seen"].is_monotonic_increasing  # more steps, more examples
    conflicts = pd.read_csv(results / "11_pcgrad_weights_conflict_summary.csv")
    assert set(conflicts["arm"]) == {"plain", "pcgrad"} and conflicts["weighting"].nunique() == 3
    assert conflicts["conflict_rate_mean"].between(0, 1).all()
    paired = pd.read_csv(results / "11_pcgrad_weights_paired.csv")
    assert set(paired["weighting"]) == set(conflicts["weighting"])
    index = json.loads((results / "runs" / "11_pcgrad_weights" / "index.json").read_text())
    assert len(index["runs"]) == 6  # 3 weightings x (plain, PCGrad)


# --- the helpers behind the notebooks, on numbers worked by hand (no data, no training), have homes of their own:
# budget.py's (examples per epoch, phases, budgets) tests/test_budget.py; resolve_sigma, verdict, adaptive_reference
# and schedule_params_for tests/test_schedules.py and tests/test_stats.py; grad_conflicts and position_effect
# tests/test_tables.py (all fast unit tests, in the mutation runs' selections)


def test_the_notebooks_run_with_one_seed(extended_run, data_dir, tmp_path):
    """One seed (a quick look, or a user's first run) leaves no paired comparison: the notebooks still finish
    and their readings say so (09 and 11 once stopped with KeyError 'mean_diff' on an empty paired table). The
    seed-0 runs of the two-seed profile are the same runs: copied over, nothing trains again."""
    results, _, _ = extended_run
    out = tmp_path / "results" / "smoke-extended"
    shutil.copytree(results / "runs", out / "runs")
    with reproduce.patched_environ({"MTBERT_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"}):
        records = reproduce.run("smoke-extended", overrides={"seeds": [0]}, out_root=tmp_path)
    assert [r["notebook"] for r in records] == NOTEBOOKS
    assert pd.read_csv(out / "09_samplers_paired.csv").empty and pd.read_csv(out / "11_pcgrad_weights_paired.csv").empty
    assert pd.read_csv(out / "09_samplers_runs.csv")["seed"].unique().tolist() == [0]
    assert (out / "09_samplers_reading.md").read_text().endswith(
        "- No paired comparison: each needs two or more seeds shared by both samplers.\n")
    assert "No weighting has both arms with two or more seeds" in (out / "11_pcgrad_weights_reading.md").read_text()
    assert "Largest vs smallest sigma" not in (out / "10_sigma_and_order_reading.md").read_text()
