"""Task schedules: which tasks' batches go into each optimizer step.

The trainer keeps one endlessly reshuffling batch iterator per task, so a
schedule only decides *which* tasks contribute to a step:

    schedule = get_schedule("temperature", T=2)
    for tasks in schedule.steps(num_batches, epoch, rng):   # tasks: ("sst",) or ("sst", "para", "sts")
        ...

`num_batches` maps task -> batches per epoch (its insertion order is the task
order); `rng` is a `random.Random`, the only source of randomness, so a
schedule is deterministic given the rng's seed. Schedules are chosen by name
from `SCHEDULES`, filled by `@register(name)`.
"""

from __future__ import annotations

import itertools
import math
import numbers
import random
import re
import statistics
from typing import Iterator

SCHEDULES: dict[str, type] = {}


def register(name: str):
    """Class decorator: add a schedule to SCHEDULES under `name`."""

    def wrap(cls):
        if name in SCHEDULES:
            raise ValueError(f"schedule {name!r} registered twice")
        cls.name = name
        SCHEDULES[name] = cls
        return cls

    return wrap


def get_schedule(name: str, **params) -> "Schedule":
    """Build the schedule registered as `name` with its params."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid names: {', '.join(sorted(SCHEDULES))}")
    try:
        return SCHEDULES[name](**params)
    except TypeError as e:  # unexpected / missing keyword: say which schedule it was
        raise TypeError(f"bad params for schedule {name!r} {params}: {e}") from e


def _check_num_batches(num_batches: dict[str, int]) -> list[str]:
    if not num_batches:
        raise ValueError("num_batches is empty: need at least one task")
    for task, n in num_batches.items():
        if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 1:
            raise ValueError(f"num_batches[{task!r}] must be a positive int, got {n!r}")
    return list(num_batches)


def _positive_number(name, value, allow_inf=False):
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0
    if not ok or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


class Schedule:
    """Base class. Subclasses implement `steps` and `num_steps`."""

    name = "base"
    one_task_per_step = True  # False: every step holds one batch of every task

    def steps(self, num_batches: dict[str, int], epoch: int, rng: random.Random) -> Iterator[tuple[str, ...]]:
        raise NotImplementedError

    def num_steps(self, num_batches: dict[str, int], epoch: int = 0) -> int:
        """Exact number of tuples `steps` yields for this epoch."""
        raise NotImplementedError

    def expected_examples_per_epoch(self, num_batches: dict[str, int], sizes: dict[str, int],
                                    epoch: int = 0) -> float:
        """Training examples this epoch feeds the model, in expectation; sizes: task -> training examples
        (a pass's last batch is short, so a task's mean batch is sizes[t] / num_batches[t])."""
        raise NotImplementedError

    def config(self) -> dict:
        """The params this schedule was built with, for the run's JSON."""
        return {"name": self.name}

    def update(self, metrics: dict[str, float]) -> None:
        """Called after each dev evaluation; only adaptive schedules use it."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({params})"


# --------------------------------------------------------------------------- deterministic


@register("sequential")
class Sequential(Schedule):
    """Random sequential: all batches of one task, then the next (one task per step).

    The "random" is the within-task shuffling done by the trainer's iterators;
    the task order itself is fixed by `order`.
    """

    def __init__(self, order: tuple[str, ...] | list[str] = ("sst", "para", "sts")):
        order = tuple(order)
        if len(set(order)) != len(order):
            raise ValueError(f"order has repeated tasks: {order}")
        self.order = order

    def _check_order(self, num_batches):
        tasks = _check_num_batches(num_batches)
        if sorted(self.order) != sorted(tasks):
            raise ValueError(f"order {self.order} must be a permutation of the tasks {tuple(tasks)}")

    def steps(self, num_batches, epoch, rng):
        self._check_order(num_batches)
        for task in self.order:
            for _ in range(num_batches[task]):
                yield (task,)

    def num_steps(self, num_batches, epoch=0):
        self._check_order(num_batches)
        return sum(num_batches.values())

    def expected_examples_per_epoch(self, num_batches, sizes, epoch=0):
        self._check_order(num_batches)
        return float(sum(sizes[t] for t in num_batches))  # every batch of every task once

    def config(self):
        return {"name": self.name, "order": list(self.order)}


class _RoundRobin(Schedule):
    """Every step holds one batch of every task; subclasses decide how many steps."""

    one_task_per_step = False

    def steps(self, num_batches, epoch, rng):
        tasks = tuple(_check_num_batches(num_batches))
        for _ in range(self.num_steps(num_batches, epoch)):
            yield tasks

    def expected_examples_per_epoch(self, num_batches, sizes, epoch=0):
        # one batch of every task per step
        return self.num_steps(num_batches, epoch) * sum(sizes[t] / num_batches[t] for t in num_batches)


@register("rr_under")
class RoundRobinUndersampling(_RoundRobin):
    """Round-robin undersampling: each step holds one batch of every task,
    for as many steps as the smallest task has batches."""

    def num_steps(self, num_batches, epoch=0):
        _check_num_batches(num_batches)
        return min(num_batches.values())


@register("rr_over")
class RoundRobinOversampling(_RoundRobin):
    """Round-robin oversampling: each step holds one batch of every task, for
    `sigma` steps (default: the largest task's batch count); smaller tasks
    restart their (reshuffled) iterator when exhausted."""

    def __init__(self, sigma: int | None = None):
        if sigma is not None and (not isinstance(sigma, numbers.Integral) or isinstance(sigma, bool) or sigma < 1):
            raise ValueError(f"sigma must be a positive int or None, got {sigma!r}")
        self.sigma = None if sigma is None else int(sigma)  # a numpy int (a notebook's arithmetic) as a plain one

    def num_steps(self, num_batches, epoch=0):
        _check_num_batches(num_batches)
        return self.sigma if self.sigma is not None else max(num_batches.values())

    def config(self):
        return {"name": self.name, "sigma": self.sigma}


# --------------------------------------------------------------------------- sampling


class SamplingSchedule(Schedule):
    """One task per step, drawn i.i.d. from `probabilities`; sum(num_batches) steps,
    so an epoch sees as many batches as one pass over every task."""

    def _weights(self, num_batches: dict[str, int], epoch: int) -> list[float]:
        raise NotImplementedError

    def probabilities(self, num_batches: dict[str, int], epoch: int = 0) -> dict[str, float]:
        tasks = _check_num_batches(num_batches)
        w = self._weights(num_batches, epoch)
        total = sum(w)
        return {t: wi / total for t, wi in zip(tasks, w)}

    def steps(self, num_batches, epoch, rng):
        probs = self.probabilities(num_batches, epoch)
        tasks, cum = list(probs), list(itertools.accumulate(probs.values()))
        for _ in range(self.num_steps(num_batches, epoch)):
            yield (rng.choices(tasks, cum_weights=cum)[0],)

    def num_steps(self, num_batches, epoch=0):
        _check_num_batches(num_batches)
        return sum(num_batches.values())

    def expected_examples_per_epoch(self, num_batches, sizes, epoch=0):
        # one task per step, drawn with these probabilities
        probs = self.probabilities(num_batches, epoch)
        return self.num_steps(num_batches, epoch) * sum(p * sizes[t] / num_batches[t] for t, p in probs.items())


@register("proportional")
class Proportional(SamplingSchedule):
    """Proportional sampling, p_i ∝ N_i (Sanh et al. 2019, "A hierarchical
    multi-task approach for learning embeddings from semantic tasks";
    Stickland & Murray 2019, "BERT and PALs")."""

    def _weights(self, num_batches, epoch):
        return [float(n) for n in num_batches.values()]


@register("temperature")
class Temperature(SamplingSchedule):
    """Temperature sampling, p_i ∝ N_i^(1/T) (Arivazhagan et al. 2019, "Massively
    multilingual neural machine translation in the wild"). T=1 is proportional,
    T -> inf approaches uniform."""

    def __init__(self, T: float = 2.0):
        self.T = _positive_number("T", T, allow_inf=True)  # T=inf: uniform

    def _weights(self, num_batches, epoch):
        return [n ** (1.0 / self.T) for n in num_batches.values()]

    def config(self):
        return {"name": self.name, "T": self.T}


@register("annealed")
class Annealed(SamplingSchedule):
    """Annealed sampling (Stickland & Murray 2019, "BERT and PALs"): p_i ∝ N_i^alpha,
    alpha = 1 - 0.8 * epoch / (epochs - 1) with 0-based epoch: proportional in
    the first epoch, flatter (alpha = 0.2) in the last, so small tasks are not
    forgotten at the end of training.

    `epochs` is the number of epochs to anneal over: the epochs the run trains. Under an
    examples budget that is the epochs the budget runs (budget_epochs), not the ones
    scheduled with a spare (epochs_for_budget); an epoch past them keeps the final alpha.
    """

    def __init__(self, epochs: int):
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs (total number of epochs) must be an int >= 1, got {epochs!r}")
        self.epochs = epochs

    def alpha(self, epoch: int) -> float:
        if epoch < 0:
            raise ValueError(f"epoch {epoch} is negative")
        if self.epochs == 1:
            return 1.0
        epoch = min(epoch, self.epochs - 1)  # a spare epoch after the last keeps its alpha
        return 1.0 - 0.8 * epoch / (self.epochs - 1)

    def _weights(self, num_batches, epoch):
        a = self.alpha(epoch)
        return [n**a for n in num_batches.values()]

    def config(self):
        return {"name": self.name, "epochs": self.epochs}


@register("adaptive")
class Adaptive(SamplingSchedule):
    """Adaptive sampling after Jean, Firat & Johnson 2019, "Adaptive scheduling
    for multi-task learning": tasks that lag their single-task reference score
    are sampled more.

        ratio_i  = max(current_i / reference_i, eps)
        weight_i = ratio_i ** (-power),  p_i = weight_i / sum_j weight_j

    A task without a dev score yet counts as on target (ratio 1), so before the
    first `update` sampling is uniform. Scores <= 0 (a negative STS Pearson) or
    NaN are clamped to ratio eps: maximally lagging, but a finite weight.
    """

    def __init__(self, reference: dict[str, float], power: float = 1.0, eps: float = 0.05):
        if not isinstance(reference, dict) or not reference:
            raise ValueError(f"reference must be a non-empty dict task -> single-task dev score, got {reference!r}")
        for task, score in reference.items():
            _positive_number(f"reference[{task!r}]", score)
        self.reference = {t: float(s) for t, s in reference.items()}
        self.power = _positive_number("power", power)
        self.eps = _positive_number("eps", eps)
        self.current: dict[str, float] = {}  # latest dev score per task

    def update(self, metrics):
        for task, score in metrics.items():
            if task in self.reference:  # ignore extras such as an "overall" average
                self.current[task] = float(score)

    def ratio(self, task: str) -> float:
        if task not in self.current:
            return 1.0
        r = self.current[task] / self.reference[task]
        return r if math.isfinite(r) and r > self.eps else self.eps

    def _weights(self, num_batches, epoch):
        missing = [t for t in num_batches if t not in self.reference]
        if missing:
            raise ValueError(f"adaptive schedule has no reference score for {missing}")
        return [self.ratio(t) ** -self.power for t in num_batches]

    def state_dict(self):
        return {"current": dict(self.current)}

    def load_state_dict(self, state):
        self.current = {t: float(s) for t, s in state.get("current", {}).items()}

    def config(self):
        return {"name": self.name, "reference": dict(self.reference), "power": self.power, "eps": self.eps}


# --------------------------------------------------------------------------- parameters
# what the extension notebooks (09-11) pass to the schedules above


def schedule_params_for(sampler: str, epochs: int, *, T: float = 2.0, reference: dict | None = None,
                        power: float = 1.0) -> dict:
    """The schedule_params each registered sampler takes in the extension notebooks."""
    if sampler == "temperature":
        return {"T": T}
    if sampler == "annealed":
        return {"epochs": int(epochs)}  # anneal over the epochs the run trains (under a budget: budget_epochs)
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
    empty = [t for t, runs in single_task_runs.items() if not runs]
    if empty:
        raise ValueError(f"adaptive_reference: no single-task runs for {empty}")
    return {t: max(float(sum(r["dev"][t] for r in runs) / len(runs)), floor) for t, runs in single_task_runs.items()}


def resolve_sigma(spec, num_batches: dict[str, int]) -> int:
    """rr_over's sigma (steps per epoch) from an int, or 'min' / 'median' / 'max' of the tasks' batch
    counts with an optional factor in front ('2max', '0.5*max')."""
    if isinstance(spec, numbers.Integral) and not isinstance(spec, bool):
        if spec < 1:
            raise ValueError(f"sigma must be >= 1, got {spec}")
        return int(spec)
    m = re.fullmatch(r"\s*(\d*\.?\d*)\s*\*?\s*(min|median|max)\s*", str(spec))
    if not m or m.group(1) == "." or (m.group(1) and float(m.group(1)) <= 0):
        raise ValueError(f"sigma {spec!r}: use an int or min/median/max with an optional factor > 0, e.g. '2max'")
    counts = sorted(num_batches.values())
    base = {"min": counts[0], "max": counts[-1], "median": float(statistics.median(counts))}[m.group(2)]
    return max(1, round(float(m.group(1) or 1) * base))
