"""tables.py on numbers worked by hand: Table 1 and its Markdown, summaries over seeds, paired comparisons, tidy
per-run frames, gradient conflicts, the sequential position effect and the `best` profile's tables.

No data and no training: made-up run dicts (the fields a run's result JSON has), so these are also tables.py's
own mutation-test selection (pyproject.toml's [tool.mtbert.mutation-selection], docs/testing.md).
tests/test_pipeline_numbers.py checks the same tables against the committed pipelines' run files.
"""

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from conftest import float64_tol
from mtbert_utils import tables
from mtbert_utils.tables import (ablation_table, best_verdict_markdown, ensemble_table, format_cell, frame_markdown,
                                 grad_conflicts, paired_table, position_effect, runs_frame, summarize,
                                 summarize_frame, table1, table_markdown, training_time, weighting_label)

T1 = stats.t.ppf(0.975, 1)  # two seeds: one degree of freedom
TOL = float64_tol(4)  # a mean or difference of a few values, then a product: a handful of float64 roundings


def run(seed, sst, para, sts, **extra):
    dev = {"sst": sst, "para": para, "sts": sts, "mean": (sst + para + sts) / 3,
           "overall": (sst + para + (sts + 1) / 2) / 3}
    return {"seed": seed, "dev": dev, **extra}


def close(a, b):
    return a == pytest.approx(b, rel=TOL, abs=TOL)


def test_the_studys_numbers_and_the_best_profiles_targets():
    """The study's Table 1 as its report gives it (dev, SST acc / Quora acc / STS r), and the issue's targets."""
    assert tables.STUDY_TABLE1 == {
        "random sequential": {"sst": 0.304, "para": 0.670, "sts": 0.212},
        "RR undersampling": {"sst": 0.301, "para": 0.632, "sts": 0.181},
        "RR oversampling": {"sst": 0.432, "para": 0.691, "sts": 0.272},
        "RR oversampling + tuning + cosine": {"sst": 0.497, "para": 0.864, "sts": 0.387},
        "RR oversampling + tuning + cosine + PCGrad": {"sst": 0.497, "para": 0.860, "sts": 0.378}}
    assert tables.BEST_REFERENCES["target (MiniLM, 2 CPU cores)"] == {"sst": 0.50, "para": 0.865, "sts": 0.87}
    assert tables.BEST_REFERENCES["study best (bert-base)"] == tables.STUDY_TABLE1["RR oversampling + tuning + cosine"]
    assert tables.TRAINING_MINUTES_TARGET == 60 and tables.METRICS == ("sst", "para", "sts", "mean", "overall")
    assert [r[0] for r in tables.TABLE1_ROWS][1:] == list(tables.STUDY_TABLE1)


def test_summarize_gives_mean_and_t_interval_per_row():
    rows = {"two seeds": [run(0, 0.4, 0.7, 0.2, train_time_s=10.0, examples_seen={"sst": 5, "para": 7}),
                          run(1, 0.5, 0.6, 0.3, examples_seen={"sts": 3})],  # no train time: counted as 0
            "one seed": [run(0, 0.3, 0.5, 0.1)]}
    df = summarize(rows)
    assert list(df.columns) == ["row", "seeds", *(f"{m}_{s}" for m in tables.METRICS for s in ("mean", "ci95")),
                                "train_time_s", "examples_seen"]
    two, one = df.iloc[0], df.iloc[1]
    assert (two["row"], two["seeds"], one["row"], one["seeds"]) == ("two seeds", 2, "one seed", 1)
    assert close(two["sst_mean"], 0.45) and close(two["sst_ci95"], T1 * 0.05)  # sem of two values: |a - b| / 2
    assert close(two["para_mean"], 0.65) and close(two["sts_ci95"], T1 * 0.05)
    overall = [r["dev"]["overall"] for r in rows["two seeds"]]
    assert close(two["overall_mean"], (overall[0] + overall[1]) / 2)
    assert close(two["mean_mean"], (1.3 / 3 + 1.4 / 3) / 2)
    assert two["train_time_s"] == 5.0 and two["examples_seen"] == (12 + 3) / 2
    assert one["sst_mean"] == 0.3 and math.isnan(one["sst_ci95"]) and one["train_time_s"] == 0.0
    assert one["examples_seen"] == 0.0


def write_runs(results_dir, notebook, runs_by_name):
    folder = results_dir / "runs" / notebook
    folder.mkdir(parents=True, exist_ok=True)
    index = {}
    for name, runs in runs_by_name.items():
        for r in runs:
            (folder / f"{name}-seed{r['seed']}.json").write_text(json.dumps(r))
        index[name] = [f"runs/{notebook}/{name}-seed{r['seed']}.json" for r in runs]
    (folder / "index.json").write_text(json.dumps({"notebook": notebook, "runs": index}))


def test_table1_reads_each_row_from_its_notebooks_index_with_the_studys_numbers_beside(tmp_path):
    for i, (_, notebook, name) in enumerate(tables.TABLE1_ROWS):
        write_runs(tmp_path, notebook, {name: [run(s, 0.1 * i, 0.5, 0.2 + s / 10) for s in range(1 + i % 2)],
                                        "other": [run(0, 0.9, 0.9, 0.9)]})
    # 04_cosine_sts holds two rows (zero-shot and tuned + cosine): both must be in its one index
    write_runs(tmp_path, "04_cosine_sts", {"zero-shot": [run(0, 0.0, 0.5, 0.2)],
                                           "rr_over-tuned-cosine": [run(s, 0.4, 0.5, 0.2 + s / 10) for s in (0, 1)]})
    table, runs_by_row = table1(tmp_path)
    assert list(table["row"]) == [r[0] for r in tables.TABLE1_ROWS] == list(runs_by_row)
    assert list(table["seeds"]) == [1, 2, 1, 2, 2, 2]
    assert table.loc[1, "sst_mean"] == 0.1 and close(table.loc[4, "sts_mean"], 0.25)
    assert runs_by_row["RR oversampling"][0]["dev"]["sst"] == pytest.approx(0.3)
    assert math.isnan(table.loc[0, "study_sst"])  # the zero-shot row is not in the study
    for i, label in enumerate(tables.STUDY_TABLE1, start=1):
        study = [table.loc[i, f"study_{t}"] for t in ("sst", "para", "sts")]
        assert study == list(tables.STUDY_TABLE1[label].values())
    write_runs(tmp_path, "02_rr_undersampling", {"rr_under": [run(0, 0.1, 0.5, 0.2)]})  # the row's name is missing
    with pytest.raises(KeyError) as e:
        table1(tmp_path)
    assert e.value.args[0] == "02_rr_undersampling index has no runs named 'rr_under-baseline'; it has ['rr_under']"


def test_cells_and_table1_markdown():
    assert format_cell(0.5, float("nan")) == "0.500" and format_cell(0.12345, 0.0126) == "0.123 ± 0.013"
    table = pd.DataFrame([
        {"row": "ours", "seeds": 3, "sst_mean": 0.5, "sst_ci95": 0.01, "para_mean": 0.8, "para_ci95": 0.02,
         "sts_mean": 0.3, "sts_ci95": 0.03, "mean_mean": 0.6, "mean_ci95": 0.015, "study_sst": 0.304,
         "study_para": 0.67, "study_sts": 0.212},
        {"row": "zero-shot", "seeds": 1, "sst_mean": 0.2, "sst_ci95": float("nan"), "para_mean": 0.4,
         "para_ci95": float("nan"), "sts_mean": 0.8, "sts_ci95": float("nan"), "mean_mean": 0.5,
         "mean_ci95": float("nan"), "study_sst": None, "study_para": None, "study_sts": None}])
    assert table_markdown(table) == (
        "| configuration | seeds | SST acc | Quora acc | STS r | mean |\n|---|---|---|---|---|---|\n"
        "| ours | 3 | 0.500 ± 0.010 (0.304) | 0.800 ± 0.020 (0.670) | 0.300 ± 0.030 (0.212) | 0.600 ± 0.015 |\n"
        "| zero-shot | 1 | 0.200 | 0.400 | 0.800 | 0.500 |\n")
    # a table without the study's columns has no brackets
    plain = table.drop(columns=["study_sst", "study_para", "study_sts"]).iloc[:1]
    assert table_markdown(plain).splitlines()[2] == \
        "| ours | 3 | 0.500 ± 0.010 | 0.800 ± 0.020 | 0.300 ± 0.030 | 0.600 ± 0.015 |"


def test_frame_markdown_rounds_floats_to_the_digits_asked():
    df = pd.DataFrame([{"a": "x", "b": 1.23456, "c": 7}, {"a": "y", "b": float("nan"), "c": 8}])
    assert frame_markdown(df, digits=1) == "| a | b | c |\n|---|---|---|\n| x | 1.2 | 7 |\n| y |  | 8 |\n"


def test_paired_table_pairs_runs_by_seed_and_skips_claims_with_fewer_than_two():
    a = [run(0, 0.50, 0.70, 0.30), run(1, 0.60, 0.80, 0.20), run(2, 0.40, 0.90, 0.10)]
    b = [run(1, 0.50, 0.70, 0.20), run(2, 0.40, 0.70, 0.30), run(3, 0.90, 0.90, 0.90)]
    c = [run(2, 0.1, 0.1, 0.1)]
    df = paired_table({"A": a, "B": b, "C": c}, [("A", "B"), ("A", "C")])  # A and C share one seed: skipped
    assert list(df["metric"]) == ["sst", "para", "sts", "mean"] and set(df["a"]) == {"A"} and set(df["b"]) == {"B"}
    sst = df.iloc[0]
    # seeds 1 and 2: differences 0.10 and 0.00
    assert sst["n"] == 2 and close(sst["mean_diff"], 0.05) and close(sst["ci95"], T1 * 0.05)
    para, sts = df.iloc[1], df.iloc[2]
    assert close(para["mean_diff"], 0.15) and close(sts["mean_diff"], -0.1)
    assert {"p_value", "cohens_dz"} <= set(df.columns)
    one = paired_table({"A": a, "C": c}, [("A", "C")])
    # empty, with its columns: a notebook's next line (a verdict column from mean_diff and ci95) still runs
    assert one.empty and list(one.columns) == list(df.columns) == ["a", "b", "metric", "n", "mean_diff", "ci95",
                                                                    "p_value", "cohens_dz"]
    assert list(one["mean_diff"] + one["ci95"]) == []


def test_runs_frame_has_a_row_per_run_with_its_labels_and_missing_fields_empty():
    full = run(4, 0.5, 0.8, 0.3, run_name="x-seed4", examples_seen={"sst": 10, "para": 20, "sts": 5}, steps=7,
               history=[{}, {}, {}], config={"examples_budget": 100}, train_time_s=12.5,
               result_path="results/runs/01/x-seed4.json")
    bare = {"seed": 5, "dev": {"sst": 0.1}, "config": {}}
    df = runs_frame([full, bare], arm="plain", budget="equal")
    assert list(df.columns) == ["arm", "budget", "seed", "run_name", *tables.METRICS, "examples_seen", "seen_sst",
                                "seen_para", "seen_sts", "steps", "epochs_run", "examples_budget", "train_time_s",
                                "result_file"]
    one, two = df.iloc[0].to_dict(), df.iloc[1].to_dict()
    assert (one["arm"], one["budget"], one["seed"], one["run_name"]) == ("plain", "equal", 4, "x-seed4")
    assert (one["sst"], one["overall"], one["examples_seen"], one["seen_para"], one["seen_sts"]) == \
        (0.5, full["dev"]["overall"], 35, 20, 5)
    assert (one["steps"], one["epochs_run"], one["examples_budget"], one["train_time_s"], one["result_file"]) == \
        (7, 3, 100, 12.5, "x-seed4.json")
    assert (two["seed"], two["sst"], two["examples_seen"], two["seen_sst"], two["epochs_run"]) == (5, 0.1, 0, 0, 0)
    assert all(two[k] is None or two[k] != two[k] for k in ("run_name", "para", "steps", "examples_budget",
                                                           "train_time_s", "result_file"))


def test_summarize_frame_keeps_the_group_order_and_averages_what_is_there():
    df = pd.DataFrame([
        {"arm": "pcgrad", "w": "equal", "sst": 0.4, "para": 0.6, "examples_seen": 10, "steps": 2},
        {"arm": "plain", "w": "equal", "sst": 0.5, "para": 0.7, "examples_seen": 30, "steps": 4},
        {"arm": "pcgrad", "w": "equal", "sst": 0.5, "para": 0.8, "examples_seen": 20, "steps": 6},
        {"arm": "pcgrad", "w": "sst:3", "sst": 0.9, "para": 0.1, "examples_seen": 1, "steps": 1}])
    out = summarize_frame(df, ["arm", "w"], metrics=("sst", "para"))
    assert [tuple(r) for r in out[["arm", "w", "seeds"]].to_numpy()] == \
        [("pcgrad", "equal", 2), ("plain", "equal", 1), ("pcgrad", "sst:3", 1)]  # first seen first, not sorted
    first = out.iloc[0]
    assert close(first["sst_mean"], 0.45) and close(first["sst_ci95"], T1 * 0.05) and close(first["para_mean"], 0.7)
    assert (first["examples_seen"], first["steps"]) == (15.0, 4.0) and "train_time_s" not in out
    assert math.isnan(out.iloc[1]["sst_ci95"])
    one = summarize_frame(df[["arm", "sst"]], ["arm"], metrics=("sst",))
    assert list(one.columns) == ["arm", "seeds", "sst_mean", "sst_ci95"] and list(one["arm"]) == ["pcgrad", "plain"]


def test_grad_conflicts_statistics():
    run = {"seed": 0, "history": [{"grad_cosines": {"sst|para": {"values": [0.5, -0.2]}}},
                                  {"grad_cosines": {"sst|para": {"values": [-0.4, 0.1]}}}]}
    row = grad_conflicts([run], arm="plain").iloc[0]
    assert row["steps"] == 4 and row["conflict_rate"] == 0.5
    assert row["mean_cos"] == pytest.approx(0.0) and row["conflict_cos"] == pytest.approx(-0.3)
    assert row["surgery"] == pytest.approx((0.2 + 0.4) / 4)
    heads_only = {"encoder_trainable": False, "grad_cosines": {"sst|para": {"values": [-0.9]}}}
    run["history"].insert(0, heads_only)  # another quantity (the shared layer alone): not counted
    assert grad_conflicts([run], arm="plain").equals(grad_conflicts([{**run, "history": run["history"][1:]}],
                                                                    arm="plain"))


def test_position_effect_is_paired_by_seed():
    rows = [{"task": "sst", "seed": s, "position": p, "score": base + (gain if p == 3 else 0.0)}
            for s, base, gain in [(0, 0.3, 0.1), (1, 0.4, 0.12), (2, 0.35, 0.08)] for p in (1, 2, 3)]
    eff = position_effect(pd.DataFrame(rows)).iloc[0]
    assert eff["task"] == "sst" and eff["mean_diff"] == pytest.approx(0.1) and eff["verdict"] == "holds"


def test_grad_conflicts_without_a_conflict_and_with_labels():
    cosines = {"sst|sts": {"values": [0.2, 0.4]}, "para|sts": {"values": [-1.0]}}
    r = {"seed": 3, "history": [{"grad_cosines": cosines}, {}]}
    df = grad_conflicts([r], arm="pcgrad")
    calm, clash = df.iloc[0], df.iloc[1]
    assert (calm["arm"], calm["seed"], calm["pair"], calm["steps"]) == ("pcgrad", 3, "sst|sts", 2)
    assert close(calm["mean_cos"], 0.3) and calm["conflict_rate"] == 0.0 and math.isnan(calm["conflict_cos"])
    assert calm["surgery"] == 0.0
    assert (clash["conflict_rate"], clash["conflict_cos"], clash["surgery"]) == (1.0, -1.0, 1.0)


def test_weighting_label():
    assert weighting_label({"sst": 1, "para": 1.0, "sts": 1}) == "equal"
    assert weighting_label({"sts": 1, "sst": 3, "para": 1}) == "sst:3 para:1 sts:1"  # task order, not the dict's
    assert weighting_label({"sst": 0.5, "para": 2, "sts": 2}) == "sst:0.5 para:2 sts:2"


def test_position_effect_compares_last_with_first_per_task():
    rows = []
    for seed, (first, last) in enumerate([(0.5, 0.3), (0.6, 0.35), (0.55, 0.3)]):
        rows += [{"task": "para", "seed": seed, "position": 1, "score": first},
                 {"task": "para", "seed": seed, "position": 2, "score": 0.9},
                 {"task": "para", "seed": seed, "position": 3, "score": last - 0.1},
                 {"task": "para", "seed": seed, "position": 3, "score": last + 0.1}]  # two runs: their mean
    rows += [{"task": "sts", "seed": s, "position": 2, "score": 0.5} for s in range(3)]  # never first or last
    rows += [{"task": "sst", "seed": 0, "position": p, "score": 0.5} for p in (1, 3)]  # one seed: no interval
    rows += [{"task": "sst", "seed": 1, "position": 1, "score": 0.5}]  # no last position: dropped
    eff = position_effect(pd.DataFrame(rows))
    assert list(eff["task"]) == ["para"]
    e = eff.iloc[0]
    assert (e["a"], e["b"], e["n"], e["verdict"]) == ("last", "first", 3, "reversed")
    assert close(e["mean_diff"], -(0.2 + 0.25 + 0.25) / 3)
    assert list(eff.columns) == ["task", "a", "b", "n", "mean_diff", "ci95", "p_value", "cohens_dz", "verdict"]


def test_training_time_counts_every_core_only_for_a_cpu_run_with_all_threads():
    base = {"seed": 2, "wall_time_s": 120.0, "train_time_s": 100.0}
    assert training_time({**base, "device": "cpu", "environment": {"torch_threads": 4, "cpu_count": 4}}) == \
        {"seed": 2, "minutes": 2.0, "device": "cpu", "torch_threads": 4, "cpu_count": 4, "every_core": True}
    gpu = {**base, "device": "cuda", "environment": {"torch_threads": 4, "cpu_count": 4}}
    assert not training_time(gpu)["every_core"]
    bare = training_time(base)  # no device, no environment recorded
    assert (bare["device"], bare["torch_threads"], bare["cpu_count"], bare["every_core"]) == ("?", None, None, False)
    unknown = {**base, "device": "cpu", "environment": {"torch_threads": None, "cpu_count": None}}
    assert not training_time(unknown)["every_core"]


def test_best_verdict_markdown_whole():
    verdict = {"dev": {"sst": 0.51, "para": 0.8, "sts": 0.9}, "ci95": {"sst": None, "para": None, "sts": None},
               "targets": {"sst": 0.5, "para": 0.865, "sts": 0.87}, "met": {"sst": True, "para": False, "sts": True},
               "gap": {"sst": 0.01, "para": -0.065, "sts": 0.03}, "vs_study_best": {"sst": 0.013, "para": -0.064,
                                                                               "sts": 0.513},
               "training_minutes": None, "training_within_target": None, "seeds": [0],
               "training": [{"seed": 0, "minutes": None, "device": "cuda", "torch_threads": 8, "cpu_count": 16,
                             "every_core": False},
                            {"seed": 1, "minutes": 61.25, "device": "cpu", "torch_threads": 2, "cpu_count": 2,
                             "every_core": True}]}
    assert best_verdict_markdown(verdict) == "\n".join([
        "- **sst**: 0.510 vs target 0.500 (met); +0.013 vs the study's best row",
        "- **para**: 0.800 vs target 0.865 (missed by 0.065); -0.064 vs the study's best row",
        "- **sts**: 0.900 vs target 0.870 (met); +0.513 vs the study's best row",
        "- **training time**: not known on every core of the machine (target <= 60: not known)",
        "  - seed 0: not known on cuda (not a CPU run)",
        "  - seed 1: 61.2 minutes on cpu (every core)"])
    verdict.update(training_minutes=61.25, training_within_target=False)
    assert "- **training time**: 61.2 minutes on every core of the machine (target <= 60: missed)" in \
        best_verdict_markdown(verdict)


def test_ensemble_table_by_hand():
    chosen = {t: {"epochs": [3, 1], "val": 0.6 + i / 10, "val_single": {"1": 0.5, "3": 0.55 + i / 10},
                  "dev_single": {"1": 0.4, "3": 0.52 + i / 10}} for i, t in enumerate(("sst", "para", "sts"))}
    r = run(7, 0.53, 0.63, 0.73, selection={"epoch": 3, "snapshot_ensemble": chosen})
    df = ensemble_table([r])
    assert list(df["task"]) == ["sst", "para", "sts"] and set(df["seed"]) == {7}
    para = df.iloc[1].to_dict()
    assert para == {"seed": 7, "task": "para", "top-1 epoch": 3, "ensemble epochs": [3, 1], "k": 2,
                    "val top-1": 0.65, "val ensemble": 0.7, "dev top-1": 0.62, "dev ensemble": 0.63}
    without = {k: v for k, v in r.items() if k != "selection"}
    for bad in ({**r, "selection": None}, {**r, "selection": {"epoch": 3}}, without):
        with pytest.raises(ValueError) as e:
            ensemble_table([{**bad, "run_name": "best-x-seed7"}])
        assert str(e.value) == "run 'best-x-seed7' has no snapshot ensemble (snapshot_ensemble=0)"


def test_ablation_table_columns_and_refusals():
    v = {"change": {"lr": 2, "dropout": 0.1}, "val": {"sst": 0.5, "para": 0.8, "sts": 0.7}, "val_mean": 2 / 3,
         "dev": {"sst": 0.4, "para": 0.7, "sts": 0.6}, "training_minutes": None, "train_loop_minutes": 30.5}
    w = {**v, "val_mean": 0.7, "training_minutes": 41.0}
    del w["train_loop_minutes"]
    df = ablation_table({"variants": {"v": v, "w": w}})
    assert list(df.columns) == ["variant", "change", "val sst", "val para", "val sts", "val mean", "dev sst",
                                "dev para", "dev sts", "minutes", "loop minutes"]
    assert list(df["variant"]) == ["w", "v"] and list(df.index) == [0, 1]
    assert df.loc[1, "change"] == '{"dropout": 0.1, "lr": 2}'  # keys sorted
    assert (df.loc[1, "loop minutes"], df.loc[0, "minutes"]) == (30.5, 41.0)
    assert df.loc[0, "loop minutes"] is None or np.isnan(df.loc[0, "loop minutes"])
    for bad in ({}, [], None, {"variants": None}):
        with pytest.raises(ValueError) as e:
            ablation_table(bad)
        assert str(e.value) == "no variants in this ablation summary"


def test_a_claim_without_two_shared_seeds_is_skipped_not_the_end():
    a, b, c = [run(s, 0.5, 0.5, 0.5) for s in (0, 1)], [run(s, 0.4, 0.5, 0.5) for s in (0, 1)], [run(0, 0.1, 0.1, 0.1)]
    df = paired_table({"A": a, "B": b, "C": c}, [("A", "C"), ("A", "B")])
    assert list(df["b"]) == ["B"] * 4 and close(df.iloc[0]["mean_diff"], 0.1)


def test_summarize_frame_averages_the_training_time_when_there():
    df = pd.DataFrame([{"arm": "a", "sst": 0.5, "train_time_s": 10.0}, {"arm": "a", "sst": 0.7, "train_time_s": 20.0}])
    out = summarize_frame(df, ["arm"], metrics=("sst",))
    assert out.iloc[0]["train_time_s"] == 15.0 and "steps" not in out and "examples_seen" not in out


def test_grad_conflicts_counts_only_negative_cosines_and_warns_of_nothing():
    import warnings
    runs = [{"seed": 0, "history": [{"grad_cosines": {"sst|para": {"values": [0.0, -0.5, 0.5, 0.0]}}}]},
            {"seed": 1, "history": [{"grad_cosines": {"sst|para": {"values": [0.0, 0.3]}}}]}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice" from a run without a conflict
        df = grad_conflicts(runs)
    some, none = df.iloc[0], df.iloc[1]
    assert (some["conflict_rate"], some["conflict_cos"], some["surgery"]) == (0.25, -0.5, 0.125)  # a 0 is no conflict
    assert (none["conflict_rate"], none["surgery"]) == (0.0, 0.0) and math.isnan(none["conflict_cos"])


def test_position_effect_keeps_the_task_order_and_needs_only_first_and_last():
    rows = []
    for seed, drop in enumerate((0.1, 0.2)):  # two seeds are enough
        # sts first: tasks come out in the order they appear, not sorted
        rows += [{"task": "sts", "seed": seed, "position": 1, "score": 0.6},
                 {"task": "sts", "seed": seed, "position": 3, "score": 0.6 - drop}]  # no middle position
        # trained first and second only, never last: skipped, and the tasks after it still count
        rows += [{"task": "sst", "seed": seed, "position": p, "score": 0.4} for p in (1, 2)]
        rows += [{"task": "para", "seed": seed, "position": 1, "score": 0.7},
                 {"task": "para", "seed": seed, "position": 3, "score": 0.7 + drop}]
    # a seed with only the middle position (other arms) is no pair but does not drop the others
    rows += [{"task": "para", "seed": 2, "position": 2, "score": 0.1}, {"task": "para", "seed": 3, "position": 1,
                                                                          "score": 0.1}]
    rows += [{"task": "para", "seed": 3, "position": 2, "score": 0.1}, {"task": "para", "seed": 3, "position": 3,
                                                                          "score": 0.2}]
    eff = position_effect(pd.DataFrame(rows))
    assert list(eff["task"]) == ["sts", "para"] and list(eff["n"]) == [2, 3]
    assert close(eff.iloc[0]["mean_diff"], -0.15) and close(eff.iloc[1]["mean_diff"], (0.1 + 0.2 + 0.1) / 3)


def test_wall_minutes_at_the_edges():
    assert tables.wall_minutes({"wall_time_s": 300.0, "train_time_s": 300.0}) == 5.0  # equal: every session timed
    assert tables.wall_minutes({"wall_time_s": 0.6}) == 0.01  # no loop time recorded: nothing to compare with


def test_best_summary_names_its_row_and_records_each_run():
    def best_run(seed, device, ensemble=None):
        return {**run(seed, 0.5, 0.8, 0.85), "wall_time_s": 3600.0, "train_time_s": 3500.0, "run_name": f"b{seed}",
                "device": device, "environment": {"torch_threads": 2, "cpu_count": 2},
                "selection": {"epoch": 2, **({"snapshot_ensemble": ensemble} if ensemble else {})}}
    ensemble = {t: {"epochs": [2, 4]} for t in ("sst", "para", "sts")}
    runs = [best_run(0, "cpu", ensemble), best_run(1, "cpu"), {**best_run(2, "cuda"), "selection": None}]
    del runs[2]["device"]
    table, v = tables.best_summary(runs)
    assert list(table.columns[:4]) == ["source", "sst", "para", "sts"]
    assert list(table["source"]) == ["ours (all-MiniLM-L6-v2, 3 seeds)", *tables.BEST_REFERENCES]
    assert table.loc[1, "sst"] == 0.497 and table.loc[2, "para"] == 0.865
    assert tables.best_summary(runs[:1])[0].loc[0, "source"] == "ours (all-MiniLM-L6-v2, 1 seed)"
    assert v["ensemble_epochs"] == [{"sst": [2, 4], "para": [2, 4], "sts": [2, 4]}] and v["selected_epochs"] == [2, 2]
    assert v["devices"] == ["?", "cpu"] and v["seeds"] == [0, 1, 2] and v["run_names"] == ["b0", "b1", "b2"]
    assert v["training_minutes"] == 60.0 and v["training_within_target"] is True  # 60 minutes meets "<= 60"
    with pytest.raises(ValueError) as e:
        tables.best_summary([])
    assert str(e.value) == "no best-profile runs to summarize"


def test_best_summary_label_of_two_seeds_and_a_short_task_before_a_full_one():
    runs = [{**run(s, 0.5, 0.8, 0.85), "wall_time_s": 60.0, "run_name": f"b{s}", "seed": s} for s in (0, 1)]
    assert tables.best_summary(runs)[0].loc[0, "source"] == "ours (all-MiniLM-L6-v2, 2 seeds)"
    rows = [{"task": "sst", "seed": 0, "position": p, "score": 0.5} for p in (1, 3)]  # one pair: skipped
    rows += [{"task": "para", "seed": s, "position": p, "score": 0.5 + p / 10 + s / 100} for s in (0, 1) for p in (1, 3)]
    eff = position_effect(pd.DataFrame(rows))
    assert list(eff["task"]) == ["para"] and close(eff.iloc[0]["mean_diff"], 0.2)
