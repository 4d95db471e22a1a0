"""Experiments the notebooks run: a config over several seeds, the zero-shot floor, and Table 1.

Each training notebook writes `{results_dir}/runs/{notebook}/index.json` listing the result files
of the runs it made, by row name; tables and figures are rebuilt from those files alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mtbert_utils import TASKS
from mtbert_utils.presets import BEST, best_config, make_config  # noqa: F401  (notebooks call them here)
from mtbert_utils.results import environment, write_json
from mtbert_utils.stats import mean_ci, paired_comparison

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


def run_seeds(config, seeds, out_dir: str | Path, resume: bool = True) -> list[dict]:
    """Train `config` once per seed into `out_dir`; finished runs are reused (resume=True)."""
    from mtbert_utils.training import train
    results = []
    for seed in seeds:
        cfg = dataclasses.replace(config, seed=int(seed), out_dir=str(out_dir))
        results.append(train(cfg, resume=resume))
    return results


def zero_shot(config, out_dir: str | Path) -> dict:
    """Dev metrics of the encoder with untrained heads: the floor under every fine-tuned row."""
    from mtbert_utils.evaluation import evaluate
    from mtbert_utils.model import load_tokenizer
    from mtbert_utils.training import build_model, pick_amp, pick_device, prepare_data, run_record
    t0 = time.time()
    device = pick_device(config)
    amp_dtype, _ = pick_amp(config, device)
    enc, info = prepare_data(config, load_tokenizer(config.encoder))
    model = build_model(config).to(device)
    dev = evaluate(model, enc["dev"], config.eval_batch_size, device, amp_dtype)
    result = {**run_record(config, config.named("zero-shot"), device, model, info),
              "history": [], "dev": dev, "steps": 0, "train_time_s": 0.0, "wall_time_s": time.time() - t0,
              "environment": environment()}
    path = Path(out_dir) / f"{result['run_name']}.json"
    write_json(path, result)
    result["result_path"] = str(path)
    return result


def write_index(results_dir: str | Path, notebook: str, runs: dict[str, list[dict]]) -> Path:
    """Record which result files this notebook produced, by row name (paths relative to results_dir)."""
    results_dir = Path(results_dir)
    index = {name: [str(Path(r["result_path"]).resolve().relative_to(results_dir.resolve())) for r in rs]
             for name, rs in runs.items()}
    return write_json(results_dir / "runs" / notebook / "index.json", {"notebook": notebook, "runs": index})


def load_index(results_dir: str | Path, notebook: str) -> dict[str, list[dict]]:
    """Row name -> list of run results (read back from their JSON files)."""
    results_dir = Path(results_dir)
    path = results_dir / "runs" / notebook / "index.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run notebooks/{notebook}.ipynb first")
    index = json.loads(path.read_text())
    return {name: [json.loads((results_dir / p).read_text()) for p in paths] for name, paths in index["runs"].items()}


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


def paired_table(runs_by_row: dict[str, list[dict]], claims: list[tuple[str, str]]) -> pd.DataFrame:
    """Paired (same seeds) comparisons a - b per task for each claimed ordering (a, b)."""
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


def best_summary(runs: list[dict]) -> tuple[pd.DataFrame, dict]:
    """Dev scores of the best-profile runs beside the references, and a verdict per target.

    Returns (table with one row per source and a column per task, verdict dict). A target counts
    as met when the mean over seeds reaches it.
    """
    if not runs:
        raise ValueError("no best-profile runs to summarize")
    ours = {t: float(np.mean([r["dev"][t] for r in runs])) for t in TASKS}
    label = f"ours (all-MiniLM-L6-v2, {len(runs)} seed{'s' if len(runs) > 1 else ''})"
    rows = [{"source": label, **ours}] + [{"source": k, **v} for k, v in BEST_REFERENCES.items()]
    target = BEST_REFERENCES["target (MiniLM, 2 CPU cores)"]
    each = [wall_minutes(r) for r in runs]
    minutes = None if None in each else max(each)
    verdict = {"dev": ours, "targets": target,
               "met": {t: bool(ours[t] >= target[t]) for t in TASKS},
               "gap": {t: ours[t] - target[t] for t in TASKS},
               "vs_study_best": {t: ours[t] - BEST_REFERENCES["study best (bert-base)"][t] for t in TASKS},
               "training_minutes": minutes,
               "training_within_target": None if minutes is None else bool(minutes <= TRAINING_MINUTES_TARGET),
               "selected_epochs": [r["selection"]["epoch"] for r in runs if r.get("selection")],
               "ensemble_epochs": [{t: c["epochs"] for t, c in r["selection"]["snapshot_ensemble"].items()}
                                   for r in runs if (r.get("selection") or {}).get("snapshot_ensemble")],
               "devices": sorted({r.get("device", "?") for r in runs}), "seeds": [r["seed"] for r in runs],
               "run_names": [r["run_name"] for r in runs]}
    return pd.DataFrame(rows), verdict


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


def frame_markdown(df: pd.DataFrame, digits: int = 3) -> str:
    """A DataFrame as a Markdown table, floats rounded (no tabulate needed)."""
    fmt = lambda v: f"{v:.{digits}f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# extension notebooks (09-11): grids of runs, equal budgets, tidy tables, readings computed from results

METRICS = (*TASKS, "mean", "overall")


def run_grid(configs: dict, seeds, out_dir: str | Path, resume: bool = True) -> dict[str, list[dict]]:
    """run_seeds for several configs, seed by seed: the tokenized data is cached per seed, not per config."""
    runs = {label: [] for label in configs}
    for seed in seeds:
        for label, config in configs.items():
            runs[label] += run_seeds(config, [seed], out_dir, resume)
    return runs


def train_sizes(config) -> dict[str, int]:
    """Training examples per task that `config` trains on (after its max_train caps)."""
    from mtbert_utils.model import load_tokenizer
    from mtbert_utils.training import prepare_data
    _, info = prepare_data(config, load_tokenizer(config.encoder))  # cached: the first run reuses it
    return {t: int(info["sizes"][t]["train"]) for t in config.train_tasks}


def batches_per_epoch(sizes: dict[str, int], batch_size: int) -> dict[str, int]:
    return {t: -(-n // batch_size) for t, n in sizes.items()}  # ceil: the last batch of a pass is short


def schedule_params_for(sampler: str, epochs: int, *, T: float = 2.0, reference: dict | None = None,
                        power: float = 1.0) -> dict:
    """The schedule_params each registered sampler takes in the extension notebooks."""
    if sampler == "temperature":
        return {"T": T}
    if sampler == "annealed":
        return {"epochs": int(epochs)}  # anneal over the run's scheduled epochs
    if sampler == "adaptive":
        if not reference:
            raise ValueError("the adaptive sampler needs single-task reference scores")
        return {"reference": dict(reference), "power": power}
    return {}


def adaptive_reference(single_task_runs: dict[str, list[dict]], floor: float = 0.05) -> dict[str, float]:
    """Reference score per task for the adaptive sampler: the mean dev score of its single-task runs.

    The sampler needs a positive reference; a score at or below `floor` (a toy encoder's STS r can be
    negative) is raised to `floor`.
    """
    return {t: max(float(sum(r["dev"][t] for r in runs) / len(runs)), floor) for t, runs in single_task_runs.items()}


def expected_examples_per_epoch(schedule, num_batches: dict[str, int], sizes: dict[str, int], batch_size: int) -> float:
    """Training examples one epoch of `schedule` feeds the model, in expectation (a pass's last batch is short)."""
    steps = schedule.num_steps(num_batches, 0)
    mean_batch = {t: sizes[t] / num_batches[t] for t in num_batches}
    if not schedule.one_task_per_step:  # round robin: one batch of every task per step
        return steps * sum(mean_batch.values())
    if hasattr(schedule, "probabilities"):  # sampled: one task per step, drawn with these probabilities
        probs = schedule.probabilities(num_batches, 0)
        return steps * sum(p * mean_batch[t] for t, p in probs.items())
    return steps * sum(sizes.values()) / sum(num_batches.values())  # sequential: every batch once


def epochs_for_budget(schedule, num_batches: dict[str, int], sizes: dict[str, int], batch_size: int,
                      budget: int) -> int:
    """Epochs to schedule so a run of `schedule` reaches `budget` training examples.

    The expected count plus one spare epoch (sampled schedules draw at random); training stops
    as soon as the budget is spent, so the spare epoch usually never starts.
    """
    return math.ceil(budget / expected_examples_per_epoch(schedule, num_batches, sizes, batch_size)) + 1


def resolve_sigma(spec, num_batches: dict[str, int]) -> int:
    """rr_over's sigma (steps per epoch) from an int, or 'min' / 'median' / 'max' of the tasks' batch
    counts with an optional factor in front ('2max', '0.5*max')."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        if spec < 1:
            raise ValueError(f"sigma must be >= 1, got {spec}")
        return spec
    m = re.fullmatch(r"\s*(\d*\.?\d*)\s*\*?\s*(min|median|max)\s*", str(spec))
    if not m:
        raise ValueError(f"sigma {spec!r}: use an int or min/median/max with an optional factor, e.g. '2max'")
    counts = sorted(num_batches.values())
    base = {"min": counts[0], "max": counts[-1], "median": float(np.median(counts))}[m.group(2)]
    return max(1, round(float(m.group(1) or 1) * base))


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


def verdict(mean_diff: float, ci95: float) -> str:
    """'holds' if the 95% CI of a - b lies above 0, 'reversed' if below, else 'not resolved'."""
    if ci95 != ci95:  # nan: a single seed has no interval
        return "not resolved"
    if mean_diff - ci95 > 0:
        return "holds"
    if mean_diff + ci95 < 0:
        return "reversed"
    return "not resolved"


def claim_sentence(row, what: str | None = None) -> str:
    """One line of a computed reading from a paired_table row."""
    what = what or f"{row['a']} > {row['b']}"
    return (f"{what} ({row['metric']}): **{verdict(row['mean_diff'], row['ci95'])}**, difference "
            f"{row['mean_diff']:+.3f} ± {row['ci95']:.3f} (95% CI), p = {row['p_value']:.2g}, "
            f"d_z = {row['cohens_dz']:.2f}, {row['n']} paired seeds")


def grad_conflicts(runs: list[dict], **labels) -> pd.DataFrame:
    """Per run and task pair, from the per-step gradient cosines (measured before any projection):
    mean cosine, conflict rate (cos < 0), mean cosine of the conflicting steps, and the surgery size
    mean(max(0, -cos)): the fraction of a task gradient's norm PCGrad removes per step for that pair."""
    rows = []
    for r in runs:
        values: dict[str, list] = {}
        for h in r["history"]:
            for pair, c in h.get("grad_cosines", {}).items():
                values.setdefault(pair, []).extend(c["values"])
        for pair, vals in values.items():
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


def _diff_text(row) -> str:
    return (f"{verdict(row['mean_diff'], row['ci95'])} ({row['mean_diff']:+.3f} ± {row['ci95']:.3f}, "
            f"p = {row['p_value']:.2g}, d_z = {row['cohens_dz']:.2f})")


def _survival(v_epochs: str, v_budget: str) -> str:
    if v_epochs == v_budget:
        return {"holds": "survives an equal budget", "reversed": "reversed in both comparisons",
                "not resolved": "not resolved at this scale in either comparison"}[v_epochs]
    if v_budget == "not resolved":
        return f"{v_epochs} at equal epochs only: it does not survive an equal number of examples"
    if v_epochs == "not resolved":
        return f"{v_budget} only at an equal number of examples"
    return f"{v_epochs} at equal epochs but {v_budget} at an equal number of examples"


def sampler_reading(summary: pd.DataFrame, paired: pd.DataFrame, claims: list[tuple[str, str]],
                    modes: tuple[str, str] = ("equal epochs", "equal examples"), metric: str = "mean",
                    header: str = "") -> str:
    """Markdown reading of notebook 09, generated from its tables: each claimed ordering in both
    comparison modes, whether it survives an equal budget, the best sampler and who beats sequential."""
    lines = [header] if header else []
    lines.append(f"Verdicts use the 95% CI of the paired (same seeds) difference of the {metric} dev score: "
                 "**holds** if it lies above 0, **reversed** if below, **not resolved** otherwise.\n")
    p = paired[paired["metric"] == metric]
    for a, b in claims:
        rows = {m: p[(p["a"] == a) & (p["b"] == b) & (p["budget_mode"] == m)] for m in modes}
        if any(r.empty for r in rows.values()):
            continue
        r0, r1 = rows[modes[0]].iloc[0], rows[modes[1]].iloc[0]
        lines.append(f"- **{a} > {b}**: {modes[0]}: {_diff_text(r0)}; {modes[1]}: {_diff_text(r1)}. "
                     f"Conclusion: {_survival(verdict(r0['mean_diff'], r0['ci95']), verdict(r1['mean_diff'], r1['ci95']))}.")
    for mode in modes:
        s = summary[summary["budget_mode"] == mode].sort_values(f"{metric}_mean", ascending=False)
        if s.empty:
            continue
        ranking = ", ".join(f"{r['sampler']} {format_cell(r[f'{metric}_mean'], r[f'{metric}_ci95'])}"
                            for _, r in s.iterrows())
        beat = p[(p["budget_mode"] == mode) & (p["b"] == "sequential") & (p["a"] != "sequential")]
        winners = [r["a"] for _, r in beat.iterrows() if verdict(r["mean_diff"], r["ci95"]) == "holds"]
        lines.append(f"- {mode}, ranked by {metric} (± 95% CI): {ranking}. Resolved better than sequential: "
                     f"{', '.join(winners) if winners else 'none'}.")
    return "\n".join(lines) + "\n"


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


WEAK_SURGERY = 0.05  # PCGrad removing under 5% of a task gradient's norm per pair and step counts as weak


def pcgrad_reading(conflicts: pd.DataFrame, paired: pd.DataFrame, metric: str = "mean") -> str:
    """Markdown reading of notebook 11 from its tables: per weighting, how much the task gradients
    conflict (plain arm, before any projection) and what PCGrad changed; then whether weak conflict
    explains the (lack of) effect. `conflicts`: summarize_frame over (weighting, pair) with
    conflict_rate, conflict_cos and surgery; `paired`: paired_table rows with a weighting column."""
    lines, effects, surgery = [], {}, {}
    for w, g in conflicts.groupby("weighting", sort=False):
        pr = paired[(paired["weighting"] == w) & (paired["metric"] == metric)]
        if pr.empty:
            continue
        r = pr.iloc[0]
        effects[w], surgery[w] = verdict(r["mean_diff"], r["ci95"]), float(g["surgery_mean"].max())
        lines.append(f"- **{w}**: task gradients conflict in {g['conflict_rate_mean'].min():.0%}–"
                     f"{g['conflict_rate_mean'].max():.0%} of steps (by pair), mean cosine when in conflict "
                     f"{np.nanmean(g['conflict_cos_mean']):.3f}; PCGrad removes at most {surgery[w]:.1%} of a "
                     f"gradient's norm per pair and step. PCGrad - plain ({metric}): {_diff_text(r)}.")
    if not effects:
        return "No weighting has both arms with two or more seeds: nothing to read.\n"
    changed = [w for w, v in effects.items() if v != "not resolved"]
    weak = [w for w, s in surgery.items() if s < WEAK_SURGERY]
    if not changed and len(weak) == len(effects):
        end = (f"PCGrad changes nothing resolvable under any weighting, and in every weighting the conflicts are weak "
               f"(surgery under {WEAK_SURGERY:.0%}): consistent with the study's explanation that there is too "
               "little gradient conflict for surgery to matter.")
    elif not changed:
        strong = [w for w in effects if w not in weak]
        end = (f"PCGrad changes nothing resolvable, although conflicts are not weak under {'; '.join(strong)} "
               f"(surgery of {WEAK_SURGERY:.0%} or more): weak conflict alone does not explain the null result.")
    else:
        end = (f"PCGrad's effect is resolved under {'; '.join(changed)} and not under the others; "
               f"most surgery: {max(surgery, key=surgery.get)}. The study's 'no change' does not hold everywhere.")
    top = max(surgery, key=surgery.get)
    return "\n".join(lines) + f"\n\n{end} (Most conflict: {top}; {len(effects)} weightings.)\n"
