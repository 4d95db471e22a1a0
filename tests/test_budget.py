"""budget.py: how many examples a schedule feeds, split by phase and capped by a budget, and how many epochs
an equal-budget run needs: on numbers worked by hand, and once against what tiny runs saw. Fast (seconds), so
in the mutation run's selection (benchmarks/mutation.sh)."""

import pytest

from mtbert_utils import budget
from mtbert_utils.config import TrainConfig
from mtbert_utils.schedules import get_schedule

SIZES = {"sst": 40, "para": 88, "sts": 28}   # batch 16: 3, 6, 2 batches; last batches of 8, 8, 12
NB = {"sst": 3, "para": 6, "sts": 2}


def test_batches_and_expected_examples_per_epoch():
    assert budget.batches_per_epoch(SIZES, 16) == NB
    per_epoch = lambda name, **kw: get_schedule(name, **kw).expected_examples_per_epoch(NB, SIZES)  # noqa: E731
    assert per_epoch("sequential") == pytest.approx(156)                       # every example once
    assert per_epoch("rr_under") == pytest.approx(2 * (40 / 3 + 88 / 6 + 28 / 2))  # 2 steps of one batch per task
    assert per_epoch("rr_over", sigma=4) == pytest.approx(4 * (40 / 3 + 88 / 6 + 28 / 2))
    assert per_epoch("proportional") == pytest.approx(156)  # p_t ∝ batches: the sequential count in expectation
    assert per_epoch("temperature", T=1e9) == pytest.approx(11 * (40 / 3 + 88 / 6 + 28 / 2) / 3)  # uniform


def test_expected_examples_split_by_phase_and_capped_by_the_budget():
    per_step = 40 / 3 + 88 / 6 + 28 / 2  # one (mean-sized) batch of every task
    tuned = TrainConfig(schedule="rr_over", schedule_params={"sigma": 4}, batch_size=16,
                        phases=[[1, False], [2, True], [1, False]], lr_decay_epochs=[1])
    assert budget.expected_examples(tuned, SIZES) == {"full": round(8 * per_step), "heads_only": round(8 * per_step)}
    capped = TrainConfig(schedule="sequential", batch_size=16, phases=[[3, True]], examples_budget=200)
    assert budget.expected_examples(capped, SIZES) == {"full": 200, "heads_only": 0}  # 156 + 44 of epoch 2
    assert budget.relative_cost({"full": 30, "heads_only": 30}) == pytest.approx(30 + 30 * budget.HEADS_ONLY_COST)


def test_expected_examples_match_what_tiny_runs_saw(tiny_config, tmp_path, one_thread):
    """packing orders runs (and docs/gpu.md plans GPU time) by expected_examples: against trained runs it is
    off by at most a pass's short last batch per task and epoch."""
    from mtbert_utils.training import train
    for schedule in ("sequential", "rr_under", "rr_over"):
        config = tiny_config(tmp_path / schedule, schedule=schedule)  # 1 heads-only epoch, then 2 full
        run = train(config)
        seen = [sum(h["examples_seen"].values()) for h in run["history"]]
        expected = budget.expected_examples(config)
        slack = config.batch_size * len(config.train_tasks)  # per epoch
        assert abs(expected["heads_only"] - seen[0]) <= slack, schedule
        assert abs(expected["full"] - (seen[2] - seen[0])) <= 2 * slack, schedule


def test_epochs_for_budget_reaches_the_budget_with_one_spare():
    seq = get_schedule("sequential")
    assert budget.epochs_for_budget(seq, NB, SIZES, 312) == 3   # 2 epochs exactly, plus the spare
    assert budget.budget_epochs(seq, NB, SIZES, 312) == 2
    assert budget.epochs_for_budget(seq, NB, SIZES, 313) == 4
    under = get_schedule("rr_under")  # ~84 examples per epoch
    assert budget.epochs_for_budget(under, NB, SIZES, 312) == 5


def test_expected_examples_ask_the_schedule_about_each_epoch():
    """A schedule whose examples per epoch change with the epoch (annealed sampling flattens its task
    probabilities epoch by epoch) is asked about each epoch, not the first one three times."""
    annealed = TrainConfig(schedule="annealed", schedule_params={"epochs": 3}, batch_size=16,
                           phases=[[1, False], [2, True]], lr_decay_epochs=[1])
    s = get_schedule("annealed", epochs=3)
    per_epoch = [s.expected_examples_per_epoch(NB, SIZES, e) for e in range(3)]
    assert per_epoch[0] == pytest.approx(156) and per_epoch[2] < per_epoch[1] < per_epoch[0]
    assert budget.expected_examples(annealed, SIZES) == {"full": round(per_epoch[1] + per_epoch[2]),
                                                         "heads_only": round(per_epoch[0])}
