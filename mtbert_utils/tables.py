"""Tables: everything the notebooks tabulate, computed from result files (run JSONs) alone.

Table 1 and the study's numbers beside it, summaries over seeds (mean and 95% CI), paired
comparisons, tidy one-row-per-run frames, gradient-conflict statistics and the `best` profile's
tables. The Markdown readings written from these tables are in readings.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from mtbert_utils import TASKS
from mtbert_utils.gradients import run_cosines
from mtbert_utils.results import load_index
from mtbert_utils.stats import mean_ci, paired_comparison, verdict

# The study's Table 1 (dev, bert-base-uncased, one seed each): reference values to compare against.
STUDY_TABLE1 = {
    "random sequential": {"sst": 0.304, "para": 0.670, "sts": 0.212},
    "RR undersampling": {"sst": 0.301, "para": 0.632, "sts": 0.181},
    "RR oversampling": {"sst": 0.432, "para": 0.691, "sts": 0.272},
    "RR oversampling + tuning + cosine": {"sst": 0.497, "para": 0.864, "sts": 0.387},
    "RR oversampling + tuning + cosine + PCGrad": {"sst": 0.497, "para": 0.860, "sts": 0.378},
}


# Table 1 rows: (row label, notebook that makes the runs, run name in that notebook's index)
TABLE1_ROWS = [
    ("zero-shot (encoder not fine-tuned)", "04_cosine_sts", "zero-shot"),
    ("random sequential", "01_sequential", "sequential-baseline"),
    ("RR undersampling", "02_rr_undersampling", "rr_under-baseline"),
    ("RR oversampling", "03_rr_oversampling", "rr_over-baseline"),
    ("RR oversampling + tuning + cosine", "04_cosine_sts", "rr_over-tuned-cosine"),
    ("RR oversampling + tuning + cosine + PCGrad", "05_pcgrad_ablation", "rr_over-tuned-cosine-pcgrad"),
]


METRICS = (*TASKS, "mean", "overall")


def summarize(runs_by_row: dict[str, list[dict]]) -> pd.DataFrame:
    """One row per configuration: mean and 95% CI over seeds of each task metric and the two summaries."""
    rows = []
    for label, runs in runs_by_row.items():
        row = {"row": label, "seeds": len(runs)}
        for key in (*TASKS, "mean", "overall"):
            m, ci = mean_ci([r["dev"][key] for r in runs])
            row[f"{key}_mean"], row[f"{key}_ci95"] = m, ci
        row["train_time_s"] = sum(r.get("train_time_s", 0.0) for r in runs) / len(runs)
        row["examples_seen"] = sum(sum(r.get("examples_seen", {}).values()) for r in runs) / len(runs)
        rows.append(row)
    return pd.DataFrame(rows)


def table1(results_dir: str | Path) -> tuple[pd.DataFrame, dict[str, list[dict]]]:
    """Table 1 from the result files only, with the study's numbers beside ours."""
    runs_by_row, indexes = {}, {}
    for label, notebook, name in TABLE1_ROWS:
        if notebook not in indexes:
            indexes[notebook] = load_index(results_dir, notebook)
        if name not in indexes[notebook]:
            raise KeyError(f"{notebook} index has no runs named {name!r}; it has {sorted(indexes[notebook])}")
        runs_by_row[label] = indexes[notebook][name]
    table = summarize(runs_by_row)
    for task in TASKS:
        table[f"study_{task}"] = [STUDY_TABLE1.get(r, {}).get(task) for r in table["row"]]
    return table, runs_by_row


def format_cell(mean: float, ci: float) -> str:
    return f"{mean:.3f}" if ci != ci else f"{mean:.3f} ± {ci:.3f}"  # ci != ci: nan for a single seed


def table_markdown(table: pd.DataFrame) -> str:
    """Markdown: ours as mean ± 95% CI half-width over seeds, the study's value in brackets."""
    head = "| configuration | seeds | SST acc | Quora acc | STS r | mean |\n|---|---|---|---|---|---|\n"
    lines = []
    for _, r in table.iterrows():
        cells = []
        for task in TASKS:
            s = format_cell(r[f"{task}_mean"], r[f"{task}_ci95"])
            study = r.get(f"study_{task}")
            cells.append(s + (f" ({study:.3f})" if study is not None and study == study else ""))
        lines.append(f"| {r['row']} | {r['seeds']} | " + " | ".join(cells)
                     + f" | {format_cell(r['mean_mean'], r['mean_ci95'])} |")
    return head + "\n".join(lines) + "\n"


def frame_markdown(df: pd.DataFrame, digits: int = 3) -> str:
    """A DataFrame as a Markdown table, floats rounded, a missing value (NaN) an empty cell (no tabulate needed)."""
    fmt = lambda v: ("" if v != v else f"{v:.{digits}f}") if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def paired_table(runs_by_row: dict[str, list[dict]], claims: list[tuple[str, str]]) -> pd.DataFrame:
    """Paired (same seeds) comparisons a - b per task for each claimed ordering (a, b); a pair with fewer than
    two shared seeds has no rows (no spread to test), and with none at all the table is empty with its columns."""
    rows = []
    for a, b in claims:
        ra = {r["seed"]: r for r in runs_by_row[a]}
        rb = {r["seed"]: r for r in runs_by_row[b]}
        seeds = sorted(set(ra) & set(rb))
        if len(seeds) < 2:
            continue
        for key in (*TASKS, "mean"):
            c = paired_comparison([ra[s]["dev"][key] for s in seeds], [rb[s]["dev"][key] for s in seeds])
            rows.append({"a": a, "b": b, "metric": key, **c})
    return pd.DataFrame(rows, columns=["a", "b", "metric", "n", "mean_diff", "ci95", "p_value", "cohens_dz"])


def runs_frame(runs: list[dict], **labels) -> pd.DataFrame:
    """Tidy table, one row per run: the given labels, seed, dev metrics, examples seen, steps, time."""
    rows = []
    for r in runs:
        seen = r.get("examples_seen", {})
        rows.append({**labels, "seed": r["seed"], "run_name": r.get("run_name"),
                     **{m: r["dev"].get(m) for m in METRICS},
                     "examples_seen": sum(seen.values()), **{f"seen_{t}": seen.get(t, 0) for t in TASKS},
                     "steps": r.get("steps"), "epochs_run": len(r.get("history", [])),
                     "examples_budget": r["config"].get("examples_budget"),
                     "train_time_s": r.get("train_time_s"), "result_file": Path(r["result_path"]).name
                     if r.get("result_path") else None})
    return pd.DataFrame(rows)


def summarize_frame(df: pd.DataFrame, by: list[str], metrics=METRICS) -> pd.DataFrame:
    """Mean and 95% CI half-width over seeds of each metric, per group of a tidy runs table (group order kept)."""
    rows = []
    for key, g in df.groupby(by, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        row = {**dict(zip(by, key)), "seeds": len(g)}
        for m in metrics:
            row[f"{m}_mean"], row[f"{m}_ci95"] = mean_ci(g[m].to_numpy(dtype=float))
        for col in ("examples_seen", "steps", "train_time_s"):
            if col in g:
                row[col] = float(g[col].mean())
        rows.append(row)
    return pd.DataFrame(rows)


def grad_conflicts(runs: list[dict], **labels) -> pd.DataFrame:
    """Per run and task pair, from the per-step gradient cosines of the epochs that train the encoder
    (gradients.run_cosines; measured before any projection):
    mean cosine, conflict rate (cos < 0), mean cosine of the conflicting steps, and the surgery size
    mean(max(0, -cos)): the fraction of a task gradient's norm PCGrad removes per step for that pair."""
    rows = []
    for r in runs:
        for pair, vals in run_cosines(r).items():
            v = np.asarray(vals, dtype=float)
            rows.append({**labels, "seed": r["seed"], "pair": pair, "steps": len(v), "mean_cos": float(v.mean()),
                         "conflict_rate": float((v < 0).mean()),
                         "conflict_cos": float(v[v < 0].mean()) if (v < 0).any() else float("nan"),
                         "surgery": float(np.clip(-v, 0, None).mean())})
    return pd.DataFrame(rows)


def weighting_label(weights: dict) -> str:
    """'equal' or e.g. 'sst:3 para:1 sts:1' for a task-weight dict."""
    vals = [float(weights[t]) for t in TASKS]
    return "equal" if len(set(vals)) == 1 else " ".join(f"{t}:{float(weights[t]):g}" for t in TASKS)


def position_effect(positions: pd.DataFrame) -> pd.DataFrame:
    """Per task: paired (same seed) difference of its score when trained last vs first in a sequential order.
    `positions` has columns task, position (1 = first), seed, score (one row per run and task)."""
    rows = []
    last = positions["position"].max()
    for task, g in positions.groupby("task", sort=False):
        by = g.groupby(["seed", "position"])["score"].mean().unstack()
        if 1 not in by or last not in by:
            continue
        by = by.dropna(subset=[1, last])
        if len(by) < 2:
            continue
        c = paired_comparison(by[last].to_numpy(), by[1].to_numpy())
        rows.append({"task": task, "a": "last", "b": "first", **c, "verdict": verdict(c["mean_diff"], c["ci95"])})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------
# the `best` profile (notebook 08): MiniLM on all local training data, 2 CPU cores, <= 60 minutes

# what the `best` profile is measured against (dev): the study's best row (bert-base, GPU), the issue's
# targets for MiniLM on 2 CPU cores, and roughly the best public CS224N multitask results (bert-base)


BEST_REFERENCES = {
    "study best (bert-base)": STUDY_TABLE1["RR oversampling + tuning + cosine"],
    "target (MiniLM, 2 CPU cores)": {"sst": 0.50, "para": 0.865, "sts": 0.87},
    "best public CS224N (bert-base, approx.)": {"sst": 0.55, "para": 0.90, "sts": 0.87},
}


TRAINING_MINUTES_TARGET = 60


def wall_minutes(run: dict) -> float | None:
    """A finished run's wall-clock minutes over all its sessions, or None when they are not all counted: a run
    resumed from a checkpoint older than that record (`wall_time_complete` False, or, in runs recorded before the
    flag existed, a wall time shorter than the training loop's own time)."""
    complete = run.get("wall_time_complete", run["wall_time_s"] >= run.get("train_time_s", 0.0))
    return run["wall_time_s"] / 60 if complete else None


def training_time(run: dict) -> dict:
    """A run's minutes (wall_minutes), device and threads, and whether it had every core: a CPU run whose
    torch threads were all of its machine's cores, so that its minutes are the time the profile takes there.
    Runs trained several at once (packing) share the cores, so their minutes are not comparable."""
    env = run.get("environment") or {}
    threads, cores, device = env.get("torch_threads"), env.get("cpu_count"), run.get("device", "?")
    return {"seed": run["seed"], "minutes": wall_minutes(run), "device": device, "torch_threads": threads,
            "cpu_count": cores, "every_core": device == "cpu" and threads is not None and threads == cores}


def best_summary(runs: list[dict]) -> tuple[pd.DataFrame, dict]:
    """Dev scores of the best-profile runs beside the references, and a verdict per target.

    Returns (table with one row per source, a column per task and, for our row, the half-width of each
    task's 95% t interval over seeds (`{task} ci95`; empty for one seed), verdict dict). A target counts as
    met when the mean over seeds reaches it. The training-time target is read from the runs that had every
    core of their machine (training_time); every run's minutes and threads are in verdict["training"].
    """
    if not runs:
        raise ValueError("no best-profile runs to summarize")
    per_task = {t: mean_ci([r["dev"][t] for r in runs]) for t in TASKS}
    ours = {t: m for t, (m, _) in per_task.items()}
    ci95 = {t: None if np.isnan(h) else h for t, (_, h) in per_task.items()}
    label = f"ours (all-MiniLM-L6-v2, {len(runs)} seed{'s' if len(runs) > 1 else ''})"
    rows = [{"source": label, **ours, **{f"{t} ci95": ci95[t] for t in TASKS}}]
    rows += [{"source": k, **v} for k, v in BEST_REFERENCES.items()]
    target = BEST_REFERENCES["target (MiniLM, 2 CPU cores)"]
    training = [training_time(r) for r in runs]
    alone = [t["minutes"] for t in training if t["every_core"]]
    minutes = None if not alone or None in alone else max(alone)
    verdict = {"dev": ours, "ci95": ci95, "targets": target,
               "met": {t: bool(ours[t] >= target[t]) for t in TASKS},
               "gap": {t: ours[t] - target[t] for t in TASKS},
               "vs_study_best": {t: ours[t] - BEST_REFERENCES["study best (bert-base)"][t] for t in TASKS},
               "training_minutes": minutes,
               "training_within_target": None if minutes is None else bool(minutes <= TRAINING_MINUTES_TARGET),
               "training": training,
               "selected_epochs": [r["selection"]["epoch"] for r in runs if r.get("selection")],
               "ensemble_epochs": [{t: c["epochs"] for t, c in r["selection"]["snapshot_ensemble"].items()}
                                   for r in runs if (r.get("selection") or {}).get("snapshot_ensemble")],
               "devices": sorted({r.get("device", "?") for r in runs}), "seeds": [r["seed"] for r in runs],
               "run_names": [r["run_name"] for r in runs]}
    return pd.DataFrame(rows), verdict


def best_verdict_markdown(verdict: dict) -> str:
    """best_summary's verdict as a list: each task against its target (with the 95% interval over seeds when
    there are several), then the training time against its target and every seed's minutes."""
    lines = []
    for t in TASKS:
        ci = "" if verdict["ci95"][t] is None else f" ± {verdict['ci95'][t]:.3f} (95% CI, {len(verdict['seeds'])} seeds)"
        met = "met" if verdict["met"][t] else f"missed by {-verdict['gap'][t]:.3f}"
        lines.append(f"- **{t}**: {verdict['dev'][t]:.3f}{ci} vs target {verdict['targets'][t]:.3f} ({met}); "
                     f"{verdict['vs_study_best'][t]:+.3f} vs the study's best row")
    minutes, within = verdict["training_minutes"], verdict["training_within_target"]
    lines.append(f"- **training time**: {'not known' if minutes is None else f'{minutes:.1f} minutes'} on every core "
                 f"of the machine (target <= {TRAINING_MINUTES_TARGET}: "
                 f"{ {True: 'met', False: 'missed', None: 'not known'}[within]})")
    for t in verdict["training"]:
        how = ("every core" if t["every_core"] else f"{t['torch_threads']} of {t['cpu_count']} cores, shared"
               if t["device"] == "cpu" else "not a CPU run")
        took = "not known" if t["minutes"] is None else f"{t['minutes']:.1f} minutes"
        lines.append(f"  - seed {t['seed']}: {took} on {t['device']} ({how})")
    return "\n".join(lines)


def ensemble_table(runs: list[dict]) -> pd.DataFrame:
    """One row per run and task of a snapshot-ensemble run: the top-1 epoch and the chosen top-k epochs on
    validation, and each one's dev score (dev of the ensemble is the run's dev score)."""
    rows = []
    for r in runs:
        chosen = (r.get("selection") or {}).get("snapshot_ensemble")
        if not chosen:
            raise ValueError(f"run {r.get('run_name')!r} has no snapshot ensemble (snapshot_ensemble=0)")
        for t in TASKS:
            c = chosen[t]
            top1 = c["epochs"][0]
            rows.append({"seed": r["seed"], "task": t, "top-1 epoch": top1, "ensemble epochs": c["epochs"],
                         "k": len(c["epochs"]), "val top-1": c["val_single"][str(top1)], "val ensemble": c["val"],
                         "dev top-1": c["dev_single"][str(top1)], "dev ensemble": r["dev"][t]})
    return pd.DataFrame(rows)


def ablation_table(summary: dict) -> pd.DataFrame:
    """The variants of benchmarks/best_ablation.py (its results/best/ablation.json) side by side: validation
    (what a choice may use), dev (reported once per variant, not used to choose), wall-clock minutes (None where
    a resumed run's first sessions were not timed, see wall_minutes) and the training loop's own minutes."""
    variants = summary.get("variants") if isinstance(summary, dict) else None
    if not variants:
        raise ValueError("no variants in this ablation summary")
    rows = [{"variant": name, "change": json.dumps(v["change"], sort_keys=True),
             **{f"val {t}": v["val"][t] for t in TASKS}, "val mean": v["val_mean"],
             **{f"dev {t}": v["dev"][t] for t in TASKS}, "minutes": v["training_minutes"],
             "loop minutes": v.get("train_loop_minutes")}
            for name, v in variants.items()]
    return pd.DataFrame(rows).sort_values("val mean", ascending=False, ignore_index=True)
