"""What more compute would buy: the committed `best`-profile runs averaged into one ensemble, on dev.

    python benchmarks/best_run_ensemble.py

Every run of results/best/ablation.json (the profile and its one-change variants, all trained on the same 2
cores) wrote its raw dev outputs (`predictions/<run>/<task>-dev-scores.csv`). This averages them the way a
snapshot ensemble does (evaluation.combine_outputs: SST and Quora probabilities, STS scores) and scores the
average on dev. Nothing is chosen: every run is a member, so dev is not used to pick anything, and each
member's own dev score is listed beside it. The ensemble is **not** a candidate for the `best` profile: its
members together trained for several times the 60-minute budget (`training_minutes_total`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtbert_utils import TASKS  # noqa: E402
from mtbert_utils.evaluation import ensemble_prediction  # noqa: E402
from mtbert_utils.results import write_json  # noqa: E402
from mtbert_utils.tasks import TASK_SPECS, predictions_from_outputs  # noqa: E402


def read_dev_outputs(pred_dir: Path, task: str) -> tuple[list, np.ndarray, np.ndarray]:
    """ids, raw outputs (n, or n x 5 for SST) and gold labels of one run's dev predictions."""
    path = pred_dir / f"{task}-dev-scores.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no dev outputs (was the run trained with write_predictions=True?)")
    df = pd.read_csv(path, dtype={"id": str})
    raw_cols = [c for c in df.columns if c == "raw" or c.startswith("raw_")]
    raw = df[raw_cols].to_numpy(np.float32, copy=True)
    return list(df["id"]), (raw[:, 0] if raw_cols == ["raw"] else raw), df["gold"].to_numpy()


def run_ensemble(runs: dict[str, dict], pred_root: Path) -> dict:
    """runs: member name -> {"run_name", "sts_head", "minutes"}. Returns each member's and the average's dev."""
    if len(runs) < 2:
        raise ValueError(f"an ensemble of runs needs at least 2 members, got {len(runs)}")
    out = {"members": {}, "dev": {}, "dev_best_member": {}}
    heads = {m["sts_head"] for m in runs.values()}
    if len(heads) != 1:
        raise ValueError(f"members disagree on the STS head: {sorted(heads)}")
    sts_head = heads.pop()
    for task in TASKS:
        metric = TASK_SPECS[task].metric
        members = []
        for name, m in runs.items():
            ids, raw, gold = read_dev_outputs(pred_root / m["run_name"], task)
            members.append({"ids": ids, "raw": raw, "gold": gold})
            pred = predictions_from_outputs(task, torch.as_tensor(raw), sts_head)
            out["members"].setdefault(name, {"run_name": m["run_name"], "dev": {}})["dev"][task] = float(metric(pred, gold))
        # the same averaging as a snapshot ensemble; it refuses members that predicted other examples
        avg = ensemble_prediction(task, members, sts_head)
        out["dev"][task] = float(metric(avg["pred"], members[0]["gold"]))
        out["dev_best_member"][task] = max(v["dev"][task] for v in out["members"].values())
    out["training_minutes_total"] = sum(m["minutes"] for m in runs.values())
    out["size"] = len(runs)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--best", default=str(ROOT / "results" / "best"), help="results folder of the best profile")
    args = ap.parse_args(argv)
    best = Path(args.best)
    variants = json.loads((best / "ablation.json").read_text())["variants"]
    runs = {}
    for name, v in variants.items():
        record = json.loads((best / "runs" / f"{v['run_name']}.json").read_text())
        runs[name] = {"run_name": v["run_name"], "sts_head": record["config"]["sts_head"],
                      # the training loop's minutes: known for every run, resumed ones included
                      "minutes": v.get("train_loop_minutes", record["train_time_s"] / 60)}
    result = run_ensemble(runs, best / "runs" / "predictions")
    write_json(best / "run_ensemble.json", result)
    print(json.dumps({k: result[k] for k in ("size", "dev", "dev_best_member", "training_minutes_total")}, indent=1))
    return result


if __name__ == "__main__":
    main()
