"""Gradient combination: how one step's task losses become the gradients the optimizer applies.

Methods are chosen by name from GRAD_METHODS (like schedules.SCHEDULES), filled by @register(name):

    sum      backward the weighted sum of the task losses (the plain multitask step)
    pcgrad   per-task gradients, conflicting ones projected off each other (Yu et al. 2020,
             "Gradient Surgery for Multi-Task Learning"; pcgrad.py)

A method is called as method(losses, shared, config=..., scaler=..., generator=..., reduce_fn=...) with
`losses` the weighted task losses of the step: tensors, or, while the encoder trains in a run that does not back
the summed loss (backs_summed_loss), functions that run their task's forward and return its loss (call each just
before the task's backward, in order: one task's activations alive at a time); `shared` the trainable encoder and
shared-layer parameters;
it fills the parameters' .grad and returns the pairwise task-gradient cosines, or None when it did not
compute them. TrainConfig.grad_method names the method of a run.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from mtbert_utils.pcgrad import pcgrad_backward

GRAD_METHODS: dict[str, Callable] = {}


def register(name: str):
    """Function decorator: add a gradient-combination method to GRAD_METHODS under `name`."""
    def wrap(fn):
        if name in GRAD_METHODS:
            raise ValueError(f"gradient method {name!r} registered twice")
        GRAD_METHODS[name] = fn
        return fn
    return wrap


def per_task_needed(losses: dict, reduce_fn) -> bool:
    """Per-task backward passes only pay off with two tasks to compare, or with per-task averaging
    over processes (data parallel: reduce_fn)."""
    return len(losses) > 1 or reduce_fn is not None


def backs_summed_loss(config) -> bool:
    """Whether the run's method takes one backward pass of the summed loss, never a task's gradient on its own.
    Only then may a step's tasks share one encoder call (TrainConfig.fuse_tasks): a per-task backward through
    a shared call would run through every task's rows."""
    return config.grad_method == "sum" and not config.record_grad_cosines


def _backward_sum(losses: dict, scaler) -> None:
    total = sum(loss() if callable(loss) else loss for loss in losses.values())
    (scaler.scale(total) if scaler else total).backward()


@register("sum")
def sum_losses(losses: dict, shared: list, *, config, scaler=None, generator=None, reduce_fn=None) -> dict | None:
    """Backward the sum of the weighted task losses. With config.record_grad_cosines the task gradients
    are taken one by one (same sum, no projection) so that their cosines can be logged."""
    if config.record_grad_cosines and per_task_needed(losses, reduce_fn):
        stats = pcgrad_backward(losses, shared, reduction="sum", generator=generator, scaler=scaler,
                                project=False, reduce_fn=reduce_fn)
        return stats["cosines"] if len(losses) > 1 else None
    _backward_sum(losses, scaler)
    return None


@register("pcgrad")
def pcgrad(losses: dict, shared: list, *, config, scaler=None, generator=None, reduce_fn=None) -> dict | None:
    """PCGrad on the shared parameters (reduction config.pcgrad_reduction); heads get their own task's
    gradient. One task alone has nothing to project against: a plain backward."""
    if not per_task_needed(losses, reduce_fn):
        _backward_sum(losses, scaler)
        return None
    stats = pcgrad_backward(losses, shared, reduction=config.pcgrad_reduction, generator=generator,
                            scaler=scaler, project=True, reduce_fn=reduce_fn)
    return stats["cosines"] if len(losses) > 1 else None


# ---------------------------------------------------------------------------
# the cosines a run logged (config.record_grad_cosines, or PCGrad), measured before any projection


def summarize_cosines(cos_log: list[dict]) -> dict:
    """Per task pair: mean cosine, fraction of steps in conflict (cos < 0), and the per-step values. A step
    whose cosine is not finite (fp16: a step the GradScaler skips has inf gradients) is left out and counted
    (non_finite_steps), instead of turning the epoch's mean into NaN."""
    out = {}
    pairs = sorted({pair for c in cos_log for pair in c})
    for pair in pairs:
        vals = np.array([c[pair] for c in cos_log if pair in c], dtype=float)
        finite = vals[np.isfinite(vals)]
        out[pair] = {"mean": float(finite.mean()) if finite.size else None,
                     "conflict_rate": float((finite < 0).mean()) if finite.size else None,
                     "values": [round(float(v), 5) for v in finite]}
        if finite.size < vals.size:
            out[pair]["non_finite_steps"] = int(vals.size - finite.size)
    return out


def run_cosines(run: dict, heads_only_epochs: bool = False) -> dict[str, list[float]]:
    """Task pair -> the per-step cosines of a finished run, in step order, over the epochs in which the encoder
    trained. In a heads-only epoch the shared parameters are the shared layer alone, which the cosine STS head
    does not use: its cosines measure another quantity, for fewer pairs, and joined with the others they would
    put a pair's steps at other positions than its neighbours'. heads_only_epochs=True takes every epoch."""
    values: dict[str, list] = {}
    for h in run["history"]:
        if not heads_only_epochs and not h.get("encoder_trainable", True):
            continue
        for pair, c in h.get("grad_cosines", {}).items():
            values.setdefault(pair, []).extend(c["values"])
    return values
