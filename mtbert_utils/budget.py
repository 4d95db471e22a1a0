"""Examples budgets: how many examples a schedule feeds per epoch, and how many epochs an
equal-budget run needs (notebook 09 compares samplers at equal epochs and at equal examples).

Each schedule answers for itself how many examples an epoch feeds
(Schedule.expected_examples_per_epoch); this module adds the data sizes and the epoch counts.
"""

from __future__ import annotations

import math


# A heads-only step (frozen encoder: its forward pass only, no backward through it) costs about a third of a
# full step: in gpu-minilm's tuned runs (results/gpu-minilm/runs, H200, 9 runs sharing the GPU in both) the
# heads-only epochs 9-10 trained at 3,133-3,734 examples/s against 1,208-1,216 for the full epochs 6-8.
HEADS_ONLY_COST = 1 / 3


def train_sizes(config) -> dict[str, int]:
    """Training examples per task that `config` trains on (after its max_train caps and validation split)."""
    from mtbert_utils.batching import load_run_tasks
    tasks, _ = load_run_tasks(config)  # reads the files, tokenizes nothing
    return {t: len(tasks[t].train) for t in config.train_tasks}


def expected_examples(config, sizes: dict[str, int] | None = None) -> dict[str, int]:
    """Training examples a run of `config` sees, in expectation (sampled schedules draw at random; a pass's
    short last batch makes every schedule's count approximate to a batch per task and epoch), split by whether
    the encoder trains: {"full": ..., "heads_only": ...}. The examples budget, if any, caps the sum."""
    from mtbert_utils.schedules import get_schedule
    sizes = sizes or train_sizes(config)
    num_batches = batches_per_epoch(sizes, config.batch_size)
    schedule = get_schedule(config.schedule, **config.schedule_params)
    seen = {"full": 0.0, "heads_only": 0.0}
    left = config.examples_budget or math.inf
    for epoch in range(config.epochs):
        n = min(schedule.expected_examples_per_epoch(num_batches, sizes, epoch), left)
        seen["full" if config.encoder_trainable(epoch) else "heads_only"] += n
        left -= n
    return {k: round(v) for k, v in seen.items()}


def relative_cost(examples: dict[str, int]) -> float:
    """expected_examples in full-step equivalents: what packing orders runs by, and plans GPU time with."""
    return examples["full"] + HEADS_ONLY_COST * examples["heads_only"]


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
