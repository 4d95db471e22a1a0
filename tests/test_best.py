"""Notebook 08 (the best profile) under the smoke-best profile, and the pieces it is built from."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtbert_utils import experiments
from mtbert_utils.tasks import TASK_SPECS
from mtbert_utils.training import TrainConfig

from conftest import float32_tol, load_benchmark

NB = "08_best_model"


@pytest.fixture(scope="module")
def best_run(run_profile):
    return run_profile("smoke-best")


def test_notebook_writes_results_figures_and_predictions(best_run):
    results, figures, records = best_run
    assert [r["notebook"] for r in records] == [NB]
    for name in (f"{NB}.json", f"{NB}_summary.csv", f"{NB}_summary.md", f"{NB}_validation.csv",
                 f"runs/{NB}/index.json"):
        assert (results / name).is_file(), name
    for name in (f"{NB}_learning_curves.png", f"{NB}_vs_study.png"):
        assert (figures / name).stat().st_size > 5_000, name
    runs = experiments.load_index(results, NB)["best"]
    assert len(runs) == 2
    for run in runs:
        pred = Path(run["predictions_dir"])
        assert pred.is_relative_to(results)
        # CS224N test-student submission files (the local mirror has no quora-test-student.csv)
        for task in ("sst", "sts"):
            lines = (pred / f"{task}-test-output.csv").read_text().splitlines()
            header = TASK_SPECS[task].output_header
            assert lines[0].split("\t")[0].strip() == "id" and header in lines[0]
            assert len(lines) > 100 and all(" , " in l for l in lines[1:])


def test_selection_used_validation_only_and_dev_once(best_run):
    results, _, _ = best_run
    runs = experiments.load_index(results, NB)["best"]
    val = pd.read_csv(results / f"{NB}_validation.csv")
    for run in runs:
        assert all("dev" not in h for h in run["history"])
        v = val[val["seed"] == run["seed"]]
        assert int(v.loc[v["mean"].idxmax(), "epoch"]) == run["selection"]["epoch"]
        assert v["selected"].sum() == 1
    saved = json.loads((results / f"{NB}.json").read_text())
    verdict = saved["verdict"]
    for t in ("sst", "para", "sts"):
        assert verdict["dev"][t] == pytest.approx(sum(r["dev"][t] for r in runs) / len(runs))
        assert verdict["met"][t] == (verdict["dev"][t] >= verdict["targets"][t])
    assert saved["config"]["val_fraction"] == 0.1 and saved["config"]["name"] == "best"


def test_best_summary_by_hand():
    alone, shared = {"torch_threads": 2, "cpu_count": 2}, {"torch_threads": 1, "cpu_count": 2}
    runs = [{"dev": {"sst": 0.52, "para": 0.80, "sts": 0.90}, "wall_time_s": 1800.0, "seed": 0, "run_name": "a",
             "device": "cpu", "selection": {"epoch": 3}, "environment": alone},
            {"dev": {"sst": 0.48, "para": 0.90, "sts": 0.86}, "wall_time_s": 3900.0, "seed": 1, "run_name": "b",
             "device": "cpu", "selection": {"epoch": 4}, "environment": alone}]
    table, v = experiments.best_summary(runs)
    assert v["dev"] == pytest.approx({"sst": 0.50, "para": 0.85, "sts": 0.88})
    # two seeds: sd of (0.52, 0.48) is 0.02*sqrt(2), sem 0.02, t(0.975, 1 dof) = 12.706
    assert v["ci95"]["sst"] == pytest.approx(12.7062 * 0.02, rel=1e-4)
    assert table.loc[0, "sst ci95"] == v["ci95"]["sst"] and table["sst ci95"].iloc[1:].isna().all()
    assert v["met"] == {"sst": True, "para": False, "sts": True}
    assert v["gap"]["para"] == pytest.approx(0.85 - 0.865)
    assert v["vs_study_best"]["sst"] == pytest.approx(0.50 - 0.497)
    assert v["training_minutes"] == pytest.approx(65.0) and not v["training_within_target"]
    assert v["selected_epochs"] == [3, 4]
    assert list(table["source"])[0].startswith("ours") and len(table) == 1 + len(experiments.BEST_REFERENCES)
    # a seed trained beside another (one thread of two) does not count for the time target, but is listed
    runs[1]["environment"] = shared
    _, v = experiments.best_summary(runs)
    assert v["training_minutes"] == pytest.approx(30.0) and v["training_within_target"]
    assert [t["every_core"] for t in v["training"]] == [True, False]
    text = experiments.best_verdict_markdown(v)
    assert "- **sst**: 0.500 ± 0.254 (95% CI, 2 seeds) vs target 0.500 (met)" in text
    assert "- **para**: 0.850 ± 0.635 (95% CI, 2 seeds) vs target 0.865 (missed by 0.015)" in text
    assert "30.0 minutes on every core of the machine (target <= 60: met)" in text
    assert "  - seed 1: 65.0 minutes on cpu (1 of 2 cores, shared)" in text
    runs[0]["environment"] = shared  # no run had the machine to itself: the time target is not known
    _, v = experiments.best_summary(runs)
    assert v["training_minutes"] is None and v["training_within_target"] is None
    _, one = experiments.best_summary(runs[:1])
    assert one["ci95"] == {"sst": None, "para": None, "sts": None} and "95% CI" not in experiments.best_verdict_markdown(one)
    with pytest.raises(ValueError, match="no best-profile runs"):
        experiments.best_summary([])


def test_wall_minutes_only_when_every_session_was_timed():
    run = {"wall_time_s": 600.0, "train_time_s": 500.0}
    assert experiments.wall_minutes(run) == 10.0  # recorded before the flag: complete, wall >= loop
    assert experiments.wall_minutes({**run, "wall_time_s": 400.0}) is None  # shorter than its own loop: resumed
    assert experiments.wall_minutes({**run, "wall_time_complete": False}) is None
    assert experiments.wall_minutes({**run, "wall_time_complete": True, "resumes": 2}) == 10.0
    runs = [{"dev": {"sst": 0.5, "para": 0.8, "sts": 0.9}, "wall_time_s": 400.0, "train_time_s": 500.0, "seed": 0,
             "run_name": "a", "device": "cpu", "environment": {"torch_threads": 2, "cpu_count": 2}}]
    _, v = experiments.best_summary(runs)
    assert v["training_minutes"] is None and v["training_within_target"] is None


def test_best_config():
    c = experiments.best_config(epochs=3, data_dir="")
    assert isinstance(c, TrainConfig) and c.epochs == 3 and c.val_fraction == 0.1 and c.data_dir is None
    assert c.max_train is None and c.max_dev is None and c.write_predictions
    assert c.snapshot_ensemble == 3 and experiments.best_config().epochs == 5
    with pytest.raises(ValueError, match="epochs"):
        experiments.best_config(epochs=0)


def test_frame_markdown_by_hand():
    df = pd.DataFrame([{"source": "ours", "sst": 0.51234, "seeds": 3}])
    assert experiments.frame_markdown(df) == "| source | sst | seeds |\n|---|---|---|\n| ours | 0.512 | 3 |\n"
    df = pd.DataFrame([{"source": "ours", "sst": 0.51234, "sst ci95": 0.0201}, {"source": "study", "sst": 0.497}])
    assert experiments.frame_markdown(df).splitlines()[2:] == ["| ours | 0.512 | 0.020 |", "| study | 0.497 |  |"]


def test_ensemble_table_from_the_smoke_runs(best_run):
    results, _, _ = best_run
    runs = experiments.load_index(results, NB)["best"]
    table = pd.read_csv(results / f"{NB}_ensemble.csv")
    assert len(table) == 3 * len(runs)
    for run in runs:
        for t in ("sst", "para", "sts"):
            row = table[(table["seed"] == run["seed"]) & (table["task"] == t)].iloc[0]
            chosen = run["selection"]["snapshot_ensemble"][t]
            assert row["dev ensemble"] == pytest.approx(run["dev"][t]) and row["k"] == len(chosen["epochs"])
            assert row["val top-1"] == pytest.approx(max(chosen["val_single"].values()))
            assert row["val ensemble"] >= row["val top-1"]  # k = 1 is always a candidate
    with pytest.raises(ValueError, match="no snapshot ensemble"):
        experiments.ensemble_table([{**runs[0], "selection": {"epoch": 1}}])


def test_best_ablation_script_reuses_the_profile_run(small_data_dir, tmp_path, one_thread):
    mod = load_benchmark("best_ablation")
    args = ["--encoder", "tiny", "--data-dir", str(small_data_dir), "--max-train", "40", "--max-dev", "16",
            "--epochs", "2", "--out", str(tmp_path)]
    mod.main(["--change", "no_para_swap", *args])
    summary = json.loads((tmp_path / "ablation.json").read_text())["variants"]
    assert set(summary) == {"profile", "no_para_swap"}
    profile = experiments.best_config(encoder="tiny", max_train=40, max_dev=16, epochs=2)
    assert summary["profile"]["run_name"] == profile.run_name  # the profile's own run, reused by notebook 08
    assert summary["no_para_swap"]["run_name"] != profile.run_name and summary["no_para_swap"]["change"] == {"para_swap": False}
    assert summary["profile"]["change"] == {}
    for v in summary.values():
        run = json.loads((tmp_path / "runs" / f"{v['run_name']}.json").read_text())
        assert v["dev"] == {t: run["dev"][t] for t in ("sst", "para", "sts")}
        assert v["val_mean"] == pytest.approx(sum(v["val"].values()) / 3)
    stamp = (tmp_path / "runs" / f"{summary['no_para_swap']['run_name']}.json").stat().st_mtime_ns
    mod.main(["--change", "no_para_swap", *args])  # finished runs are reused, not retrained
    assert (tmp_path / "runs" / f"{summary['no_para_swap']['run_name']}.json").stat().st_mtime_ns == stamp
    # a variant whose settings are the profile's is not trained twice
    mod.main(["--change", "para_swap", *args])
    assert "para_swap" not in json.loads((tmp_path / "ablation.json").read_text())["variants"]
    # the runs' dev outputs averaged (benchmarks/best_run_ensemble.py): each member's dev is its run's
    ens = load_benchmark("best_run_ensemble").main(["--best", str(tmp_path)])
    assert json.loads((tmp_path / "run_ensemble.json").read_text())["dev"] == ens["dev"]
    for name, member in ens["members"].items():
        # accuracies exactly; r from the scores csv, whose text round trip moves each float32 score x by up to
        # eps/2 |x|, and r = <x^, y^> (centred unit vectors) moves by at most 2 |dx| / |x - mean(x)|
        run_dev = summary[name]["dev"]
        assert (member["dev"]["sst"], member["dev"]["para"]) == (run_dev["sst"], run_dev["para"])
        x = pd.read_csv(tmp_path / "runs" / "predictions" / summary[name]["run_name"] / "sts-dev-scores.csv")["pred"]
        x = x.to_numpy(dtype=float)
        tol = float32_tol(1) * np.linalg.norm(x) / np.linalg.norm(x - x.mean())
        assert member["dev"]["sts"] == pytest.approx(run_dev["sts"], rel=0, abs=tol)
    assert ens["training_minutes_total"] == pytest.approx(sum(v["train_loop_minutes"] for v in summary.values()))


def test_ablation_table_by_hand():
    v = lambda val, dev: {"change": {}, "val": dict(zip(("sst", "para", "sts"), val)), "val_mean": sum(val) / 3,
                          "dev": dict(zip(("sst", "para", "sts"), dev)), "training_minutes": 40.0}
    table = experiments.ablation_table({"variants": {"a": v((0.5, 0.8, 0.8), (0.4, 0.8, 0.8)),
                                                     "b": v((0.5, 0.9, 0.8), (0.4, 0.7, 0.8))}})
    assert list(table["variant"]) == ["b", "a"]  # ranked on validation, not on dev
    assert table.loc[0, "dev para"] == 0.7 and table.loc[0, "val mean"] == pytest.approx(2.2 / 3)
    with pytest.raises(ValueError, match="no variants"):
        experiments.ablation_table({"variants": {}})


def test_run_ensemble_averages_probabilities_and_scores_dev_by_hand(tmp_path):
    mod = load_benchmark("best_run_ensemble")
    ids = ["a", "b", "c", "d"]
    gold = {"sst": [0, 1, 2, 3], "para": [1, 0, 1, 0], "sts": [0.0, 1.0, 2.0, 3.0]}
    # run x: right on SST a, b; run y: right on c, d but unsure: the average of probabilities decides
    log = lambda p: np.log(np.clip(p, 1e-20, 1))
    sst_x = log([[.9, .1, 0, 0, 0], [.1, .9, 0, 0, 0], [.6, 0, .4, 0, 0], [.6, 0, 0, .4, 0]])
    sst_y = log([[.4, .6, 0, 0, 0], [.6, .4, 0, 0, 0], [0, 0, .9, .1, 0], [0, 0, .1, .9, 0]])
    para = {"x": [2.0, -1.0, -0.5, 1.0], "y": [-1.0, 3.0, 2.0, -3.0]}
    sts = {"x": [0.1, 0.2, 0.3, 0.4], "y": [0.1, 0.3, 0.2, 0.5]}
    for run, sst in (("x", sst_x), ("y", sst_y)):
        d = tmp_path / run
        d.mkdir()
        pd.DataFrame({"id": ids, **{f"raw_{k}": sst[:, k] for k in range(5)}, "pred": 0, "gold": gold["sst"]}
                     ).to_csv(d / "sst-dev-scores.csv", index=False)
        pd.DataFrame({"id": ids, "raw": para[run], "pred": 0, "gold": gold["para"]}).to_csv(d / "para-dev-scores.csv", index=False)
        pd.DataFrame({"id": ids, "raw": sts[run], "pred": 0, "gold": gold["sts"]}).to_csv(d / "sts-dev-scores.csv", index=False)
    runs = {n: {"run_name": n, "sts_head": "cosine", "minutes": 40.0} for n in ("x", "y")}
    out = mod.run_ensemble(runs, tmp_path)
    assert out["members"]["x"]["dev"]["sst"] == 0.5 and out["members"]["y"]["dev"]["sst"] == 0.5
    assert out["dev"]["sst"] == 1.0  # averaged probabilities: .65/.35, .35/.65 for a, b; .45 vs .65 for c, d
    # para: mean sigmoid > 0.5 for a (0.88, 0.27), b (0.27, 0.95), c (0.38, 0.88), not d (0.73, 0.05): a, c, d right
    assert out["members"]["x"]["dev"]["para"] == 0.5 and out["dev"]["para"] == 0.75
    # the float32 average rounds each score twice (cast, mean), and r = <x^, y^> (centred unit vectors)
    # moves by at most 2 |dx| / |x - mean(x)|
    x = np.array([0.1, 0.25, 0.25, 0.45])
    tol = float32_tol(2) * np.linalg.norm(x) / np.linalg.norm(x - x.mean())
    assert out["dev"]["sts"] == pytest.approx(np.corrcoef(x, gold["sts"])[0, 1], rel=0, abs=tol)
    assert out["training_minutes_total"] == 80.0 and out["size"] == 2
    assert out["dev_best_member"]["sst"] == 0.5
    with pytest.raises(ValueError, match="at least 2"):
        mod.run_ensemble({"x": runs["x"]}, tmp_path)
    (tmp_path / "y" / "para-dev-scores.csv").write_text("id,raw,pred,gold\nd,1,1,0\nc,1,1,1\nb,1,1,0\na,1,1,1\n")
    with pytest.raises(ValueError, match="predicted different examples"):
        mod.run_ensemble(runs, tmp_path)
    with pytest.raises(FileNotFoundError, match="no dev outputs"):
        mod.run_ensemble({**runs, "z": {"run_name": "z", "sts_head": "cosine", "minutes": 1.0}}, tmp_path)
