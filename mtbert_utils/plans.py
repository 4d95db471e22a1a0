"""The training runs each notebook makes, from the notebook's own parameters.

One function per training notebook returns {key: TrainConfig} (the seed is set later, per run). The notebooks
call these functions, and so does `python -m mtbert_utils.reproduce --train-only`, which trains the same runs
without papermill: the configs, and so the run names (a hash of the config), are the same either way.

    plans.sequential(encoder=..., data_dir=..., max_train=..., max_dev=..., batch_size=..., epochs=...,
                     order=..., progress=...)  ->  {"sequential-baseline": TrainConfig}

Notebook 09 is staged: its adaptive sampler needs the single-task runs' dev scores, and its equal-budget
runs reuse the equal-epochs runs that already saw exactly the budget. `STAGES[notebook]` lists, per
notebook, stage functions `stage(params, earlier) -> {key: TrainConfig}`, where `earlier[i]` holds stage i's
finished runs as {key: [run per seed]}. Notebook 04's zero-shot row evaluates an untrained model: no run here.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from dataclasses import replace
from typing import Callable

from mtbert_utils import TASKS, experiments
from mtbert_utils.config import EXECUTION_ONLY
from mtbert_utils.experiments import best_config, make_config


def execution(speed: dict | None) -> dict:
    """A notebook's `speed` parameter: TrainConfig switches that change how a run executes, not its numbers
    (config.EXECUTION_ONLY: pad_to_multiple, tf32, cuda_graphs, fuse_tasks), so not its run name either."""
    bad = sorted(set(speed or {}) - set(EXECUTION_ONLY))
    if bad:
        raise ValueError(f"speed may only hold the execution-only switches {EXECUTION_ONLY}, got {bad}")
    return dict(speed or {})


# -- Table 1 (notebooks 01-05) -------------------------------------------------------------------


def sequential(*, encoder, data_dir, max_train, max_dev, batch_size, epochs, order, progress, speed=None) -> dict:
    """01: tasks one after another within each epoch, the study's plain setup."""
    return {"sequential-baseline": make_config(
        "baseline", encoder=encoder, data_dir=data_dir, max_train=max_train, max_dev=max_dev, batch_size=batch_size,
        progress=progress, schedule="sequential", schedule_params={"order": order}, phases=[[epochs, True]],
        name="sequential-baseline", **execution(speed))}


def rr_undersampling(*, encoder, data_dir, max_train, max_dev, batch_size, epochs, progress, speed=None) -> dict:
    """02: round robin until the smallest task runs out."""
    return {"rr_under-baseline": make_config(
        "baseline", encoder=encoder, data_dir=data_dir, max_train=max_train, max_dev=max_dev, batch_size=batch_size,
        progress=progress, schedule="rr_under", schedule_params={}, phases=[[epochs, True]], name="rr_under-baseline",
        **execution(speed))}


def rr_oversampling(*, encoder, data_dir, max_train, max_dev, batch_size, epochs, progress, speed=None) -> dict:
    """03: round robin until the largest task runs out (the smaller ones cycle)."""
    return {"rr_over-baseline": make_config(
        "baseline", encoder=encoder, data_dir=data_dir, max_train=max_train, max_dev=max_dev, batch_size=batch_size,
        progress=progress, schedule="rr_over", schedule_params={}, phases=[[epochs, True]], name="rr_over-baseline",
        **execution(speed))}


def cosine_sts(*, encoder, data_dir, max_train, max_dev, batch_size, phases, lr_decay_epochs, progress,
               speed=None) -> dict:
    """04: the tuned setup with the cosine STS head, and the same with the linear head."""
    tuned = make_config("tuned", encoder=encoder, data_dir=data_dir, max_train=max_train, max_dev=max_dev,
                        batch_size=batch_size, progress=progress, schedule="rr_over", phases=phases,
                        lr_decay_epochs=lr_decay_epochs, sts_head="cosine", record_grad_cosines=True,
                        write_predictions=True, name="rr_over-tuned-cosine", **execution(speed))
    linear = replace(tuned, sts_head="linear", sts_loss=None, write_predictions=False, name="rr_over-tuned-linear")
    return {"rr_over-tuned-cosine": tuned, "rr_over-tuned-linear": linear}


def pcgrad_ablation(*, encoder, data_dir, max_train, max_dev, batch_size, phases, lr_decay_epochs, pcgrad_reduction,
                    progress, speed=None) -> dict:
    """05: notebook 04's cosine row (the same runs) without and with PCGrad."""
    base = cosine_sts(encoder=encoder, data_dir=data_dir, max_train=max_train, max_dev=max_dev, batch_size=batch_size,
                      phases=phases, lr_decay_epochs=lr_decay_epochs, progress=progress,
                      speed=speed)["rr_over-tuned-cosine"]
    return {"rr_over-tuned-cosine": base,
            "rr_over-tuned-cosine-pcgrad": replace(base, pcgrad=True, pcgrad_reduction=pcgrad_reduction,
                                                   write_predictions=False, name="rr_over-tuned-cosine-pcgrad")}


# -- the best profile (notebook 08) -----------------------------------------------------------------


def best_model(*, encoder, data_dir, epochs, max_train, max_dev, progress) -> dict:
    """08: experiments.BEST on all (or max_train) training data, model selection on validation."""
    return {"best": best_config(encoder=encoder, data_dir=data_dir, epochs=epochs, progress=progress,
                                max_train=dict(max_train) if max_train else None, max_dev=max_dev or None)}


# -- extensions (notebooks 09-11) -------------------------------------------------------------------


def samplers_single(*, encoder, data_dir, max_train, max_dev, batch_size, epochs, progress) -> dict:
    """09, stage 1: one single-task rr_over run per task (the adaptive sampler's reference scores)."""
    base = make_config("baseline", encoder=encoder, data_dir=data_dir, max_train=max_train, max_dev=max_dev,
                       batch_size=batch_size, progress=progress, phases=[[epochs, True]])
    return {t: replace(base, schedule="rr_over", train_tasks=[t], name=f"single-{t}") for t in TASKS}


def _sampler_config(base, sampler, n_epochs, *, temperature, adaptive_power, reference, anneal_epochs=None,
                    **extra):
    # anneal_epochs: the epochs an annealed run anneals over (under a budget: those the budget runs, no spare)
    params = experiments.schedule_params_for(sampler, anneal_epochs or n_epochs, T=temperature, reference=reference,
                                             power=adaptive_power)
    return replace(base, schedule=sampler, schedule_params=params, phases=[[n_epochs, True]], **extra)


def samplers_epochs(reference: dict, *, encoder, data_dir, max_train, max_dev, batch_size, epochs, samplers,
                    temperature, adaptive_power, progress) -> dict:
    """09, stage 2: every sampler for the same number of epochs. `reference`: experiments.adaptive_reference
    of stage 1's runs."""
    base = make_config("baseline", encoder=encoder, data_dir=data_dir, max_train=max_train, max_dev=max_dev,
                       batch_size=batch_size, progress=progress, phases=[[epochs, True]])
    return {s: _sampler_config(base, s, epochs, temperature=temperature, adaptive_power=adaptive_power,
                               reference=reference, name=f"{s}-epochs") for s in samplers}


@dataclasses.dataclass
class SamplerBudget:
    """09, stage 3: the equal-budget comparison. `configs` holds the runs to train; the samplers in `reused`
    take their equal-epochs runs instead (they already saw exactly the budget)."""
    configs: dict
    reused: list
    budget: int
    budget_epochs: dict
    schedules: dict
    sizes: dict
    num_batches: dict


def samplers_budget(epoch_runs: dict, reference: dict, *, encoder, data_dir, max_train, max_dev, batch_size, epochs,
                    samplers, temperature, adaptive_power, budget_examples, progress) -> SamplerBudget:
    """09, stage 3: every sampler for the same number of training examples. `epoch_runs`: stage 2's runs
    ({sampler: [run per seed]}); reads the training-set sizes (the data folder must be there)."""
    from mtbert_utils.schedules import get_schedule
    base = make_config("baseline", encoder=encoder, data_dir=data_dir, max_train=max_train, max_dev=max_dev,
                       batch_size=batch_size, progress=progress, phases=[[epochs, True]])
    sizes = experiments.train_sizes(base)
    num_batches = experiments.batches_per_epoch(sizes, batch_size)
    sequential_examples = sum(sizes.values()) * epochs  # sequential sees every training example once per epoch
    budget = budget_examples or sequential_examples
    schedules = {s: get_schedule(s, **experiments.schedule_params_for(s, 1, T=temperature, reference=reference,
                                                                       power=adaptive_power)) for s in samplers}
    budget_epochs = {s: experiments.epochs_for_budget(sch, num_batches, sizes, budget) for s, sch in schedules.items()}
    reused = [s for s in samplers if all(sum(r["examples_seen"].values()) == budget for r in epoch_runs[s])]
    configs = {s: _sampler_config(base, s, budget_epochs[s], temperature=temperature, adaptive_power=adaptive_power,
                                  reference=reference, examples_budget=budget, name=f"{s}-budget",
                                  anneal_epochs=experiments.budget_epochs(schedules[s], num_batches, sizes, budget))
               for s in samplers if s not in reused}
    return SamplerBudget(configs, reused, budget, budget_epochs, schedules, sizes, num_batches)


@dataclasses.dataclass
class SigmaOrder:
    """10: rr_over at several steps per epoch (`sigma`, keyed by the resolved step count) and sequential in
    several task orders (`order`, keyed by 'sst-para-sts')."""
    sigma: dict
    order: dict
    sigma_values: list
    order_list: list
    num_batches: dict


def sigma_and_order(*, encoder, data_dir, max_train, max_dev, batch_size, epochs, sigmas, orders,
                    progress) -> SigmaOrder:
    """10: reads the training-set sizes (sigma 'max' is the largest task's batches per epoch)."""
    base = make_config("baseline", encoder=encoder, data_dir=data_dir, max_train=max_train, max_dev=max_dev,
                       batch_size=batch_size, progress=progress, phases=[[epochs, True]])
    num_batches = experiments.batches_per_epoch(experiments.train_sizes(base), batch_size)
    sigma_values = list(dict.fromkeys(experiments.resolve_sigma(s, num_batches) for s in sigmas))  # distinct counts
    order_list = [list(o) for o in (orders or itertools.permutations(TASKS))]
    sigma = {sig: replace(base, schedule="rr_over", schedule_params={"sigma": sig}, name=f"rr_over-sigma{sig}")
             for sig in sigma_values}
    order = {"-".join(o): replace(base, schedule="sequential", schedule_params={"order": o},
                                  name="sequential-" + "-".join(o)) for o in order_list}
    return SigmaOrder(sigma, order, sigma_values, order_list, num_batches)


def pcgrad_weights(*, encoder, data_dir, max_train, max_dev, batch_size, phases, lr_decay_epochs, pcgrad_reduction,
                   weightings, progress) -> dict:
    """11: per task weighting, the tuned cosine setup without ('plain') and with PCGrad; keys (label, arm)."""
    base = make_config("tuned", encoder=encoder, data_dir=data_dir, max_train=max_train, max_dev=max_dev,
                       batch_size=batch_size, progress=progress, schedule="rr_over", phases=phases,
                       lr_decay_epochs=lr_decay_epochs, sts_head="cosine", record_grad_cosines=True)
    configs = {}
    for w in weightings:
        weights = {t: float(w[t]) for t in TASKS}
        label, slug = experiments.weighting_label(weights), "-".join(f"{t}{weights[t]:g}" for t in TASKS)
        plain = replace(base, task_weights=weights, name=f"rr_over-tuned-cosine-w-{slug}")
        configs[(label, "plain")] = plain
        configs[(label, "pcgrad")] = replace(plain, pcgrad=True, pcgrad_reduction=pcgrad_reduction,
                                             name=f"rr_over-tuned-cosine-pcgrad-w-{slug}")
    return configs


# -- stages, for the train-only driver ----------------------------------------------------------------


def call(fn: Callable, params: dict, *args):
    """fn(*args, **the notebook parameters fn names): a notebook's parameters include others (seeds, results_dir).
    A parameter with a default in fn (speed) may be missing: a notebook without it."""
    sig = inspect.signature(fn).parameters.values()
    names = [p.name for p in sig if p.kind is p.KEYWORD_ONLY and (p.default is p.empty or p.name in params)]
    missing = [n for n in names if n not in params]
    if missing:
        raise TypeError(f"{fn.__name__} needs the notebook parameters {missing}")
    return fn(*args, **{n: params[n] for n in names})


def _one(fn):
    def stage(params, earlier):
        return call(fn, params)
    stage.__name__ = fn.__name__
    return stage


def _samplers_epochs_stage(params, earlier):
    return call(samplers_epochs, params, experiments.adaptive_reference(earlier[0]))


def _samplers_budget_stage(params, earlier):
    reference = experiments.adaptive_reference(earlier[0])
    return call(samplers_budget, params, earlier[1], reference).configs


def _sigma_and_order_stage(params, earlier):
    plan = call(sigma_and_order, params)
    return {**{("sigma", k): c for k, c in plan.sigma.items()}, **{("order", k): c for k, c in plan.order.items()}}


# notebook -> its stages, in order; a stage may use the finished runs of the stages before it
STAGES: dict[str, list[Callable[[dict, list], dict]]] = {
    "01_sequential": [_one(sequential)],
    "02_rr_undersampling": [_one(rr_undersampling)],
    "03_rr_oversampling": [_one(rr_oversampling)],
    "04_cosine_sts": [_one(cosine_sts)],
    "05_pcgrad_ablation": [_one(pcgrad_ablation)],
    "08_best_model": [_one(best_model)],
    "09_samplers": [_one(samplers_single), _samplers_epochs_stage, _samplers_budget_stage],
    "10_sigma_and_order": [_sigma_and_order_stage],
    "11_pcgrad_weights": [_one(pcgrad_weights)],
}
