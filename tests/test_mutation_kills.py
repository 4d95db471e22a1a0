"""Invariants of the core modules that the mutation run (benchmarks/mutation.sh) found unguarded.

Each test states the behaviour it guards; results/mutation/summary.md lists what is still unguarded
and why (equivalent mutants).
"""

import random

import pytest
import torch
import torch.nn.functional as F

from mtbert_utils.pcgrad import pairwise_cosines
from mtbert_utils.schedules import SCHEDULES, get_schedule
from mtbert_utils.tasks import sts_cosine_embedding_loss

NB = {"sst": 7, "para": 11, "sts": 3}
PARAMS = {  # every registered schedule with non-default params
    "sequential": {"order": ["sts", "sst", "para"]},
    "rr_under": {},
    "rr_over": {"sigma": 5},
    "proportional": {},
    "temperature": {"T": 3.0},
    "annealed": {"epochs": 4},
    "adaptive": {"reference": {"sst": 0.5, "para": 0.8, "sts": 0.7}, "power": 2.0, "eps": 0.1},
}


# --------------------------------------------------------------------------- schedules


def test_params_cover_every_schedule():
    assert set(PARAMS) == set(SCHEDULES)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_schedule_config_records_its_params_and_rebuilds_it(name):
    """Invariant: a run's JSON records the schedule as config(), {"name": ..., **params}, and that record
    rebuilds the same schedule (same repr, same steps for the same rng)."""
    s = get_schedule(name, **PARAMS[name])
    cfg = s.config()
    assert cfg == {"name": name, **PARAMS[name]}
    params = {k: v for k, v in cfg.items() if k != "name"}
    again = get_schedule(cfg["name"], **params)
    assert repr(again) == repr(s)
    assert repr(s) == f"{type(s).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in params.items()) + ")"
    assert list(again.steps(NB, 0, random.Random(5))) == list(s.steps(NB, 0, random.Random(5)))


def test_examples_per_epoch_is_steps_times_tasks_per_step_times_batch():
    """One task per step (sequential, samplers) vs one batch of every task per step (round robin)."""
    for name, params in PARAMS.items():
        s = get_schedule(name, **params)
        per_step = 1 if name not in ("rr_under", "rr_over") else len(NB)
        assert s.examples_per_epoch(NB, 16) == s.num_steps(NB, 0) * per_step * 16, name
    assert get_schedule("sequential").examples_per_epoch(NB, 16) == (7 + 11 + 3) * 16


@pytest.mark.parametrize("sigma", [0, -1, 2.5, True, "3"])
def test_rr_over_rejects_anything_but_a_positive_int_sigma(sigma):
    with pytest.raises(ValueError, match="sigma must be a positive int or None"):
        get_schedule("rr_over", sigma=sigma)


def test_rr_over_accepts_sigma_one():
    assert list(get_schedule("rr_over", sigma=1).steps(NB, 0, random.Random(0))) == [("sst", "para", "sts")]


def test_adaptive_state_without_scores_restores_the_uniform_start():
    """A checkpoint written before any dev evaluation holds no scores: sampling starts uniform again."""
    s = get_schedule("adaptive", **PARAMS["adaptive"])
    s.update({"sst": 0.1, "para": 0.8, "sts": 0.7})
    s.load_state_dict({})
    assert s.probabilities(NB) == pytest.approx({t: 1 / 3 for t in NB})


# --------------------------------------------------------------------------- pcgrad diagnostics


def test_pairwise_cosines_names_the_mismatch():
    with pytest.raises(ValueError, match="2 gradients but 3 names"):
        pairwise_cosines([torch.ones(3), torch.ones(3)], ["sst", "para", "sts"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pairwise_cosines_of_half_precision_gradients_are_computed_in_float32(dtype):
    """Half-precision gradients (autocast) are promoted before the dot products: 4096-term sums in
    bf16/fp16 would be off by ~1e-2; in float32 the cosine agrees with float64 to ~1e-6."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4096, generator=g).to(dtype)
    b = (0.3 * a.float() + torch.randn(4096, generator=g)).to(dtype)
    want = float(F.cosine_similarity(a.double(), b.double(), dim=0))
    got = pairwise_cosines([a, b], ["sst", "para"])["sst|para"]
    # float32 accumulation of 4096 products of O(1) terms: relative error <= ~sqrt(4096) * 6e-8
    assert got == pytest.approx(want, abs=1e-5)


# --------------------------------------------------------------------------- task losses


def test_cosine_embedding_loss_defaults_are_the_studys():
    """threshold 2.5 (a gold score of 2.5 or more is a similar pair) and margin 0."""
    cos = torch.tensor([0.9, 0.2, -0.3, 0.6, 0.1])
    scores = torch.tensor([2.5, 2.4, 0.0, 3.4, 3.6])
    target = torch.where(scores >= 2.5, 1.0, -1.0)
    # cosine_embedding_loss on unit vectors whose cosine is `cos`
    u = torch.stack([torch.ones_like(cos), torch.zeros_like(cos)], 1)
    v = torch.stack([cos, (1 - cos**2).sqrt()], 1)
    expected = F.cosine_embedding_loss(u, v, target, margin=0.0)
    torch.testing.assert_close(sts_cosine_embedding_loss(cos, scores), expected)
