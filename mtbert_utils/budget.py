"""Examples budgets: how many examples a schedule feeds per epoch, and how many epochs an
equal-budget run needs (notebook 09 compares samplers at equal epochs and at equal examples).

Each schedule answers for itself how many examples an epoch feeds
(Schedule.expected_examples_per_epoch); this module adds the data sizes and the epoch counts.
"""

from __future__ import annotations

import math


def train_sizes(config) -> dict[str, int]:
    """Training examples per task that `config` trains on (after its max_train caps)."""
    from mtbert_utils.model import load_tokenizer
    from mtbert_utils.training import prepare_data
    _, info = prepare_data(config, load_tokenizer(config.encoder))  # cached: the first run reuses it
    return {t: int(info["sizes"][t]["train"]) for t in config.train_tasks}


def batches_per_epoch(sizes: dict[str, int], batch_size: int) -> dict[str, int]:
    return {t: -(-n // batch_size) for t, n in sizes.items()}  # ceil: the last batch of a pass is short


def budget_epochs(schedule, num_batches: dict[str, int], sizes: dict[str, int], budget: int) -> int:
    """Epochs a run of `schedule` trains before it has seen `budget` training examples (in expectation:
    sampled schedules draw at random). An annealed schedule anneals over these."""
    return math.ceil(budget / schedule.expected_examples_per_epoch(num_batches, sizes))


def epochs_for_budget(schedule, num_batches: dict[str, int], sizes: dict[str, int], budget: int) -> int:
    """Epochs to schedule so a run of `schedule` reaches `budget` training examples: budget_epochs plus
    one spare (sampled schedules draw at random); training stops as soon as the budget is spent, so the
    spare epoch usually never starts."""
    return budget_epochs(schedule, num_batches, sizes, budget) + 1
