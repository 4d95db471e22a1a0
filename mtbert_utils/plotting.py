"""Figures, drawn from saved result files (dicts read back from JSON), never from live training state."""

from __future__ import annotations

from collections import defaultdict

import matplotlib

matplotlib.use("Agg") if not matplotlib.get_backend().lower().startswith(("module://", "inline")) else None
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mtbert_utils import TASKS  # noqa: E402
from mtbert_utils.tasks import TASK_SPECS  # noqa: E402

TASK_COLORS = {"sst": "#4C72B0", "para": "#DD8452", "sts": "#55A868"}


def _metric_label(task: str) -> str:
    spec = TASK_SPECS[task]
    return f"{spec.title} ({'Pearson r' if spec.metric_name == 'pearson' else 'accuracy'})"


def plot_label_distributions(tasks: dict) -> plt.Figure:
    """Label counts of each task's training split (SST classes, Quora duplicates, STS scores)."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, (task, td) in zip(axes, tasks.items()):
        labels = np.array([e.label for e in td.train])
        if task == "sts":
            ax.hist(labels, bins=np.arange(0, 5.25, 0.25), color=TASK_COLORS[task])
            ax.set_xlabel("similarity (0-5)")
        else:
            values, counts = np.unique(labels.astype(int), return_counts=True)
            ax.bar(values, counts, color=TASK_COLORS[task])
            ax.set_xticks(values)
            ax.set_xlabel("sentiment class" if task == "sst" else "is duplicate")
        ax.set_title(f"{TASK_SPECS[task].title}: {len(labels):,} train")
        ax.set_ylabel("examples")
    fig.tight_layout()
    return fig


def plot_length_histograms(lengths: dict[str, list[int]]) -> plt.Figure:
    """Token lengths per task (what per-batch padding and length grouping act on)."""
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.3 * len(lengths), 3.2))
    for ax, (task, ls) in zip(np.atleast_1d(axes), lengths.items()):
        ax.hist(ls, bins=40, color=TASK_COLORS.get(task, "gray"))
        ax.axvline(np.median(ls), color="k", lw=1, ls="--", label=f"median {np.median(ls):.0f}")
        ax.set_title(f"{TASK_SPECS[task].title}")
        ax.set_xlabel("tokens per input")
        ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def plot_learning_curves(runs_by_label: dict[str, list[dict]]) -> plt.Figure:
    """Dev metric per task against epoch: mean over seeds, shaded min-max."""
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    for li, (label, runs) in enumerate(runs_by_label.items()):
        color = plt.cm.tab10(li)
        for ax, key in zip(axes, [*TASKS, "loss"]):
            if key == "loss":
                curves = np.array([[np.mean(list(h["train_loss"].values())) for h in r["history"]] for r in runs])
            else:
                curves = np.array([[h["dev"][key] for h in r["history"]] for r in runs])
            x = np.arange(1, curves.shape[1] + 1)
            ax.plot(x, curves.mean(0), marker="o", ms=3, color=color, label=label)
            if len(runs) > 1:
                ax.fill_between(x, curves.min(0), curves.max(0), color=color, alpha=0.15)
            ax.set_xlabel("epoch")
            ax.set_title(_metric_label(key) if key != "loss" else "mean train loss per task")
    axes[0].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


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


def plot_grad_cosines(runs_by_label: dict[str, dict]) -> plt.Figure:
    """Per-step cosine between task gradients on the shared parameters, and how often they conflict."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.6), gridspec_kw={"width_ratios": [2.2, 1]})
    bars = defaultdict(dict)
    for li, (label, run) in enumerate(runs_by_label.items()):
        values = defaultdict(list)
        for h in run["history"]:
            for pair, c in h.get("grad_cosines", {}).items():
                values[pair].extend(c["values"])
        for pi, (pair, vals) in enumerate(values.items()):
            ls = ["-", "--", ":"][pi % 3]
            ax_vals = np.asarray(vals)
            k = max(1, len(ax_vals) // 60)  # moving average for readability
            smooth = np.convolve(ax_vals, np.ones(k) / k, mode="valid")
            axes[0].plot(smooth, ls=ls, color=plt.cm.tab10(li), label=f"{label}: {pair}")
            bars[pair][label] = float((ax_vals < 0).mean())
    axes[0].axhline(0, color="k", lw=0.8)
    axes[0].set_xlabel("step (heads+encoder shared gradients)")
    axes[0].set_ylabel("cosine between task gradients")
    axes[0].legend(frameon=False, fontsize=7, ncol=2)
    pairs, labels = list(bars), list(runs_by_label)
    w = 0.8 / max(len(labels), 1)
    for li, label in enumerate(labels):
        axes[1].bar(np.arange(len(pairs)) + li * w, [bars[p].get(label, np.nan) for p in pairs], w,
                    label=label, color=plt.cm.tab10(li))
    axes[1].set_xticks(np.arange(len(pairs)) + w * (len(labels) - 1) / 2, pairs, fontsize=8)
    axes[1].set_ylabel("fraction of steps in conflict (cos < 0)")
    axes[1].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


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
    axes[0].legend(frameon=False, fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def plot_confusion(cm: np.ndarray, labels=None, title: str = "SST confusion matrix (dev)") -> plt.Figure:
    fig, ax = plt.subplots(figsize=(4.6, 4))
    norm = cm / np.clip(cm.sum(1, keepdims=True), 1, None)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{cm[i, j]}", ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black")
    labels = labels if labels is not None else list(range(cm.shape[0]))
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="row fraction")
    fig.tight_layout()
    return fig


def plot_sts_scatter(pred, gold, title: str = "STS dev: predicted vs gold") -> plt.Figure:
    from mtbert_utils.tasks import pearson
    fig, ax = plt.subplots(figsize=(4.6, 4))
    ax.scatter(gold, pred, s=8, alpha=0.5, color=TASK_COLORS["sts"])
    ax.set_xlabel("gold similarity (0-5)")
    ax.set_ylabel("predicted score")
    ax.set_title(f"{title} (r = {pearson(pred, gold):.3f})")
    fig.tight_layout()
    return fig
