"""Figures from small hand-made results: they show the numbers they are given, in a scoped theme."""

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from mtbert_utils import TASKS, plotting
from mtbert_utils.data import Example, TaskData


def run(scores_by_epoch, loss=1.0):
    """A result dict as training writes it, with only what the figures read."""
    history = [{"epoch": e + 1, "steps": 4 * (e + 1), "dev": dict(zip(TASKS, s)),
                "train_loss": {t: loss / (e + 1) for t in TASKS},
                "seen_trace": [[4 * (e + 1), *(8 * (e + 1),) * 3]]} for e, s in enumerate(scores_by_epoch)]
    return {"history": history}


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_the_theme_is_scoped_to_each_figure():
    before = dict(matplotlib.rcParams)
    fig = plotting.plot_learning_curves({"a": [run([(0.3, 0.6, 0.2), (0.4, 0.7, 0.3)])]})
    assert any(line.get_visible() for line in fig.axes[0].get_ygridlines())  # whitegrid: grid lines
    assert not before["axes.grid"]  # ... which matplotlib's default style does not draw
    assert dict(matplotlib.rcParams) == before  # the user's own figures keep their style


def test_learning_curves_band_is_the_seed_min_max_around_the_mean():
    seeds = [run([(0.30, 0.60, 0.20), (0.40, 0.70, 0.30)]), run([(0.34, 0.64, 0.10), (0.50, 0.66, 0.50)])]
    fig = plotting.plot_learning_curves({"rr": seeds})
    ax = fig.axes[0]  # sst
    line = ax.get_lines()[0]
    assert list(line.get_xdata()) == [1, 2]
    assert line.get_ydata() == pytest.approx([0.32, 0.45])
    band = ax.collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == pytest.approx(0.30) and band[:, 1].max() == pytest.approx(0.50)


def test_label_distributions_count_each_class():
    ex = lambda lab: Example("i", "a", "b", lab, 2)
    tasks = {"sst": TaskData("sst", [ex(0), ex(0), ex(4)], [], [], {}, {}),
             "para": TaskData("para", [ex(1.0), ex(0.0), ex(1.0)], [], [], {}, {}),
             "sts": TaskData("sts", [ex(0.0), ex(2.5), ex(5.0)], [], [], {}, {})}
    fig = plotting.plot_label_distributions(tasks)
    assert sorted(p.get_height() for p in fig.axes[0].patches) == [1, 2]  # classes 0 (twice) and 4
    assert sorted(p.get_height() for p in fig.axes[1].patches) == [1, 2]
    assert sum(p.get_height() for p in fig.axes[2].patches) == 3


def test_confusion_cells_show_counts():
    cm = np.array([[5, 1], [2, 7]])
    fig = plotting.plot_confusion(cm, labels=["neg", "pos"])
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["1", "2", "5", "7"]


def test_every_figure_draws_from_tidy_results():
    runs = {"a": run([(0.3, 0.6, 0.2)]), "b": run([(0.4, 0.7, 0.3)])}
    for r in runs.values():
        r["history"][0]["grad_cosines"] = {"sst|para": {"values": [0.1, -0.2, 0.3]}}
    table = pd.DataFrame({"row": ["x", "y"], **{f"{t}_mean": [0.5, 0.6] for t in TASKS},
                          **{f"{t}_ci95": [0.01, np.nan] for t in TASKS}})
    figs = [plotting.plot_length_histograms({"sst": [3, 5, 8], "sts": [10, 12]}),
            plotting.plot_examples_seen(runs), plotting.plot_grad_cosines(runs),
            plotting.plot_table_bars(table, study={"x": {"sst": 0.52}}),
            plotting.plot_sts_scatter(np.array([1.0, 2.0, 4.5]), np.array([0.5, 2.5, 5.0]))]
    assert all(isinstance(f, plt.Figure) for f in figs)
    assert "r = 0.9" in figs[-1].axes[0].get_title()
    bars = figs[-2]
    assert not any(ax.get_legend() for ax in bars.axes) and len(bars.legends) == 1  # one legend, outside the panels
    assert sorted(t.get_text() for t in bars.legends[0].get_texts()) == ["ours (mean, 95% CI)", "study (bert-base)"]


def test_best_comparison_draws_our_interval_over_seeds_and_nothing_for_the_references():
    table = pd.DataFrame([{"source": "ours", "sst": 0.46, "para": 0.84, "sts": 0.87,
                           "sst ci95": 0.02, "para ci95": 0.01, "sts ci95": 0.005},
                          {"source": "study", "sst": 0.497, "para": 0.864, "sts": 0.387}])
    fig = plotting.plot_best_comparison(table)
    for ax, task in zip(fig.axes, TASKS):
        segments = ax.collections[0].get_segments()  # the error bars' lines, one per row
        widths = [abs(seg[1][0] - seg[0][0]) / 2 for seg in segments]
        assert widths == pytest.approx([table.loc[0, f"{task} ci95"], 0.0])
        assert segments[0][0][0] == pytest.approx(table.loc[0, task] - table.loc[0, f"{task} ci95"])
