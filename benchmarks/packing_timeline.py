"""How fast a GPU trained while runs shared it: examples/s in all, over time, from a train-only call's files.

    python benchmarks/packing_timeline.py results/gpu-minilm [--bin 30]

Reads {results}/executed/train-only.json (or the copy gpu_run.py keeps beside its logs) and the run JSONs
it names, places each run's epochs on one clock and sums, per time bin, the examples/s of every run then
training: with the encoder training ("full"), heads only, and both in full-step equivalents (heads-only steps
at budget.HEADS_ONLY_COST). Writes packing_timeline.csv beside the summary it read (or --out).

Each epoch is stretched by its run's wall time / train time, so evaluation and set-up are spread over the
epochs. A run starts at its record's `start_s`; summaries written before packing recorded it (gpu-minilm's
first, 16 jobs) get the start times of the pool they came from: the first `jobs` runs of the submitted order
at 0, each later one when a slot frees. That order was longest first by the rule of that version (epochs x
batches per step, x1.5 with PCGrad; ties in list order), given by --legacy-order.

A call stopped by its time budget before packing rewrote the summary after every run (GPU session 3) has no
summary at all: `--jobs N` then takes every finished run JSON in the folder and starts them as a pool of N that
takes them costliest first (budget.relative_cost, as packing orders them now), each for its wall_time_s. Runs
the budget cut off wrote no JSON: the last rows miss their work.

    python benchmarks/packing_timeline.py --plot figures/bench/packing_timelines.png --csv "LABEL=CSV" ...

draws timelines written before, one line per CSV, on one clock: what the GPU trained a second, and how many
runs shared it (docs/gpu.md's figure of GPU sessions 1 and 3).
"""
from __future__ import annotations

import argparse
import csv
import heapq
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtbert_utils.budget import HEADS_ONLY_COST, expected_examples, relative_cost  # noqa: E402
from mtbert_utils.config import TrainConfig  # noqa: E402


def legacy_cost(config: dict) -> float:
    """packing's run-order rule before budget.expected_examples replaced it."""
    per_step = 1 if config["schedule"] == "sequential" else len(config["train_tasks"])
    return sum(int(n) for n, _ in config["phases"]) * per_step * (1.5 if config["pcgrad"] else 1.0)


def pool_starts(order: list[str], seconds: dict[str, float], jobs: int) -> dict[str, float]:
    """Start times of runs submitted in `order` to a pool of `jobs` slots."""
    free = [0.0] * jobs
    starts = {}
    for name in order:
        starts[name] = heapq.heappop(free)
        heapq.heappush(free, starts[name] + seconds[name])
    return starts


def pool_summary(runs_dir: Path, jobs: int) -> tuple[dict, list[str], dict[str, dict]]:
    """(a stand-in summary, the pool's order, the runs read) for a folder of finished runs with no train-only
    summary."""
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))}
    runs = {n: r for n, r in runs.items() if r.get("status") == "finished"}
    cost = {n: relative_cost(expected_examples(TrainConfig.from_dict(r["config"]))) for n, r in runs.items()}
    order = sorted(runs, key=lambda n: -cost[n])  # ties keep the folder's order
    return {"jobs": jobs, "runs": [{"run_name": n, "status": "trained", "seconds": runs[n]["wall_time_s"]}
                                   for n in order]}, order, runs


def timeline(summary: dict, runs: dict[str, dict], bin_s: float, legacy_order: list[str] | None) -> list[dict]:
    seconds = {r["run_name"]: r["seconds"] for r in summary["runs"] if r["status"] == "trained"}
    if all("start_s" in r for r in summary["runs"] if r["run_name"] in seconds):
        starts = {r["run_name"]: r["start_s"] for r in summary["runs"] if r["run_name"] in seconds}
    else:
        starts = pool_starts([n for n in legacy_order if n in seconds], seconds, summary["jobs"])
    bins: dict[int, dict] = {}
    for name, start in starts.items():
        run, t, before = runs[name], start, 0
        stretch = run["wall_time_s"] / run["train_time_s"]
        for h in run["history"]:
            seen = sum(h["examples_seen"].values())
            t0, t1, rate = t, t + h["epoch_time_s"] * stretch, (seen - before) / (h["epoch_time_s"] * stretch)
            for b in range(int(t0 // bin_s), int(t1 // bin_s) + 1):
                overlap = min(t1, (b + 1) * bin_s) - max(t0, b * bin_s)
                if overlap > 0:
                    row = bins.setdefault(b, {"full": 0.0, "heads_only": 0.0, "runs": set()})
                    row["full" if h["encoder_trainable"] else "heads_only"] += rate * overlap / bin_s
                    row["runs"].add(name)
            t, before = t1, seen
    return [{"from_s": b * bin_s, "runs_training": len(r["runs"]), "full_ex_per_s": round(r["full"]),
             "heads_only_ex_per_s": round(r["heads_only"]),
             "full_step_equivalents_per_s": round(r["full"] + HEADS_ONLY_COST * r["heads_only"])}
            for b, r in sorted(bins.items())]


def plot(timelines: dict[str, list[dict]]):
    """Full-step equivalents a second (top) and runs training (bottom) over time, one line per labelled timeline
    (rows as packing_timeline.csv has them), each row drawn over its bin; in the notebooks' figure theme."""
    from mtbert_utils.plotting import _themed  # matplotlib and seaborn only when a figure is drawn
    return _themed(_draw)(timelines)


def _draw(timelines: dict[str, list[dict]]):
    import matplotlib.pyplot as plt
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True, height_ratios=[2, 1])
    for label, rows in timelines.items():
        starts = [float(r["from_s"]) for r in rows]
        step = starts[1] - starts[0] if len(starts) > 1 else 30.0
        x = [*starts, starts[-1] + step]
        for ax, key in ((top, "full_step_equivalents_per_s"), (bottom, "runs_training")):
            ax.stairs([float(r[key]) for r in rows], x, label=label, linewidth=1.8)
    top.set_ylabel("full-step equivalents / s")
    top.set_title("Runs sharing one GPU: what it trained a second")
    top.set_ylim(0, top.get_ylim()[1] * 1.4)  # room above the lines for the legend
    top.legend(loc="upper right", fontsize="small")
    bottom.set_ylabel("runs training")
    bottom.set_xlabel("seconds since the call's training started")
    fig.tight_layout()
    return fig


def main_plot(out: str, csvs: list[str]) -> int:
    timelines = {}
    for item in csvs:
        label, sep, path = item.rpartition("=")
        if not sep or not label:
            sys.exit(f"--csv wants LABEL=PATH, got {item!r}")
        with open(path, newline="") as f:
            timelines[label] = list(csv.DictReader(f))
        if not timelines[label]:
            sys.exit(f"{path}: no rows")
    from mtbert_utils.results import save_figure
    print(f"-> {save_figure(plot(timelines), out, dpi=120)}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="?", help="a profile's results folder, e.g. results/gpu-minilm")
    ap.add_argument("--summary", default=None, help="train-only summary (default: executed/train-only.json)")
    ap.add_argument("--bin", type=float, default=30, help="seconds per row")
    ap.add_argument("--legacy-order", action="store_true",
                    help="the summary has no start_s: simulate the pool with that version's run order")
    ap.add_argument("--out", default=None, help="CSV (default: packing_timeline.csv beside the summary)")
    ap.add_argument("--jobs", type=int, default=None,
                    help="no summary: the folder's finished runs, started by a pool of this many, costliest first")
    ap.add_argument("--plot", default=None, metavar="PNG", help="instead: draw the --csv timelines into PNG")
    ap.add_argument("--csv", action="append", default=[], metavar="LABEL=CSV", help="with --plot: a timeline")
    args = ap.parse_args(argv)
    if args.plot:
        if not args.csv or args.results:
            ap.error("--plot draws --csv LABEL=CSV timelines (one or more), and takes no results folder")
        return main_plot(args.plot, args.csv)
    if not args.results:
        ap.error("a results folder is needed (or --plot with --csv)")
    results = Path(args.results)
    summary_path = Path(args.summary) if args.summary else results / "executed" / "train-only.json"
    if args.jobs is not None:
        if args.legacy_order or args.summary:
            ap.error("--jobs is for a folder with no summary: not with --summary or --legacy-order")
        summary, pool_order, runs = pool_summary(results / "runs", args.jobs)
        if not summary["runs"]:
            ap.error(f"no finished run JSON in {results / 'runs'}")
    else:
        summary, pool_order = json.loads(summary_path.read_text()), None
        runs = {r["run_name"]: json.loads((results / "runs" / f"{r['run_name']}.json").read_text())
                for r in summary["runs"] if r["status"] == "trained"}
    order = None
    if args.legacy_order:  # the list order (notebook by notebook, seed by seed), then longest first
        notebook = {r["run_name"]: r["notebook"] for r in summary["runs"]}
        listed = sorted(runs, key=lambda n: (notebook[n], runs[n]["seed"]))
        order = sorted(listed, key=lambda n: -legacy_cost(runs[n]["config"]))
    rows = timeline(summary, runs, args.bin, order or pool_order)
    out = Path(args.out) if args.out else summary_path.parent / "packing_timeline.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for r in rows:
        print(" ".join(f"{k} {v}" for k, v in r.items()))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
