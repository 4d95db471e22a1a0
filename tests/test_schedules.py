"""Schedules: exact step counts and contents, sampling probabilities worked by hand."""

import math
import random
from collections import Counter

import numpy as np
import pytest

from mtbert_utils.schedules import (
    SCHEDULES,
    Schedule,
    adaptive_reference,
    get_schedule,
    resolve_sigma,
    schedule_params_for,
)

NB = {"sst": 7, "para": 11, "sts": 3}
ALL = ("sst", "para", "sts")
N = {"sst": 100, "para": 50, "sts": 10}
SAMPLERS = {
    "proportional": {},
    "temperature": {"T": 2},
    "annealed": {"epochs": 3},
    "adaptive": {"reference": {"sst": 0.5, "para": 0.8, "sts": 0.8}},
}


def run(schedule, num_batches=NB, epoch=0, seed=0):
    return list(schedule.steps(num_batches, epoch, random.Random(seed)))


def test_registry_names():
    assert set(SCHEDULES) == {"sequential", "rr_under", "rr_over", "proportional", "temperature", "annealed", "adaptive"}
    for name, cls in SCHEDULES.items():
        assert issubclass(cls, Schedule) and cls.name == name


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as e:
        get_schedule("round_robin")
    for name in SCHEDULES:
        assert name in str(e.value)


def test_bad_params_rejected():
    with pytest.raises(TypeError, match="rr_under"):
        get_schedule("rr_under", sigma=3)
    with pytest.raises(TypeError, match="annealed"):
        get_schedule("annealed")  # epochs is required
    with pytest.raises(ValueError):
        get_schedule("annealed", epochs=0)
    with pytest.raises(ValueError):
        get_schedule("temperature", T=0)
    with pytest.raises(ValueError):
        get_schedule("rr_over", sigma=0)
    with pytest.raises(ValueError):
        get_schedule("adaptive", reference={"sst": 0.0})


# ----------------------------------------------------------------------------- deterministic


def test_sequential_default_order_and_counts():
    s = get_schedule("sequential")
    steps = run(s)
    assert steps == [("sst",)] * 7 + [("para",)] * 11 + [("sts",)] * 3
    assert s.num_steps(NB, 0) == len(steps) == 21


def test_sequential_custom_order():
    steps = run(get_schedule("sequential", order=["sts", "sst", "para"]))
    assert steps == [("sts",)] * 3 + [("sst",)] * 7 + [("para",)] * 11


@pytest.mark.parametrize("order", [("sst", "para"), ("sst", "para", "qqp"), ("sst", "sst", "para")])
def test_sequential_bad_order_rejected(order):
    with pytest.raises(ValueError, match="order"):
        run(get_schedule("sequential", order=order))


def test_rr_under_min_steps_all_tasks():
    s = get_schedule("rr_under")
    steps = run(s)
    assert len(steps) == s.num_steps(NB, 0) == 3
    assert all(t == ALL for t in steps)
    full = {t: n * 8 for t, n in NB.items()}  # full batches of 8: one batch of each task per step
    assert s.expected_examples_per_epoch(NB, full) == 3 * 3 * 8


def test_rr_over_default_sigma_is_max():
    s = get_schedule("rr_over")
    steps = run(s)
    assert len(steps) == s.num_steps(NB, 0) == 11
    assert all(t == ALL for t in steps)


def test_rr_over_custom_sigma():
    s = get_schedule("rr_over", sigma=25)
    steps = run(s)
    assert len(steps) == s.num_steps(NB, 0) == 25
    assert all(t == ALL for t in steps)
    assert s.config() == {"name": "rr_over", "sigma": 25}
    # a numpy int (a notebook's arithmetic) is taken and kept as a plain int (checkpoints hold plain values)
    s = get_schedule("rr_over", sigma=np.int64(25))
    assert s.num_steps(NB, 0) == 25 and type(s.config()["sigma"]) is int


# ----------------------------------------------------------------------------- sampling


def approx_dict(d, **kw):
    return {k: pytest.approx(v, **kw) for k, v in d.items()}


def test_proportional_probabilities():
    assert get_schedule("proportional").probabilities(N) == approx_dict({"sst": 100 / 160, "para": 50 / 160, "sts": 10 / 160})


def test_temperature_probabilities():
    z = 10 + math.sqrt(50) + math.sqrt(10)
    p = get_schedule("temperature", T=2).probabilities(N)
    assert p == approx_dict({"sst": 10 / z, "para": math.sqrt(50) / z, "sts": math.sqrt(10) / z})
    assert get_schedule("temperature", T=1).probabilities(N) == approx_dict(get_schedule("proportional").probabilities(N))
    # not a rounding tolerance: N_t^(1/T) = exp(ln N_t / T) is uniform up to (ln max N - ln min N) / T
    spread = (math.log(max(N.values())) - math.log(min(N.values()))) / 1e6
    assert get_schedule("temperature", T=1e6).probabilities(N) == approx_dict({t: 1 / 3 for t in N}, abs=spread)


def test_annealed_alpha_first_and_last_epoch():
    s = get_schedule("annealed", epochs=5)
    assert s.alpha(0) == 1.0 and s.alpha(4) == pytest.approx(0.2) and s.alpha(2) == pytest.approx(0.6)
    assert s.probabilities(N, epoch=0) == approx_dict(get_schedule("proportional").probabilities(N))
    z = 100**0.2 + 50**0.2 + 10**0.2
    assert s.probabilities(N, epoch=4) == approx_dict({"sst": 100**0.2 / z, "para": 50**0.2 / z, "sts": 10**0.2 / z})
    assert get_schedule("annealed", epochs=1).alpha(0) == 1.0
    # a spare epoch after the annealed ones (equal-budget runs schedule one) keeps the final alpha
    assert s.probabilities(N, epoch=5) == s.probabilities(N, epoch=4)
    with pytest.raises(ValueError):
        s.probabilities(N, epoch=-1)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_step_count_and_one_task_per_step(name):
    s = get_schedule(name, **SAMPLERS[name])
    steps = run(s, N)
    assert len(steps) == s.num_steps(N, 0) == 160
    assert all(len(t) == 1 and t[0] in N for t in steps)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_empirical_frequencies_match_probabilities(name):
    s = get_schedule(name, **SAMPLERS[name])
    if name == "adaptive":
        s.update({"sst": 0.4, "para": 0.7, "sts": 0.2})
    big = {t: 30 * n for t, n in N.items()}  # 4800 draws
    counts = Counter(t for (t,) in run(s, big, epoch=1 if name == "annealed" else 0, seed=123))
    probs = s.probabilities(big, epoch=1 if name == "annealed" else 0)
    for t in big:
        # not a rounding tolerance: a frequency of 4800 draws has standard error <= 0.5 / sqrt(4800) = 0.0072;
        # 0.025 is 3.5 of them (the draws are seeded, so the test cannot flake)
        assert counts[t] / 4800 == pytest.approx(probs[t], abs=0.025)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_deterministic_given_seed(name):
    s = get_schedule(name, **SAMPLERS.get(name, {}))
    assert run(s, N, seed=5) == run(s, N, seed=5)
    if name in SAMPLERS:
        assert run(s, N, seed=5) != run(s, N, seed=6)


def test_adaptive_uniform_then_samples_lagging_task_more():
    ref = {"sst": 0.5, "para": 0.8, "sts": 0.8}
    s = get_schedule("adaptive", reference=ref)
    assert s.probabilities(N) == approx_dict({t: 1 / 3 for t in N})
    s.update({"sst": 0.5, "para": 0.8, "sts": 0.4, "overall": 0.6})  # sts at half its reference
    # weights 1, 1, 2 (power 1)
    assert s.probabilities(N) == approx_dict({"sst": 0.25, "para": 0.25, "sts": 0.5})
    counts = Counter(t for (t,) in run(s, N, seed=1))
    assert counts["sts"] > counts["sst"] and counts["sts"] > counts["para"]


def test_adaptive_negative_pearson_clamped():
    s = get_schedule("adaptive", reference={"sst": 0.5, "para": 0.8, "sts": 0.8}, eps=0.1)
    s.update({"sst": 0.5, "para": 0.8, "sts": -0.3})
    p = s.probabilities(N)
    assert all(math.isfinite(v) for v in p.values())
    assert p == approx_dict({"sst": 1 / 12, "para": 1 / 12, "sts": 10 / 12})  # ratio clamped to eps = 0.1


def test_adaptive_state_dict_round_trip():
    ref = {"sst": 0.5, "para": 0.8, "sts": 0.8}
    s = get_schedule("adaptive", reference=ref, power=2)
    s.update({"sst": 0.3, "para": 0.75, "sts": 0.6})
    fresh = get_schedule("adaptive", reference=ref, power=2)
    fresh.load_state_dict(s.state_dict())
    assert fresh.probabilities(N) == s.probabilities(N)
    assert run(fresh, N, seed=9) == run(s, N, seed=9)
    assert get_schedule("rr_under").state_dict() == {}


# --------------------------------------------------------------------------- schedule parameters
# (the helpers the extension notebooks build their schedules with; numbers worked by hand)

SIGMA_NB = {"sst": 3, "para": 6, "sts": 2}  # sorted batch counts 2, 3, 6


def test_resolve_sigma():
    """sigma is an int >= 1 taken as is, or a factor times the min / median / max batch count, rounded,
    never below one step; anything else is refused by name."""
    assert [resolve_sigma(s, SIGMA_NB) for s in ("min", "median", "max", "2max", "0.5*max", " 1.5 * min ", 7, 1)] \
        == [2, 3, 6, 12, 3, 3, 7, 1]
    assert resolve_sigma("0.1min", SIGMA_NB) == 1  # round(0.2) = 0 steps: an epoch has at least one
    assert resolve_sigma("median", {"a": 1, "b": 4, "c": 9, "d": 30}) == 6  # even count: mean of the middle two
    assert resolve_sigma(np.int64(7), SIGMA_NB) == 7 and type(resolve_sigma(np.int64(7), SIGMA_NB)) is int
    for bad in ("biggest", "MAX", "", True, "0max", "0.0*min", ".max"):  # True is not one step; a factor is > 0
        with pytest.raises(ValueError, match="sigma .*: use an int or min/median/max"):
            resolve_sigma(bad, SIGMA_NB)
    for bad in (0, -3):
        with pytest.raises(ValueError, match=f"^sigma must be >= 1, got {bad}$"):
            resolve_sigma(bad, SIGMA_NB)


def test_adaptive_reference_floors_non_positive_scores():
    """The reference is the mean dev score of a task's own single-task runs, raised to the floor (0.05
    by default) so the adaptive sampler gets a positive number."""
    runs = {"sst": [{"dev": {"sst": 0.4, "sts": 9.0}}, {"dev": {"sst": 0.5, "sts": 9.0}}],
            "sts": [{"dev": {"sts": -0.2}}], "para": [{"dev": {"para": 0.03}}]}
    assert adaptive_reference(runs) == {"sst": pytest.approx(0.45), "sts": 0.05, "para": 0.05}
    assert adaptive_reference(runs, floor=0.01) == {"sst": pytest.approx(0.45), "sts": 0.01, "para": 0.03}
    with pytest.raises(ValueError, match=r"^adaptive_reference: no single-task runs for \['para'\]$"):
        adaptive_reference({**runs, "para": []})  # once a ZeroDivisionError


def test_schedule_params_for_builds_every_registered_sampler():
    """Each sampler gets the params it takes; with the defaults the schedule is the one get_schedule builds
    with its own defaults; annealing runs over the epochs given; adaptive without references is refused."""
    ref = {"sst": 0.5, "para": 0.8, "sts": 0.7}
    for name in SCHEDULES:
        s = get_schedule(name, **schedule_params_for(name, 4, reference=ref))
        assert s.name == name
    assert schedule_params_for("temperature", 4) == {"T": 2.0}
    assert get_schedule("temperature", **schedule_params_for("temperature", 4)).config() \
        == get_schedule("temperature").config()
    assert schedule_params_for("temperature", 4, T=5.0) == {"T": 5.0}
    assert schedule_params_for("annealed", 4.0) == {"epochs": 4} and type(schedule_params_for("annealed", 4.0)["epochs"]) is int
    params = schedule_params_for("adaptive", 4, reference=ref)
    assert params == {"reference": ref, "power": 1.0} and params["reference"] is not ref  # a copy
    assert get_schedule("adaptive", **params).config() == get_schedule("adaptive", reference=ref).config()
    assert schedule_params_for("adaptive", 4, reference=ref, power=2.0)["power"] == 2.0
    for name in ("sequential", "rr_under", "rr_over", "proportional"):
        assert schedule_params_for(name, 4, T=5.0, reference=ref) == {}
    for missing in (None, {}):
        with pytest.raises(ValueError, match="^the adaptive sampler needs single-task reference scores$"):
            schedule_params_for("adaptive", 4, reference=missing)


def test_expected_examples_of_annealed_sampling_follow_the_epoch():
    """Annealed sampling's expected examples per epoch use that epoch's probabilities, the first
    epoch (0) by default: proportional there, so every example once in expectation."""
    sizes = {"sst": 40, "para": 88, "sts": 28}
    s = get_schedule("annealed", epochs=3)
    assert s.expected_examples_per_epoch(SIGMA_NB, sizes) == pytest.approx(156)
    for epoch in (1, 2):
        a = 1 - 0.8 * epoch / 2
        w = {t: n**a for t, n in SIGMA_NB.items()}
        want = 11 * sum(w[t] / sum(w.values()) * sizes[t] / SIGMA_NB[t] for t in SIGMA_NB)
        assert s.expected_examples_per_epoch(SIGMA_NB, sizes, epoch) == pytest.approx(want)
