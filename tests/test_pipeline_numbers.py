"""Numbers in every generated table and reading, recomputed from the run files (or the data files) alone.

The other pipeline tests check that files exist; these check that what they say is right. Each
value is recomputed here with numpy/scipy from the result JSONs the notebooks list in their
index.json, not with the package's table code. The profiles run once per session (run_profile).
"""

import csv
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from mtbert_utils.data import SHA256

TASKS = ("sst", "para", "sts")
# numbers travel float64 -> CSV (shortest repr, exact round trip) -> float64; a mean of a handful of values
# and scipy's t quantile differ from ours by a few ulps at most
REL = 1e-9


# --------------------------------------------------------------------------- independent recomputation

def index_runs(results: Path, notebook: str) -> dict[str, list[dict]]:
    """Row name -> the run result JSONs the notebook's index lists, read directly."""
    index = json.loads((results / "runs" / notebook / "index.json").read_text())
    return {name: [json.loads((results / p).read_text()) for p in paths] for name, paths in index["runs"].items()}


def t_half_width(values) -> float:
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return math.nan
    if sps.sem(x) == 0:
        return 0.0  # identical values: an interval of no width
    lo, hi = sps.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=sps.sem(x))
    return (hi - lo) / 2


def paired(a_runs, b_runs, metric) -> dict:
    """Paired over the seeds both arms have: mean difference, t half-width, p (scipy.ttest_rel)."""
    a, b = {r["seed"]: r["dev"][metric] for r in a_runs}, {r["seed"]: r["dev"][metric] for r in b_runs}
    seeds = sorted(set(a) & set(b))
    x, y = np.array([a[s] for s in seeds]), np.array([b[s] for s in seeds])
    return {"n": len(seeds), "mean_diff": float((x - y).mean()), "ci95": t_half_width(x - y),
            "p_value": float(sps.ttest_rel(x, y).pvalue) if np.std(x - y) > 0 else None}


def approx(x):
    return pytest.approx(x, rel=REL, abs=1e-12, nan_ok=True)


def check_paired_row(row, expected):
    assert row["n"] == expected["n"]
    assert row["mean_diff"] == approx(expected["mean_diff"])
    assert row["ci95"] == approx(expected["ci95"])
    if expected["p_value"] is not None:
        assert row["p_value"] == approx(expected["p_value"])


def check_summary_row(row, runs, metrics=(*TASKS, "mean")):
    assert row["seeds"] == len(runs)
    for m in metrics:
        vals = [r["dev"][m] for r in runs]
        assert row[f"{m}_mean"] == approx(np.mean(vals)), m
        assert row[f"{m}_ci95"] == approx(t_half_width(vals)), m


def check_summary_file(path: Path, runs: dict, key) -> pd.DataFrame:
    """Every row of a summary CSV against the runs its row names (key(row) -> index name); returns the table."""
    table = pd.read_csv(path)
    assert len(table)
    for _, row in table.iterrows():
        check_summary_row(row, runs[key(row)])
    return table


def check_runs_table(df: pd.DataFrame, results: Path):
    """Every row of a tidy runs table against the result file it names."""
    assert len(df)
    for _, row in df.iterrows():
        run = json.loads((results / "runs" / row["result_file"]).read_text())
        assert row["seed"] == run["seed"] and row["run_name"] == run["run_name"]
        for m in (*TASKS, "mean"):
            assert row[m] == approx(run["dev"][m]), (row["run_name"], m)
        assert row["examples_seen"] == sum(run["examples_seen"].values())
        assert row["steps"] == run["steps"]


def fmt(mean, ci):
    return f"{mean:.3f}" if ci != ci else f"{mean:.3f} ± {ci:.3f}"


def conflict_rates(run) -> dict[str, float]:
    """Per task pair, the share of recorded steps (all epochs) whose gradient cosine was negative."""
    vals = {}
    for h in run["history"]:
        for pair, c in h.get("grad_cosines", {}).items():
            vals.setdefault(pair, []).extend(c["values"])
    return {p: float(np.mean(np.asarray(v) < 0)) for p, v in vals.items()}


# --------------------------------------------------------------------------- notebooks 00-07 (smoke)

@pytest.fixture(scope="module")
def smoke(run_profile):
    results, _, _ = run_profile("smoke")
    return results


def test_data_tables_against_the_data_files(smoke, data_dir):
    summary = pd.read_csv(smoke / "data_summary.csv").set_index("task")
    skipped = pd.read_csv(smoke / "data_skipped_rows.csv").set_index("file")
    reasons = [c for c in skipped.columns if c not in ("kept", "first_lines")]
    for name in skipped.index:
        with open(data_dir / name, encoding="utf-8-sig", newline="") as f:
            records = sum(1 for row in csv.reader(f, delimiter="\t") if row) - 1  # header
        assert skipped.loc[name, "kept"] + skipped.loc[name, reasons].sum() == records, name
    # the sizes table: SST and STS train/dev are whole files; Quora has no train file here, so its dev
    # file is split by hash into train and dev
    for task, prefix in (("sst", "ids-sst"), ("sts", "sts")):
        assert summary.loc[task, "train_size"] == skipped.loc[f"{prefix}-train.csv", "kept"]
        assert summary.loc[task, "dev_size"] == skipped.loc[f"{prefix}-dev.csv", "kept"]
    assert summary.loc["para", "train_size"] + summary.loc["para", "dev_size"] == skipped.loc["quora-dev.csv", "kept"]
    files = pd.read_csv(smoke / "data_files.csv").set_index("file")
    assert set(files.index) == set(skipped.index)  # every file read, and only those
    for name in files.index:
        digest = hashlib.sha256((data_dir / name).read_bytes()).hexdigest()
        assert files.loc[name, "sha256"] == digest
        pinned = SHA256.get(name)  # the mirror's files all are the pinned ones; quora-train.csv has no pinned sum
        assert files.loc[name, "pinned CS224N file"] == ("no pinned sum to compare" if pinned is None else
                                                         "the pinned CS224N file" if pinned == digest else
                                                         "DIFFERS from the pinned CS224N file")
    padding = pd.read_csv(smoke / "data_padding.csv")
    # length grouping can only remove padding (a batch's padding is its longest minus each length)
    assert ((0 <= padding["padding_length_grouped"]) & (padding["padding_length_grouped"]
                                                         <= padding["padding_random_batches"])
            & (padding["padding_random_batches"] < 1)).all()


def test_table1_means_intervals_and_markdown(smoke):
    from mtbert_utils.experiments import TABLE1_ROWS  # the row -> (notebook, run name) map is data, not code
    table = pd.read_csv(smoke / "table1.csv").set_index("row")
    md = (smoke / "table1.md").read_text()
    meta = json.loads((smoke / "table1_meta.json").read_text())
    for label, notebook, name in TABLE1_ROWS:
        runs = index_runs(smoke, notebook)[name]
        check_summary_row(table.loc[label], runs, metrics=(*TASKS, "mean", "overall"))
        line = next(l for l in md.splitlines() if l.startswith(f"| {label} |"))
        vals = [r["dev"]["sst"] for r in runs]
        assert fmt(np.mean(vals), t_half_width(vals)) in line
        assert meta["rows"][label]["runs"] == [r["run_name"] for r in runs]
        assert meta["rows"][label]["data_sizes"] == runs[0]["data"]["sizes"]


def test_table1_paired_comparisons(smoke):
    from mtbert_utils.experiments import TABLE1_ROWS
    by_label = {label: index_runs(smoke, nb)[name] for label, nb, name in TABLE1_ROWS}
    table = pd.read_csv(smoke / "table1_paired.csv")
    assert len(table) >= 5 * 4  # five claims, four metrics each
    for _, row in table.iterrows():
        check_paired_row(row, paired(by_label[row["a"]], by_label[row["b"]], row["metric"]))


def test_cosine_vs_linear_and_pcgrad_conflicts(smoke):
    runs = index_runs(smoke, "04_cosine_sts")
    table = pd.read_csv(smoke / "04_cosine_sts_cosine_vs_linear.csv")
    assert set(table["metric"]) >= {"sts", "mean"}
    for _, row in table.iterrows():
        check_paired_row(row, paired(runs["rr_over-tuned-cosine"], runs["rr_over-tuned-linear"], row["metric"]))
    arms = {"without PCGrad": "rr_over-tuned-cosine", "with PCGrad": "rr_over-tuned-cosine-pcgrad"}
    pc = index_runs(smoke, "05_pcgrad_ablation")
    conflicts = pd.read_csv(smoke / "05_pcgrad_ablation_conflicts.csv")
    assert len(conflicts)
    for _, row in conflicts.iterrows():
        run = next(r for r in pc[arms[row["arm"]]] if r["seed"] == row["seed"])
        values = np.asarray(run["history"][row["epoch"] - 1]["grad_cosines"][row["pair"]]["values"])
        assert row["conflict_rate"] == approx(np.mean(values < 0))
        assert row["mean_cos"] == pytest.approx(values.mean(), abs=1e-5)  # values are stored rounded to 1e-5


def test_error_analysis_tables_against_the_prediction_files(smoke):
    run = index_runs(smoke, "04_cosine_sts")["rr_over-tuned-cosine"][0]
    pred = smoke / "runs" / "predictions" / run["run_name"]
    sst = pd.read_csv(pred / "sst-dev-scores.csv")
    cm = pd.read_csv(smoke / "07_sst_confusion.csv", index_col=0).to_numpy()
    assert cm.sum() == len(sst) == run["data"]["sizes"]["sst"]["dev"]
    assert np.trace(cm) / cm.sum() == approx(run["dev"]["sst"])  # the run's own dev accuracy
    assert cm[2].sum() == (sst["gold"] == 2).sum()  # rows are gold classes
    para = pd.read_csv(pred / "para-dev-scores.csv")
    wrong = pd.read_csv(smoke / "07_para_confident_wrong.csv")
    assert len(wrong) == min(15, int((para["pred"] != para["gold"]).sum()))
    assert (wrong["pred"] != wrong["gold"]).all()
    assert wrong["p_duplicate"].to_numpy() == approx(1 / (1 + np.exp(-wrong["raw"].to_numpy())))
    assert ((para["pred"] == para["gold"]).mean()) == approx(run["dev"]["para"])
    sts = pd.read_csv(pred / "sts-dev-scores.csv")
    worst = pd.read_csv(smoke / "07_sts_worst.csv")
    assert worst["abs_error"].iloc[0] == approx((sts["pred"].clip(0, 5) - sts["gold"]).abs().max())
    # the file holds float32 predictions and labels, printed shortest-round-trip: back to float32 they are exact
    # (the tiny encoder's cosines differ in the 6th digit, so float64 readings of them would move r by ~1e-8)
    f32 = lambda col: sts[col].to_numpy().astype(np.float32).astype(np.float64)  # noqa: E731
    assert sps.pearsonr(f32("pred"), f32("gold"))[0] == approx(run["dev"]["sts"])


# --------------------------------------------------------------------------- notebooks 09-11 (smoke-extended)

@pytest.fixture(scope="module")
def extended(run_profile):
    results, _, _ = run_profile("smoke-extended")
    return results


def test_sampler_tables_and_reading(extended):
    runs = index_runs(extended, "09_samplers")
    check_runs_table(pd.read_csv(extended / "09_samplers_runs.csv"), extended)
    single = pd.read_csv(extended / "09_samplers_single_task.csv")
    check_runs_table(single, extended)
    assert set(single["task"]) == set(TASKS)
    check_summary_file(extended / "09_samplers_summary.csv", runs,
                       lambda row: f"{row['sampler']} | {row['budget_mode']}")
    table = pd.read_csv(extended / "09_samplers_paired.csv")
    for _, row in table.iterrows():
        mode = row["budget_mode"]
        exp = paired(runs[f"{row['a']} | {mode}"], runs[f"{row['b']} | {mode}"], row["metric"])
        check_paired_row(row, exp)
        lo, hi = exp["mean_diff"] - exp["ci95"], exp["mean_diff"] + exp["ci95"]
        assert row["verdict"] == ("holds" if lo > 0 else "reversed" if hi < 0 else "not resolved")
    reading = (extended / "09_samplers_reading.md").read_text()
    for mode in ("equal epochs", "equal examples"):
        exp = paired(runs[f"rr_over | {mode}"], runs[f"sequential | {mode}"], "mean")
        assert f"{exp['mean_diff']:+.3f} ± {exp['ci95']:.3f}" in reading, mode


def test_sigma_and_order_tables_and_reading(extended):
    runs = index_runs(extended, "10_sigma_and_order")
    check_runs_table(pd.read_csv(extended / "10_sigma_and_order_sigma_runs.csv"), extended)
    check_runs_table(pd.read_csv(extended / "10_sigma_and_order_order_runs.csv"), extended)
    sigma = check_summary_file(extended / "10_sigma_and_order_sigma_summary.csv", runs,
                               lambda row: f"rr_over sigma {int(row['sigma'])}")
    check_summary_file(extended / "10_sigma_and_order_order_summary.csv", runs,
                       lambda row: f"sequential {row['order']}")
    # a task's score by its position in the order, and last vs first, paired by seed
    by_pos = {}
    for name, rs in runs.items():
        if name.startswith("sequential "):
            order = name.split(" ", 1)[1].split("-")
            for r in rs:
                for t in TASKS:
                    by_pos.setdefault((t, order.index(t) + 1), {}).setdefault(r["seed"], []).append(r["dev"][t])
    pos = pd.read_csv(extended / "10_sigma_and_order_position_summary.csv")
    for _, row in pos.iterrows():
        vals = [v for vs in by_pos[(row["task"], row["position"])].values() for v in vs]
        assert row["score_mean"] == approx(np.mean(vals)) and row["seeds"] == len(vals)
    last = pd.read_csv(extended / "10_sigma_and_order_last_vs_first.csv").set_index("task")
    reading = (extended / "10_sigma_and_order_reading.md").read_text()
    for t in TASKS:
        first, final = by_pos[(t, 1)], by_pos[(t, 3)]
        d = np.array([np.mean(final[s]) - np.mean(first[s]) for s in sorted(first)])
        assert last.loc[t, "mean_diff"] == approx(d.mean()) and last.loc[t, "ci95"] == approx(t_half_width(d))
        assert f"Training {t} last instead of first changes its score by {d.mean():+.3f}" in reading
    best = max(map(int, sigma["sigma"]), key=lambda s: np.mean([r["dev"]["mean"] for r in runs[f"rr_over sigma {s}"]]))
    assert f"the best mean dev score is at sigma {best} " in reading


def test_pcgrad_weighting_tables_and_reading(extended):
    runs = index_runs(extended, "11_pcgrad_weights")
    check_runs_table(pd.read_csv(extended / "11_pcgrad_weights_runs.csv"), extended)
    check_summary_file(extended / "11_pcgrad_weights_summary.csv", runs,
                       lambda row: f"{row['weighting']} | {row['arm']}")
    table = pd.read_csv(extended / "11_pcgrad_weights_paired.csv")
    for _, row in table.iterrows():
        w = row["weighting"]
        check_paired_row(row, paired(runs[f"{w} | pcgrad"], runs[f"{w} | plain"], row["metric"]))
    conflicts = pd.read_csv(extended / "11_pcgrad_weights_conflicts.csv")
    for _, row in conflicts.iterrows():
        run = next(r for r in runs[f"{row['weighting']} | {row['arm']}"] if r["seed"] == row["seed"])
        assert row["conflict_rate"] == approx(conflict_rates(run)[row["pair"]])
    cs = pd.read_csv(extended / "11_pcgrad_weights_conflict_summary.csv")
    reading = (extended / "11_pcgrad_weights_reading.md").read_text()
    for _, row in cs.iterrows():
        rates = [conflict_rates(r)[row["pair"]] for r in runs[f"{row['weighting']} | {row['arm']}"]]
        assert row["conflict_rate_mean"] == approx(np.mean(rates))
    plain = cs[cs["arm"] == "plain"]
    for w, g in plain.groupby("weighting"):
        lo, hi = g["conflict_rate_mean"].min(), g["conflict_rate_mean"].max()
        assert f"**{w}**: task gradients conflict in {lo:.0%}–{hi:.0%} of steps" in reading


# --------------------------------------------------------------------------- notebook 08 (smoke-best)

@pytest.fixture(scope="module")
def best(run_profile):
    results, _, _ = run_profile("smoke-best")
    return results


def test_best_tables_against_the_runs(best):
    runs = index_runs(best, "08_best_model")["best"]
    summary = pd.read_csv(best / "08_best_model_summary.csv")
    ours = summary.iloc[0]
    md = (best / "08_best_model_summary.md").read_text()
    for t in TASKS:
        assert ours[t] == approx(np.mean([r["dev"][t] for r in runs]))
        assert f"{np.mean([r['dev'][t] for r in runs]):.3f}" in md.splitlines()[2]
    val = pd.read_csv(best / "08_best_model_validation.csv")
    assert len(val) == sum(len(r["history"]) for r in runs)
    for _, row in val.iterrows():
        h = next(r for r in runs if r["seed"] == row["seed"])["history"][row["epoch"] - 1]
        for t in (*TASKS, "mean"):
            assert row[t] == approx(h["val"][t])
    verdict = json.loads((best / "08_best_model.json").read_text())["verdict"]
    for t in TASKS:
        assert verdict["dev"][t] == approx(np.mean([r["dev"][t] for r in runs]))
