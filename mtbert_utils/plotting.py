"""Figures, drawn from saved result files (dicts read back from JSON), never from live training state.

Every figure is drawn in one seaborn theme (`THEME`), scoped to the figure: importing or calling this
module leaves matplotlib's global style alone. Colours come from seaborn's "deep" palette, one per task.
Error bars: seaborn computes intervals where the figure has the raw values (the seed band of the
learning curves); figures of a results table draw that table's own 95% CIs (mtbert_utils.stats), so a
figure and its table never disagree.
"""

from __future__ import annotations

import functools
from collections import defaultdict

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg") if not matplotlib.get_backend().lower().startswith(("module://", "inline")) else None
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from mtbert_utils import TASKS  # noqa: E402
from mtbert_utils.gradients import run_cosines  # noqa: E402
from mtbert_utils.tasks import TASK_SPECS  # noqa: E402

THEME = dict(style="whitegrid", context="notebook", font_scale=0.9)  # seaborn.set_theme arguments
_DEEP = sns.color_palette("deep").as_hex()
TASK_COLORS = dict(zip(TASKS, _DEEP))  # sst blue, para orange, sts green


def _themed(plot):
    """Draw `plot` in THEME without touching the global rcParams (same name, signature and docstring)."""
    @functools.wraps(plot)
    def draw(*args, **kwargs):
        style = {**sns.axes_style(THEME["style"]), **sns.plotting_context(THEME["context"], THEME["font_scale"]),
                 "axes.prop_cycle": plt.cycler(color=_DEEP)}
        with plt.rc_context(style):
            return plot(*args, **kwargs)
    return draw


def _metric_label(task: str) -> str:
    spec = TASK_SPECS[task]
    return f"{spec.title} ({'Pearson r' if spec.metric_name == 'pearson' else 'accuracy'})"


@_themed
def plot_label_distributions(tasks: dict) -> plt.Figure:
    """Label counts of each task's training split (SST classes, Quora duplicates, STS scores)."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, (task, td) in zip(axes, tasks.items()):
        labels = np.array([e.label for e in td.train])
        if task == "sts":
            sns.histplot(x=labels, bins=np.arange(0, 5.25, 0.25), color=TASK_COLORS[task], ax=ax)
            ax.set_xlabel("similarity (0-5)")
        else:  # categorical: one bar per class, in class order
            sns.countplot(x=labels.astype(int), color=TASK_COLORS[task], ax=ax)
            ax.set_xlabel("sentiment class" if task == "sst" else "is duplicate")
        ax.set_title(f"{TASK_SPECS[task].title}: {len(labels):,} train")
        ax.set_ylabel("examples")
    fig.tight_layout()
    return fig


@_themed
def plot_length_histograms(lengths: dict[str, list[int]]) -> plt.Figure:
    """Token lengths per task (what per-batch padding and length grouping act on)."""
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.3 * len(lengths), 3.2))
    for ax, (task, ls) in zip(np.atleast_1d(axes), lengths.items()):
        sns.histplot(x=np.asarray(ls), bins=40, color=TASK_COLORS.get(task, "gray"), ax=ax)
        ax.axvline(np.median(ls), color="k", lw=1, ls="--", label=f"median {np.median(ls):.0f}")
        ax.set_title(f"{TASK_SPECS[task].title}")
        ax.set_xlabel("tokens per input")
        ax.legend(frameon=False)
    fig.tight_layout()
    return fig


@_themed
def plot_learning_curves(runs_by_label: dict[str, list[dict]], split: str = "dev") -> plt.Figure:
    """Metric per task on `split` ('dev', or 'val' for runs with a validation split) against epoch:
    mean over seeds, shaded min-max (seaborn's 100% percentile interval)."""
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    rows = []  # tidy: one row per (label, seed run, epoch, panel)
    for label, runs in runs_by_label.items():
        for ri, r in enumerate(runs):
            for h in r["history"]:
                rows += [{"label": label, "run": ri, "epoch": h["epoch"], "key": key,
                          "value": np.mean(list(h["train_loss"].values())) if key == "loss" else h[split][key]}
                         for key in [*TASKS, "loss"]]
    df = pd.DataFrame(rows)
    palette = dict(zip(runs_by_label, sns.color_palette("deep", len(runs_by_label))))
    for ax, key in zip(axes, [*TASKS, "loss"]):
        sns.lineplot(data=df[df["key"] == key], x="epoch", y="value", hue="label", palette=palette,
                     errorbar=("pi", 100), marker="o", ms=5, ax=ax, legend=key == TASKS[0])
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # whole epochs
        ax.set_xlabel("epoch")
        ax.set_ylabel("")
        ax.set_title(f"{_metric_label(key)} ({split})" if key != "loss" else "mean train loss per task")
    axes[0].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


@_themed
def plot_examples_seen(runs_by_label: dict[str, dict]) -> plt.Figure:
    """Cumulative training examples of each task against optimizer steps: the picture of a schedule."""
    fig, axes = plt.subplots(1, len(runs_by_label), figsize=(4.6 * len(runs_by_label), 3.4), squeeze=False)
    for ax, (label, run) in zip(axes[0], runs_by_label.items()):
        trace = np.array([[0] * (len(TASKS) + 1)] + [row for h in run["history"] for row in h["seen_trace"]])
        for ti, task in enumerate(TASKS):
            # distinct line styles: under round-robin the three curves lie on top of each other
            ax.plot(trace[:, 0], trace[:, ti + 1], color=TASK_COLORS[task], ls=["-", "--", ":"][ti],
                    lw=[3.0, 2.0, 1.5][ti], label=TASK_SPECS[task].title)
        for h in run["history"][:-1]:
            ax.axvline(h["steps"], color="gray", lw=0.5, ls=":")
        ax.set_title(label)
        ax.set_xlabel("optimizer step (dotted: epoch ends)")
        ax.set_ylabel("examples seen")
    axes[0][0].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


@_themed
def plot_grad_cosines(runs_by_label: dict[str, dict]) -> plt.Figure:
    """Per-step cosine between task gradients on the shared parameters (encoder and shared layer: the epochs in
    which the encoder trains, gradients.run_cosines), and how often they conflict."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.6), gridspec_kw={"width_ratios": [2.2, 1]})
    bars = defaultdict(dict)
    for li, (label, run) in enumerate(runs_by_label.items()):
        for pi, (pair, vals) in enumerate(run_cosines(run).items()):
            ls = ["-", "--", ":"][pi % 3]
            ax_vals = np.asarray(vals)
            k = max(1, len(ax_vals) // 60)  # moving average for readability
            smooth = np.convolve(ax_vals, np.ones(k) / k, mode="valid")
            axes[0].plot(smooth, ls=ls, color=_DEEP[li % len(_DEEP)], label=f"{label}: {pair}")
            bars[pair][label] = float((ax_vals < 0).mean())
    axes[0].axhline(0, color="k", lw=0.8)
    axes[0].set_xlabel("step of the epochs that train the encoder (moving average)")
    axes[0].set_ylabel("cosine between task gradients")
    axes[0].legend(frameon=False, fontsize=7, ncol=2)
    pairs, labels = list(bars), list(runs_by_label)
    w = 0.8 / max(len(labels), 1)
    for li, label in enumerate(labels):
        axes[1].bar(np.arange(len(pairs)) + li * w, [bars[p].get(label, np.nan) for p in pairs], w,
                    label=label, color=_DEEP[li % len(_DEEP)])
    axes[1].set_xticks(np.arange(len(pairs)) + w * (len(labels) - 1) / 2, pairs, fontsize=8)
    axes[1].set_ylabel("fraction of steps in conflict (cos < 0)")
    axes[1].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


@_themed
def plot_table_bars(table, study: dict | None = None, row_col: str = "row") -> plt.Figure:
    """Bar chart of a results table (columns `{task}_mean`, `{task}_ci95`), study values as black ticks."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.5 * len(table) + 2.2), sharey=True)
    rows = list(table[row_col])
    y = np.arange(len(rows))
    for ax, task in zip(axes, TASKS):
        mean = table[f"{task}_mean"].to_numpy(dtype=float)
        ci = np.nan_to_num(table[f"{task}_ci95"].to_numpy(dtype=float))
        ax.barh(y, mean, xerr=ci, color=TASK_COLORS[task], alpha=0.85, capsize=3, label="ours (mean, 95% CI)")
        if study:
            sv = [study.get(r, {}).get(task, np.nan) for r in rows]
            ax.scatter(sv, y, marker="|", s=300, color="k", zorder=3, label="study (bert-base)")
        ax.set_title(_metric_label(task))
        ax.set_yticks(y, rows)
        ax.invert_yaxis()
    handles, names = axes[0].get_legend_handles_labels()  # below the panels: inside one it covered the last bar
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.legend(handles, names, loc="lower center", ncol=len(names), frameon=False, fontsize=9)
    return fig


@_themed
def plot_confusion(cm: np.ndarray, labels=None, title: str = "SST confusion matrix (dev)") -> plt.Figure:
    """Counts written in the cells, coloured by the fraction of the gold row."""
    fig, ax = plt.subplots(figsize=(4.6, 4))
    cm = np.asarray(cm)
    norm = cm / np.clip(cm.sum(1, keepdims=True), 1, None)
    labels = labels if labels is not None else list(range(cm.shape[0]))
    sns.heatmap(norm, annot=cm, fmt="d" if np.issubdtype(cm.dtype, np.integer) else "g", cmap="Blues", vmin=0, vmax=1, square=True, ax=ax,
                xticklabels=labels, yticklabels=labels, cbar_kws={"fraction": 0.046, "label": "row fraction"})
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    fig.tight_layout()
    return fig


@_themed
def plot_sts_scatter(pred, gold, title: str = "STS dev: predicted vs gold") -> plt.Figure:
    from mtbert_utils.tasks import pearson
    fig, ax = plt.subplots(figsize=(4.6, 4))
    sns.scatterplot(x=np.asarray(gold), y=np.asarray(pred), s=10, alpha=0.5, color=TASK_COLORS["sts"],
                    edgecolor=None, ax=ax)
    ax.set_xlabel("gold similarity (0-5)")
    ax.set_ylabel("predicted score")
    ax.set_title(f"{title} (r = {pearson(pred, gold):.3f})")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------
# extension notebooks (09-11): figures from their tidy summary tables (columns `{metric}_mean`, `{metric}_ci95`)

SUMMARY_LABELS = {"mean": "mean of the three (the study's summary)", "overall": "CS224N overall score"}
MODE_COLORS = [_DEEP[i] for i in (0, 3, 4, 5)]  # blue, red, purple, brown


def _key_label(key: str) -> str:
    return _metric_label(key) if key in TASK_SPECS else SUMMARY_LABELS.get(key, key)


def _mean_ci(table, key):
    return table[f"{key}_mean"].to_numpy(dtype=float), np.nan_to_num(table[f"{key}_ci95"].to_numpy(dtype=float))


@_themed
def plot_sampler_comparison(summary, keys=(*TASKS, "mean", "overall"), row_col: str = "sampler",
                            mode_col: str = "budget_mode", single_task: dict | None = None) -> plt.Figure:
    """Every sampler, mean and 95% CI per metric; one bar per comparison mode side by side.
    single_task: task -> single-task reference score, drawn as a dashed line in that task's panel."""
    rows = list(dict.fromkeys(summary[row_col]))
    modes = list(dict.fromkeys(summary[mode_col]))
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 0.4 * len(rows) * len(modes) + 1.6),
                             sharey=True)
    h = 0.8 / len(modes)
    y = np.arange(len(rows))
    for ax, key in zip(np.atleast_1d(axes), keys):
        for mi, mode in enumerate(modes):
            sub = summary[summary[mode_col] == mode].set_index(row_col).reindex(rows)
            mean, ci = _mean_ci(sub, key)
            ax.barh(y + mi * h, mean, h, xerr=ci, color=MODE_COLORS[mi % len(MODE_COLORS)], alpha=0.85,
                    capsize=2, label=mode)
        if single_task and key in single_task:
            ax.axvline(single_task[key], color="k", ls="--", lw=1, label="single-task reference")
        ax.set_title(_key_label(key), fontsize=9)
        ax.set_yticks(y + h * (len(modes) - 1) / 2, rows)
    np.atleast_1d(axes)[0].invert_yaxis()
    handles, names = np.atleast_1d(axes)[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=len(names), frameon=False, fontsize=8,
               bbox_to_anchor=(0.5, 1.0))
    fig.suptitle("samplers: mean and 95% CI over seeds", fontsize=10, y=1.05)
    fig.tight_layout()
    return fig


@_themed
def plot_sigma_sweep(summary, keys=(*TASKS, "mean"), sigma_col: str = "sigma") -> plt.Figure:
    """Dev metrics (mean, 95% CI) against rr_over's sigma, and against the examples those runs saw."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
    table = summary.sort_values(sigma_col)
    for ki, key in enumerate(keys):
        mean, ci = _mean_ci(table, key)
        color = TASK_COLORS.get(key, "k")
        for ax, x in zip(axes, [table[sigma_col], table["examples_seen"]]):
            ax.errorbar(x, mean, yerr=ci, marker="o", ms=4, capsize=3, color=color,
                        ls="-" if key in TASKS else "--", label=_key_label(key))
    axes[0].set_xlabel("sigma (optimizer steps per epoch)")
    axes[1].set_xlabel("training examples seen (all tasks)")
    axes[0].set_ylabel("dev score")
    axes[0].legend(frameon=False, fontsize=7)
    fig.tight_layout()
    return fig


@_themed
def plot_task_orders(order_summary, position_summary, order_col: str = "order") -> plt.Figure:
    """Left: each task's dev score per sequential order (mean, 95% CI); the bar of the order's last task
    is outlined. Right: each task's score by its position in the order."""
    fig, axes = plt.subplots(1, 2, figsize=(14, 3.8), gridspec_kw={"width_ratios": [2.2, 1]})
    orders = list(order_summary[order_col])
    x = np.arange(len(orders))
    w = 0.8 / len(TASKS)
    for ti, task in enumerate(TASKS):
        mean, ci = _mean_ci(order_summary, task)
        last = [o.split("-")[-1] == task for o in orders]
        axes[0].bar(x + ti * w, mean, w, yerr=ci, capsize=2, color=TASK_COLORS[task], alpha=0.85,
                    edgecolor=["k" if lst else "none" for lst in last], linewidth=[2 if lst else 0 for lst in last],
                    label=TASK_SPECS[task].title)
        sub = position_summary[position_summary["task"] == task].sort_values("position")
        pm, pci = _mean_ci(sub, "score")
        axes[1].errorbar(sub["position"], pm, yerr=pci, marker="o", capsize=3, color=TASK_COLORS[task],
                         label=TASK_SPECS[task].title)
    axes[0].set_xticks(x + w, orders, fontsize=8)
    axes[0].set_ylabel("dev score")
    axes[0].set_title("each order (outlined: the task trained last)", fontsize=9)
    axes[0].legend(frameon=False, fontsize=8)
    axes[1].set_xticks([1, 2, 3], ["first", "second", "last"])
    axes[1].set_title("a task's score by its position in the order", fontsize=9)
    fig.tight_layout()
    return fig


@_themed
def plot_pcgrad_weightings(conflicts, diffs, weighting_col: str = "weighting") -> plt.Figure:
    """Left: conflict rate per task pair and weighting (mean, 95% CI over seeds), the surgery size
    (mean fraction of a gradient's norm PCGrad removes) as dots. Right: PCGrad - plain per metric."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.8))
    weightings = list(dict.fromkeys(conflicts[weighting_col]))
    pairs = list(dict.fromkeys(conflicts["pair"]))
    x = np.arange(len(weightings))
    w = 0.8 / max(len(pairs), 1)
    for pi, pair in enumerate(pairs):
        sub = conflicts[conflicts["pair"] == pair].set_index(weighting_col).reindex(weightings)
        mean, ci = _mean_ci(sub, "conflict_rate")
        axes[0].bar(x + pi * w, mean, w, yerr=ci, capsize=2, color=plt.cm.Set2(pi), label=f"{pair}: conflict rate")
        axes[0].scatter(x + pi * w, sub["surgery_mean"], color="k", marker="D", s=14, zorder=3,
                        label="surgery size" if pi == 0 else None)
    axes[0].set_xticks(x + w * (len(pairs) - 1) / 2, weightings, fontsize=8)
    axes[0].set_ylabel("fraction of steps with cos < 0")
    axes[0].legend(frameon=False, fontsize=7)
    keys = list(dict.fromkeys(diffs["metric"]))
    wk = 0.8 / max(len(keys), 1)
    for ki, key in enumerate(keys):
        sub = diffs[diffs["metric"] == key].set_index(weighting_col).reindex(weightings)
        axes[1].bar(x + ki * wk, sub["mean_diff"], wk, yerr=np.nan_to_num(sub["ci95"].to_numpy(dtype=float)),
                    capsize=2, color=TASK_COLORS.get(key, "gray"), label=_key_label(key))
    axes[1].axhline(0, color="k", lw=0.8)
    axes[1].set_xticks(x + wk * (len(keys) - 1) / 2, weightings, fontsize=8)
    axes[1].set_ylabel("PCGrad - plain (paired, 95% CI)")
    axes[1].legend(frameon=False, fontsize=7)
    fig.tight_layout()
    return fig


@_themed
def plot_best_comparison(table, ours_row: int = 0) -> plt.Figure:
    """Per task: our dev score beside the reference rows of experiments.best_summary's table, with the 95%
    interval over seeds as an error bar where the table has one (`{task} ci95`)."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.2), sharey=True)
    sources = list(table["source"])
    y = np.arange(len(sources))
    for ax, task in zip(axes, TASKS):
        vals = table[task].to_numpy(dtype=float)
        colors = [TASK_COLORS[task] if i == ours_row else "0.75" for i in range(len(sources))]
        ci = table[f"{task} ci95"].to_numpy(dtype=float) if f"{task} ci95" in table else np.full(len(vals), np.nan)
        ax.barh(y, vals, color=colors, xerr=np.nan_to_num(ci), capsize=3 if np.isfinite(ci).any() else 0)
        for yi, v in zip(y, vals):
            ax.text(v, yi, f" {v:.3f}", va="center", fontsize=8)
        ax.set_xlim(0, 1.08)
        ax.set_title(_metric_label(task) + " (dev)")
        ax.set_yticks(y, sources)
        ax.invert_yaxis()
    fig.tight_layout()
    return fig
