"""Runs trained again with execution-only switches, set against the committed runs of the same names.

    python benchmarks/compare_runs.py /tmp/back/results/gpu-minilm            # against results/gpu-minilm
    python benchmarks/compare_runs.py NEW --against OLD --predicted results/bench/graph_trees-gpu-minilm.json \
        --out results/gpu-minilm/gpu_run-YYYYMMDD-HHMMSS/compare.md

What a GPU call that retrains a profile with `cuda_graphs` and `fuse_tasks` (docs/gpu.md) brings back, read in
one place. The switches change roundings, dropout's draw order and speed, never a run's name, so every new run
has a committed twin trained the plain way:
  - dev scores, new minus committed, paired by run name over every run both folders finished (mean difference
    with its 95% t interval; an interval that contains 0 means no score moved beyond the runs' spread);
  - each run's training time (train_time_s) against its twin's, and the switches it trained with;
  - the CUDA graphs it recorded (the last `cuda_graphs_recorded` of its history) against the count
    benchmarks/graph_shapes.py predicted before it ran (--predicted; the model counts the first use of each
    call as a recording, so a count above it means the model missed a kind of recording);
  - from the call's train-only summary (found beside its logs, or --summary): the runs that crashed with graphs
    and were trained again without them (`eager_retry`), those that failed, those not ended (training, or
    waiting for a slot) when a call stopped by its budget last wrote the summary (cut off), and the pool's minutes.
A run with no twin (the check's subsample runs) is listed with its graphs and time only.
Writes the table as markdown (--out, else stdout) and, beside it, the same as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtbert_utils.config import TrainConfig  # noqa: E402
from mtbert_utils.results import load_runs, write_json, write_text  # noqa: E402
from mtbert_utils.stats import paired_comparison, verdict  # noqa: E402

METRICS = ("sst", "para", "sts", "mean")
SWITCHES = ("precision", "tf32", "pad_to_multiple", "cuda_graphs", "fuse_tasks", "compile")
DEFAULTS = {k: getattr(TrainConfig(), k) for k in SWITCHES}  # the table shows a run's switches that differ


def runs_by_name(folder: Path) -> dict[str, dict]:
    """Finished runs under folder/runs (or folder itself if it has no runs/), by run name."""
    runs_dir = folder / "runs" if (folder / "runs").is_dir() else folder
    return {r["run_name"]: r for r in load_runs(runs_dir)}


def graphs_recorded(run: dict) -> int | None:
    """The CUDA graphs a run recorded: its last epoch's count (cumulative within a training session)."""
    counts = [h["cuda_graphs_recorded"] for h in run.get("history", []) if h.get("cuda_graphs_recorded") is not None]
    return counts[-1] if counts else None


def find_summaries(folder: Path) -> list[Path]:
    """The train-only summaries gpu_run.py keeps beside a call's logs (PROFILE-train-only*.json)."""
    return sorted(folder.rglob("*-train-only*.json"))


def summary_records(paths: list[Path]) -> tuple[dict, list[dict]]:
    """{run name: its record} over the summaries (a later one wins), and the summaries' headlines. A summary of a
    call stopped midway (`complete` false) names the runs not ended then: each gets a record {"status": "cut off"}."""
    records, heads = {}, []
    for p in paths:
        s = json.loads(p.read_text())
        heads.append({"file": p.name, "profile": s.get("profile"), "jobs": s.get("jobs"),
                      "minutes": s.get("minutes"), "trained": s.get("trained"), "failed": s.get("failed"),
                      "complete": s.get("complete", True)})
        records.update({r["run_name"]: r for r in s.get("runs", [])})
        if not s.get("complete", True):
            records.update({name: {"run_name": name, "status": "cut off"} for name in s.get("unfinished", [])})
    return records, heads


def compare(new: dict[str, dict], old: dict[str, dict], predicted: dict[str, dict] | None = None,
            records: dict[str, dict] | None = None) -> dict:
    """The comparison as a dict: one row per run in `new` (or failed in `records`), paired score differences."""
    predicted, records = predicted or {}, records or {}
    rows = []
    for name in sorted(set(new) | {n for n, r in records.items() if r.get("status") in ("failed", "cut off")}):
        run, twin, rec = new.get(name), old.get(name), records.get(name, {})
        row = {"run_name": name, "status": run["status"] if run else rec.get("status", "missing")}
        if run:
            row["switches"] = {k: run["config"][k] for k in SWITCHES if k in run["config"]}
            row["dev"] = {m: run["dev"][m] for m in METRICS}
            row["train_time_s"] = run["train_time_s"]
            row["cuda_graphs_recorded"] = graphs_recorded(run)
        if twin:
            row["committed_dev"] = {m: twin["dev"][m] for m in METRICS}
            row["committed_train_time_s"] = twin["train_time_s"]
        if name in predicted:
            row["predicted_graphs"] = predicted[name]["nodes"]
        for key in ("eager_retry", "error"):
            if key in rec:
                row[key] = rec[key]
        rows.append(row)
    both = [r for r in rows if "dev" in r and "committed_dev" in r]
    paired = {}
    if len(both) >= 2:
        for m in METRICS:
            c = paired_comparison([r["dev"][m] for r in both], [r["committed_dev"][m] for r in both])
            paired[m] = {**c, "verdict": verdict(c["mean_diff"], c["ci95"])}
    graphs = [r for r in rows if r.get("cuda_graphs_recorded") is not None and "predicted_graphs" in r]
    return {
        "runs": rows,
        "paired": paired,  # new minus committed, over the runs both finished
        "train_time_s": {"new": sum(r["train_time_s"] for r in both),
                         "committed": sum(r["committed_train_time_s"] for r in both), "runs": len(both)},
        "graphs": {"runs": len(graphs),
                   "at_most_predicted": sum(r["cuda_graphs_recorded"] <= r["predicted_graphs"] for r in graphs),
                   "recorded": sum(r["cuda_graphs_recorded"] for r in graphs),
                   "predicted": sum(r["predicted_graphs"] for r in graphs)},
        "eager_retries": [r["run_name"] for r in rows if "eager_retry" in r],
        "failed": [r["run_name"] for r in rows if r["status"] == "failed"],
        "cut_off": [r["run_name"] for r in rows if r["status"] == "cut off"],  # training when the call stopped
    }


def _f(x, fmt=".3f") -> str:
    return "" if x is None else format(x, fmt)


def markdown(result: dict) -> str:
    lines = []
    for h in result.get("summaries", []):
        lines.append(f"- train-only summary `{h['file']}`: profile {h['profile']}, {h['jobs']} jobs, "
                     f"{h['trained']} trained, {h['failed']} failed, {_f(h['minutes'], '.1f')} min"
                     + ("" if h.get("complete", True) else " when last written (the call was stopped)"))
    t = result["train_time_s"]
    if t["runs"] and t["new"] > 0:
        lines.append(f"- training time of the {t['runs']} runs with a committed twin: {t['new'] / 60:.1f} min "
                     f"against {t['committed'] / 60:.1f} min summed over runs "
                     f"({t['committed'] / t['new']:.2f}x; runs shared the GPU, so this is not the call's wall time)")
    for m, c in result["paired"].items():
        lines.append(f"- {m}: new - committed {c['mean_diff']:+.4f} ± {c['ci95']:.4f} over {c['n']} runs "
                     f"(p = {c['p_value']:.2f}): {'no change beyond the spread' if c['verdict'] == 'not resolved' else c['verdict']}")
    g = result["graphs"]
    if g["runs"]:
        lines.append(f"- CUDA graphs: {g['at_most_predicted']} of {g['runs']} runs recorded at most the predicted "
                     f"count ({g['recorded']} recorded, {g['predicted']} predicted in all)")
    if result["eager_retries"]:
        lines.append(f"- trained again without cuda_graphs after a crash: {', '.join(result['eager_retries'])}")
    if result["failed"]:
        lines.append(f"- failed: {', '.join(result['failed'])}")
    if result.get("cut_off"):
        lines.append(f"- cut off by the call's stop (training or waiting for a slot): {', '.join(result['cut_off'])}")
    head = ("| run | status | switches | " + " | ".join(f"{m} (committed)" for m in METRICS)
            + " | train s (committed) | graphs (predicted) |")
    lines += ["", head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["runs"]:
        dev, old = r.get("dev", {}), r.get("committed_dev", {})
        sw = ", ".join(f"{k}={v}" for k, v in r.get("switches", {}).items() if v != DEFAULTS[k])
        cells = [f"{_f(dev.get(m))} ({_f(old.get(m))})" for m in METRICS]
        lines.append(f"| {r['run_name']} | {r['status']}{' (eager retry)' if 'eager_retry' in r else ''} | {sw} | "
                     + " | ".join(cells) + f" | {_f(r.get('train_time_s'), '.0f')} "
                     f"({_f(r.get('committed_train_time_s'), '.0f')}) | {_f(r.get('cuda_graphs_recorded'), 'd')} "
                     f"({_f(r.get('predicted_graphs'), 'd')}) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("new", help="the results folder that came back (e.g. SCRATCH/results/gpu-minilm)")
    ap.add_argument("--against", default=None, help="committed results folder (default: results/<new's name>)")
    ap.add_argument("--predicted", default=None, help="graph_shapes.py --profile output (graph counts per run)")
    ap.add_argument("--summary", action="append", default=None,
                    help="train-only summary JSON (default: every *-train-only*.json under NEW)")
    ap.add_argument("--out", default=None, help="markdown file (its .json beside it); default: print")
    args = ap.parse_args(argv)
    new_dir = Path(args.new)
    against = Path(args.against) if args.against else ROOT / "results" / new_dir.name
    for p in (new_dir, against):
        if not p.is_dir():
            ap.error(f"no results folder {p}")
    new = runs_by_name(new_dir)
    summaries = [Path(s) for s in args.summary] if args.summary else find_summaries(new_dir)
    records, heads = summary_records(summaries)
    if not new and not records:
        ap.error(f"no finished run and no train-only summary under {new_dir}")
    predicted = json.loads(Path(args.predicted).read_text())["runs"] if args.predicted else None
    result = {**compare(new, runs_by_name(against), predicted, records), "summaries": heads}
    text = markdown(result)
    if args.out:
        write_text(args.out, text)
        write_json(Path(args.out).with_suffix(".json"), result)
        print(f"wrote {args.out} and its .json")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
