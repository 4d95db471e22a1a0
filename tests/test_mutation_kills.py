"""Invariants of the core modules that the mutation run (benchmarks/mutation.sh) found unguarded.

Each test states the behaviour it guards; results/mutation/summary.md lists what is still unguarded
and why (equivalent mutants).
"""

import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtbert_utils.pcgrad import pairwise_cosines, pcgrad_backward
from mtbert_utils.schedules import SCHEDULES, get_schedule
from mtbert_utils.tasks import sts_cosine_embedding_loss

from conftest import float32_tol, float64_tol

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
    """One task per step (sequential, samplers) vs one batch of every task per step (round robin): with full
    batches of 16 (sizes = 16 x batches), an epoch feeds steps x tasks per step x 16 examples."""
    sizes = {t: 16 * n for t, n in NB.items()}
    for name, params in PARAMS.items():
        s = get_schedule(name, **params)
        per_step = 1 if name not in ("rr_under", "rr_over") else len(NB)
        assert s.expected_examples_per_epoch(NB, sizes) == pytest.approx(s.num_steps(NB, 0) * per_step * 16), name
    assert get_schedule("sequential").expected_examples_per_epoch(NB, sizes) == (7 + 11 + 3) * 16


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


def test_temperature_default_and_infinite_temperature():
    """The default T is 2 (p ∝ sqrt(N)); T = inf is allowed and samples uniformly."""
    p = get_schedule("temperature").probabilities({"sst": 1, "para": 4, "sts": 9})
    assert p == pytest.approx({"sst": 1 / 6, "para": 2 / 6, "sts": 3 / 6})
    inf = get_schedule("temperature", T=float("inf"))
    assert inf.probabilities(NB) == pytest.approx({t: 1 / 3 for t in NB})
    with pytest.raises(ValueError, match="^T must be a positive number, got 0"):
        get_schedule("temperature", T=0)


@pytest.mark.parametrize("epochs", [0, 2.0, True])
def test_annealed_needs_an_int_number_of_epochs(epochs):
    with pytest.raises(ValueError, match=r"epochs \(total number of epochs\) must be an int >= 1"):
        get_schedule("annealed", epochs=epochs)


def test_annealed_keeps_its_final_alpha_after_the_schedule_and_rejects_negative_epochs():
    """A budget run may schedule a spare epoch after the annealing ends (issue #13 item 5): it keeps alpha's
    final value; a negative epoch is a caller's bug."""
    s = get_schedule("annealed", epochs=3)
    assert s.alpha(3) == s.alpha(7) == s.alpha(2) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="epoch -1 is negative"):
        s.alpha(-1)


@pytest.mark.parametrize("kw,message", [
    ({"reference": [("sst", 0.5)]}, "reference must be a non-empty dict"),
    ({"reference": {}}, "reference must be a non-empty dict"),
    ({"reference": {"sst": -0.1}}, r"reference\['sst'\] must be a positive number"),
    ({"reference": {"sst": 0.5}, "power": 0}, "^power must be a positive number"),
    ({"reference": {"sst": 0.5}, "eps": -1}, "^eps must be a positive number"),
    ({"reference": {"sst": 0.5}, "power": float("inf")}, "^power must be a positive number"),  # only T may be inf
    ({"reference": {"sst": float("inf")}}, r"reference\['sst'\] must be a positive number"),
])
def test_adaptive_rejects_bad_params_by_name(kw, message):
    with pytest.raises(ValueError, match=message):
        get_schedule("adaptive", **kw)


def test_adaptive_task_without_a_score_counts_as_on_target():
    """ratio 1 for a task not yet scored, so a partial update moves only the scored task's weight."""
    s = get_schedule("adaptive", reference={"sst": 0.5, "para": 0.8, "sts": 0.7})
    assert s.ratio("para") == 1.0
    s.update({"sst": 0.25})  # half its reference: weight 2, the unscored tasks weight 1
    assert s.probabilities(NB) == pytest.approx({"sst": 0.5, "para": 0.25, "sts": 0.25})


def test_adaptive_needs_a_reference_for_every_scheduled_task():
    s = get_schedule("adaptive", reference={"sst": 0.5, "para": 0.8})
    with pytest.raises(ValueError, match=r"no reference score for \['sts'\]"):
        s.probabilities(NB)


# --------------------------------------------------------------------------- statistics and metrics in float64


def test_statistics_are_computed_in_float64_whatever_the_input_dtype():
    """Scores that arrive as float16/float32 arrays (a tensor's .numpy()) are summarised in float64:
    the result equals that of the same values given as float64."""
    import numpy as np
    from mtbert_utils.stats import mean_ci, paired_comparison
    from mtbert_utils.tasks import pearson

    a = np.array([0.4121, 0.4478, 0.5012, 0.3987], dtype=np.float16)
    b = np.array([0.3990, 0.4502, 0.4611, 0.3866], dtype=np.float16)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    assert mean_ci(a) == pytest.approx(mean_ci(a64), rel=1e-12)
    for x, y in ((a, b64), (a64, b)):
        got, want = paired_comparison(x, y), paired_comparison(a64, b64)
        assert got == pytest.approx(want, rel=1e-12)
    assert pearson(a, b64) == pytest.approx(pearson(a64, b64), rel=1e-12)
    assert pearson(a64, b) == pytest.approx(pearson(a64, b64), rel=1e-12)


def test_pearson_edge_cases_against_scipy():
    from scipy.stats import pearsonr
    from mtbert_utils.tasks import pearson
    assert pearson([1.0, 2.0], [3.0, 5.0]) == 1.0  # two distinct points: defined, perfectly correlated
    pred, gold = [0.5, 1.0, 3.0, 2.0], [1.0, -1.0, 1.0, -1.0]  # gold's (population) sd is exactly 1
    assert pearson(pred, gold) == pytest.approx(pearsonr(pred, gold)[0], abs=1e-12)


# --------------------------------------------------------------------------- schedule inputs


def test_unknown_schedule_lists_the_valid_names_sorted():
    with pytest.raises(ValueError, match="unknown schedule 'nope'; valid names: " + ", ".join(sorted(SCHEDULES))):
        get_schedule("nope")


@pytest.mark.parametrize("bad", [{}, {"sst": 0}, {"sst": 2.5}, {"sst": True}, {"sst": "3"}])
def test_num_batches_must_be_positive_ints(bad):
    with pytest.raises(ValueError, match=r"^(num_batches is empty: need at least one task|"
                                         r"num_batches\['sst'\] must be a positive int, got .*)$"):
        get_schedule("rr_under").num_steps(bad)


def test_one_batch_per_task_is_a_valid_epoch():
    assert get_schedule("rr_under").num_steps({"sst": 1, "para": 1}) == 1
    assert get_schedule("sequential", order=["sst"]).num_steps({"sst": 1}) == 1


def test_annealed_probabilities_default_to_the_first_epoch():
    """epoch defaults to 0 everywhere: an annealed schedule's first epoch is proportional sampling."""
    s = get_schedule("annealed", epochs=3)
    assert s.probabilities(NB) == pytest.approx(get_schedule("proportional").probabilities(NB))
    assert s.probabilities(NB) != pytest.approx(s.probabilities(NB, 2))


# --------------------------------------------------------------------------- pcgrad_backward's contract


def _two_task_params():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    v = torch.nn.Parameter(torch.tensor([0.3, 0.1]))
    return w, v


def test_pcgrad_backward_frees_each_task_graph_that_no_later_task_uses():
    """Memory like a plain backward: tasks that share only parameters (no activations) do not keep
    their graphs, so backward through the first task's loss again fails; tasks that share an
    activation keep it until the last one."""
    w, v = _two_task_params()
    x = torch.tensor([1.0, 2.0, 3.0])
    losses = {"a": (w * x).sum() ** 2, "b": -((w * x.flip(0)).sum() + v.sum()) ** 2}
    pcgrad_backward(losses, [w, v])
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        losses["a"].backward()
    h = torch.tanh(w * x)  # shared activation
    shared = {"a": h.sum() ** 2, "b": -(h * x).sum()}
    pcgrad_backward(shared, [w, v])  # must not free h's graph before task b's backward
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_pcgrad_backward_writes_float32_grads_as_views_of_one_buffer():
    """The documented memory layout: float32 shared parameters get .grad views of one flat buffer
    (no P-sized copy per parameter)."""
    w, v = _two_task_params()
    x = torch.tensor([1.0, 2.0, 3.0])
    losses = {"a": (w * x).sum() + v.sum(), "b": -(w * w).sum() + (v * 3).sum()}
    pcgrad_backward(losses, [w, v])
    assert w.grad.untyped_storage().data_ptr() == v.grad.untyped_storage().data_ptr()


@pytest.mark.parametrize("kw,message", [
    ({"reduction": "max"}, "reduction must be 'mean' or 'sum', got 'max'"),
    ({"task_losses": {}}, "pcgrad_backward needs at least one task loss"),
    ({"shared_params": [torch.nn.Parameter(torch.ones(2), requires_grad=False)]}, "no shared parameter requires grad"),
])
def test_pcgrad_backward_rejects_bad_calls_with_a_reason(kw, message):
    w, _ = _two_task_params()
    args = {"task_losses": {"a": w.sum()}, "shared_params": [w], **kw}
    with pytest.raises(ValueError, match=f"^{message}$"):
        pcgrad_backward(**args)


def _reference(losses_fn, params, reduction="mean", generator_seed=None):
    """Per-task autograd gradients of `params` (zeros where a task does not reach one), projected by
    project_conflicting with the same generator seed, then combined."""
    from mtbert_utils.pcgrad import project_conflicting
    flat = []
    for loss in losses_fn().values():
        gs = torch.autograd.grad(loss, params, allow_unused=True)
        flat.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, params)]))
    gen = torch.Generator().manual_seed(generator_seed) if generator_seed is not None else None
    proj = project_conflicting(flat, shuffle=gen is not None, generator=gen)
    total = torch.stack(proj).sum(0)
    return total / len(flat) if reduction == "mean" else total


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pcgrad_backward_when_a_task_does_not_reach_a_shared_parameter(dtype):
    """A shared parameter one task does not reach gets a zero gradient for that task, on both the
    float32 (views) and the other-dtype (copies) path, wherever it sits in the parameter list."""
    v = torch.nn.Parameter(torch.tensor([0.3, -0.1], dtype=dtype))
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=dtype))
    x = torch.tensor([1.0, 2.0, 3.0], dtype=dtype)
    losses = lambda: {"a": (w * x).sum() ** 2, "b": ((w * x.flip(0)).sum() + v.sum() * 4) ** 2}  # noqa: E731
    want = _reference(losses, [v, w], generator_seed=1)
    out = pcgrad_backward(losses(), [v, w], generator=torch.Generator().manual_seed(1))
    assert out["conflicts"] == 1  # or the surgery would not show
    got = torch.cat([v.grad.reshape(-1), w.grad.reshape(-1)])
    # float32 buffers inside pcgrad_backward; products of O(10) numbers
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pcgrad_backward_adds_to_partly_accumulated_grads(dtype):
    """Gradient accumulation: a .grad already on some shared parameters (None on others) is kept
    aside and added back after the surgery, not fed into the first task's gradient."""
    v = torch.nn.Parameter(torch.tensor([0.3, -0.1], dtype=dtype))
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=dtype))
    x = torch.tensor([1.0, 2.0, 3.0], dtype=dtype)
    losses = lambda: {"a": (w * x).sum() ** 2 + v.sum(), "b": ((w * x.flip(0)).sum() + v.sum() + 1) ** 2}  # noqa: E731
    want = _reference(losses, [v, w])
    w.grad = torch.full_like(w, 0.25)
    assert pcgrad_backward(losses(), [v, w], shuffle=False)["conflicts"] == 1
    torch.testing.assert_close(v.grad.double(), want[:2].double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), want[2:].double() + 0.25, rtol=1e-5, atol=1e-5)


def test_pcgrad_backward_keeps_activations_shared_by_the_first_and_second_of_three_tasks():
    w, v = _two_task_params()
    x = torch.tensor([1.0, 2.0, 3.0])
    h = torch.tanh(w * x)  # tasks a and b share h; c shares nothing but the parameters
    losses = {"a": h.sum() ** 2, "b": -(h * x).sum(), "c": (v * 2).sum() + w[0]}
    pcgrad_backward(losses, [w, v])
    assert torch.isfinite(w.grad).all() and torch.isfinite(v.grad).all()


def test_pcgrad_backward_keeps_activations_a_loss_given_as_a_function_shares_with_a_later_tensor_loss():
    """A loss given as a function runs its forward late, but may still run through activations that a later
    loss given as a tensor needs: that task's backward keeps them."""
    w, v = _two_task_params()
    x = torch.tensor([1.0, 2.0, 3.0])
    h = torch.tanh(w * x)
    pcgrad_backward({"a": lambda: h.sum() ** 2, "b": -(h * x).sum() + v.sum()}, [w, v])
    assert torch.isfinite(w.grad).all() and torch.isfinite(v.grad).all()


def test_pcgrad_backward_uses_the_value_a_reduce_fn_returns():
    """reduce_fn may return a new tensor instead of working in place (an all-reduce that returns)."""
    w, v = _two_task_params()
    x = torch.tensor([1.0, 2.0, 3.0])
    losses = lambda: {"a": (w * x).sum() + v.sum(), "b": (w * w).sum() - v.sum()}  # noqa: E731
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(sum(losses().values()), [w, v])])
    pcgrad_backward(losses(), [w, v], reduction="sum", project=False, reduce_fn=lambda g: g * 0.5)
    torch.testing.assert_close(torch.cat([w.grad, v.grad]), 0.5 * want, rtol=1e-6, atol=1e-6)


def test_pcgrad_backward_order_comes_from_the_generator_not_the_global_rng():
    """Resumed runs restore the generator's state: the task order must depend on it alone."""
    results = []
    for global_seed in (0, 1, 2, 3):
        torch.manual_seed(global_seed)
        w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        grads = [torch.tensor(g, dtype=torch.float64) for g in
                 ([1.0, 0.1, 0.0], [-0.6, 0.9, 0.2], [-0.5, -0.8, 0.4], [-0.3, -0.2, -1.0])]
        pcgrad_backward({f"t{i}": g @ w for i, g in enumerate(grads)}, [w],
                        generator=torch.Generator().manual_seed(11))
        results.append(w.grad.clone())
    assert all(torch.equal(r, results[0]) for r in results)


def test_pcgrad_backward_with_a_hook_that_replaces_grad():
    """A post-accumulate hook may replace .grad with a new tensor (instead of the buffer view it was
    given): that task's gradient is still copied into its buffer and combined as usual."""
    w, v = _two_task_params()
    x = torch.tensor([1.0, 2.0, 3.0])
    losses = lambda: {"a": (w * x).sum() ** 2 + v.sum(), "b": ((w * x.flip(0)).sum() + v.sum() + 1) ** 2}  # noqa: E731
    want = _reference(losses, [w, v])
    w.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", p.grad.clone()))
    assert pcgrad_backward(losses(), [w, v], shuffle=False)["conflicts"] == 1
    torch.testing.assert_close(torch.cat([w.grad, v.grad]).double(), want.double(), rtol=1e-5, atol=1e-5)


def test_gradient_cosines_are_scale_invariant_down_to_small_gradients():
    """Late in training gradients are small: a cosine must not change when both gradients shrink
    (the eps guard only matters for norms products below 1e-8)."""
    from mtbert_utils.pcgrad import pairwise_cosines
    g = torch.Generator().manual_seed(3)
    a, b, c = (torch.randn(50, generator=g, dtype=torch.float64) for _ in range(3))
    big = pairwise_cosines([a, b, c], ["sst", "para", "sts"])
    for scale in (1e-1, 1e-3):
        small = pairwise_cosines([a * scale, b * scale, c * scale], ["sst", "para", "sts"])
        assert small == pytest.approx(big, rel=1e-9)
    w = torch.nn.Parameter(torch.zeros(50, dtype=torch.float64))
    out = pcgrad_backward({"sst": (a * 1e-3) @ w, "para": (b * 1e-3) @ w}, [w], project=False)
    assert out["cosines"]["sst|para"] == pytest.approx(big["sst|para"], rel=1e-5)  # float32 buffers


def test_register_adds_a_named_schedule_once():
    from mtbert_utils.schedules import Schedule, register

    class Custom(Schedule):
        pass

    try:
        assert register("custom-test")(Custom) is Custom
        assert SCHEDULES["custom-test"] is Custom and Custom.name == "custom-test"
        with pytest.raises(ValueError, match="schedule 'custom-test' registered twice"):
            register("custom-test")(Custom)
    finally:
        SCHEDULES.pop("custom-test", None)


# --------------------------------------------------------------------------- project_conflicting's contract


def test_project_conflicting_half_precision_in_float32_returned_in_the_input_dtype():
    """bf16/fp16 gradients are projected in float32 (a 4096-term bf16 dot is off by ~1e-2) and come
    back in their own dtype."""
    from mtbert_utils.pcgrad import project_conflicting
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4096, generator=g)
    grads = [a.bfloat16(), (-0.5 * a + torch.randn(4096, generator=g)).bfloat16()]
    out = project_conflicting(grads, shuffle=False)
    ref = project_conflicting([x.double() for x in grads], shuffle=False)
    for o, r in zip(out, ref):
        assert o.dtype == torch.bfloat16
        # float32 projection, then one rounding to bf16 (8 bits of mantissa): 2^-8 relative per element
        torch.testing.assert_close(o.double(), r, rtol=2**-8, atol=1e-6)


def test_project_conflicting_with_one_task_returns_a_copy():
    from mtbert_utils.pcgrad import project_conflicting
    g = torch.tensor([1.0, -2.0], dtype=torch.float16)
    (out,) = project_conflicting([g])
    assert torch.equal(out, g) and out.dtype == g.dtype and out.data_ptr() != g.data_ptr()


def test_project_conflicting_rejects_bad_input_with_a_reason():
    from mtbert_utils.pcgrad import project_conflicting
    with pytest.raises(ValueError, match="^project_conflicting needs at least one gradient$"):
        project_conflicting([])
    with pytest.raises(ValueError, match=r"all gradients must have the same shape, got \[\(2,\), \(3,\)\]"):
        project_conflicting([torch.ones(2), torch.ones(3)])


def test_project_conflicting_order_comes_from_the_generator_not_the_global_rng():
    from mtbert_utils.pcgrad import project_conflicting
    grads = [torch.tensor(v, dtype=torch.float64) for v in
             ([1.0, 0.1, 0.0], [-0.6, 0.9, 0.2], [-0.5, -0.8, 0.4], [-0.3, -0.2, -1.0])]
    results = []
    for global_seed in range(4):
        torch.manual_seed(global_seed)
        results.append(project_conflicting(grads, generator=torch.Generator().manual_seed(11)))
    assert all(torch.equal(x, y) for r in results for x, y in zip(r, results[0]))


# --------------------------------------------------------------------------- reading task files


def test_windows_line_endings_and_a_quoted_line_break_are_read_as_written(tmp_path):
    """CRLF files (spreadsheet exports) read like LF files, and a quoted field keeps its own line break."""
    import warnings
    from mtbert_utils.data import read_task_file
    path = tmp_path / "sst.csv"
    path.write_bytes(b'\tid\tsentence\tsentiment\r\n0\ta1\tgood\t3\r\n1\ta2\t"two\r\nlines"\t1\r\n2\ta3\tafter\t0\r\n')
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no row may be skipped
        examples, report = read_task_file(path, "sst")
    assert [(e.id, e.text_a, e.label, e.line) for e in examples] == [
        ("a1", "good", 3, 2), ("a2", "two\r\nlines", 1, 3), ("a3", "after", 0, 5)]
    assert report["kept"] == 3 and report["skipped"] == {}


def test_blank_lines_between_records_are_skipped_not_the_end(tmp_path):
    from mtbert_utils.data import read_task_file
    path = tmp_path / "sst.csv"
    path.write_text("\tid\tsentence\tsentiment\n0\ta1\tgood\t3\n\n\n1\ta2\tfine\t2\n", encoding="utf-8")
    examples, report = read_task_file(path, "sst")
    assert [(e.id, e.line) for e in examples] == [("a1", 2), ("a2", 5)] and report["skipped"] == {}


def test_report_keeps_the_first_five_line_numbers_per_reason(tmp_path):
    from mtbert_utils.data import read_task_file
    rows = [f"{i}\tb{i}\tbad\t9" for i in range(7)]  # lines 2-8, all label_out_of_range
    path = tmp_path / "sst.csv"
    path.write_text("\n".join(["\tid\tsentence\tsentiment", *rows, "7\tok\tgood\t1"]) + "\n", encoding="utf-8")
    with pytest.warns(UserWarning, match="skipped 7 bad rows, kept 1"):
        _, report = read_task_file(path, "sst")
    assert report["skipped"] == {"label_out_of_range": 7}
    assert report["first_lines"] == {"label_out_of_range": [2, 3, 4, 5, 6]}


def test_old_mac_line_endings_read_like_unix_ones(tmp_path):
    from mtbert_utils.data import read_task_file
    path = tmp_path / "sst.csv"
    path.write_bytes(b"\tid\tsentence\tsentiment\r0\ta1\tgood\t3\r1\ta2\tfine\t2\r")
    examples, report = read_task_file(path, "sst")
    assert [(e.id, e.text_a, e.label) for e in examples] == [("a1", "good", 3), ("a2", "fine", 2)]


def test_skipped_rows_warning_and_report_name_the_file_and_the_caller(tmp_path):
    """One warning per file, attributed to the caller's line (stacklevel), listing each reason; the
    report names the file."""
    from mtbert_utils.data import read_task_file
    path = tmp_path / "sst.csv"
    path.write_text("\tid\tsentence\tsentiment\n0\ta1\ttoo\tmany\t1\n1\t\tno id\t1\n2\ta3\tok\t1\n", encoding="utf-8")
    with pytest.warns(UserWarning) as rec:
        _, report = read_task_file(path, "sst")
    assert len(rec) == 1
    if "MUTANT_UNDER_TEST" not in os.environ:  # mutmut's trampoline adds a stack frame of its own
        assert rec[0].filename == __file__
    assert str(rec[0].message) == (f"{path}: skipped 2 bad rows, kept 1: wrong_field_count: 1 (lines [2]); "
                                   "missing_id: 1 (lines [3])")
    assert report["path"] == str(path) and report["kept"] == 1 and report["labeled"] is True


def test_pcgrad_backward_gives_every_shared_parameter_a_grad_of_its_dtype():
    """float64 parameters (the copy path): each gets a .grad of its own dtype; one no task reaches
    gets zeros."""
    v = torch.nn.Parameter(torch.tensor([0.3, -0.1], dtype=torch.float64))
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    u = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))  # in no task's graph
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    pcgrad_backward({"a": (w * x).sum() ** 2 + v.sum(), "b": ((w * x.flip(0)).sum() + 1) ** 2}, [v, w, u])
    assert all(p.grad is not None and p.grad.dtype == torch.float64 for p in (v, w, u))
    assert torch.equal(u.grad, torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pcgrad_backward_adds_back_grads_accumulated_on_every_shared_parameter(dtype):
    """Gradient accumulation when every shared parameter already holds a .grad: the prior gradient is
    added back after the surgery, on the views (float32) and the copy path alike, not dropped and not
    projected as part of the first task's gradient."""
    v = torch.nn.Parameter(torch.tensor([0.3, -0.1], dtype=dtype))
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=dtype))
    x = torch.tensor([1.0, 2.0, 3.0], dtype=dtype)
    losses = lambda: {"a": (w * x).sum() ** 2 + v.sum(), "b": ((w * x.flip(0)).sum() + v.sum() + 1) ** 2}  # noqa: E731
    want = _reference(losses, [v, w])
    prior = torch.tensor([0.5, -1.5, 0.25, 2.0, -0.75], dtype=dtype)
    v.grad, w.grad = prior[:2].clone(), prior[2:].clone()
    assert pcgrad_backward(losses(), [v, w], shuffle=False)["conflicts"] == 1  # the surgery changes g_a
    got = torch.cat([v.grad.reshape(-1), w.grad.reshape(-1)])
    # float32 buffers inside pcgrad_backward; products of O(10) numbers
    torch.testing.assert_close(got.double(), (want + prior).double(), rtol=1e-5, atol=1e-5)


def test_pcgrad_backward_buffers_are_float32_whatever_the_default_dtype():
    """The per-task buffers are float32 as documented, not torch's default dtype: float32 parameters
    work (and get float32 .grad) in a program that set the default dtype to float64."""
    w, v = _two_task_params()
    x = torch.tensor([1.0, 2.0, 3.0])
    losses = lambda: {"a": (w * x).sum() ** 2 + v.sum(), "b": -((w * x.flip(0)).sum() + v.sum()) ** 2}  # noqa: E731
    want = _reference(losses, [w, v])
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        pcgrad_backward(losses(), [w, v], shuffle=False)
    finally:
        torch.set_default_dtype(before)
    assert w.grad.dtype == v.grad.dtype == torch.float32
    torch.testing.assert_close(torch.cat([w.grad, v.grad]), want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- reading task files: errors and shapes


def _task_file(tmp_path, text, name="sst.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8", newline="")
    return path


def test_missing_file_error_names_the_task_and_the_path(tmp_path):
    import re

    from mtbert_utils.data import read_task_file
    path = tmp_path / "nope.csv"
    with pytest.raises(FileNotFoundError, match=f"^para data file not found: {re.escape(str(path))}$"):
        read_task_file(path, "para")


def test_a_header_that_cannot_be_parsed_is_refused_at_line_1(tmp_path):
    from mtbert_utils.data import read_task_file
    path = _task_file(tmp_path, '\tid\t"sentence\tsentiment\n0\ta1\tgood\t3\n')  # the quote never closes
    with pytest.raises(ValueError, match=r"sst\.csv: line 1: the header cannot be parsed$"):
        read_task_file(path, "sst")


@pytest.mark.parametrize("task,text,want", [
    ("sst", "\tid\tsentence\n0\ta1\t good \n", [("a1", "good", None, None, 2)]),
    ("para", "\tid\tsentence1\tsentence2\n0\tp1\t one \t two \n", [("p1", "one", "two", None, 2)]),
])
def test_a_file_without_its_label_column_reads_as_unlabeled(tmp_path, task, text, want):
    """The test splits have no label column: read with label None and report labeled False."""
    from mtbert_utils.data import read_task_file
    examples, report = read_task_file(_task_file(tmp_path, text), task)
    assert [(e.id, e.text_a, e.text_b, e.label, e.line) for e in examples] == want
    assert report["labeled"] is False and report["skipped"] == {}


@pytest.mark.parametrize("task,label_col,label,want", [("para", "is_duplicate", "1.0", 1.0),
                                                       ("sts", "similarity", "3.2", 3.2)])
def test_pair_tasks_keep_both_sentences(tmp_path, task, label_col, label, want):
    """A sentence-pair row becomes text_a and text_b, each stripped, in the header's column order."""
    from mtbert_utils.data import read_task_file
    text = f"\tid\tsentence1\tsentence2\t{label_col}\n0\tq1\t first one \t second one \t{label}\n"
    examples, _ = read_task_file(_task_file(tmp_path, text), task)
    assert [(e.text_a, e.text_b, e.label) for e in examples] == [("first one", "second one", want)]


def test_strict_errors_name_file_line_reason_and_the_evidence(tmp_path):
    """strict=True raises on the first bad row with '<path>: line N: bad row (<reason>)', then the row as
    parsed when there is one, the line's length when it could not be parsed, or the first occurrence of
    a repeated id; nothing else."""
    from mtbert_utils.data import read_task_file
    header = "\tid\tsentence\tsentiment\n"
    cases = {
        "missing_label": (header + "0\ta1\tgood\t\n", "line 2: bad row (missing_label): ['0', 'a1', 'good', '']"),
        "unbalanced": (header + '0\ta1\t"open\t3\n', "line 2: bad row (unbalanced_quote) (13 characters)"),
        "duplicate": (header + "0\ta1\tgood\t3\n1\ta1\tgood\t3\n",
                      "line 3: bad row (duplicate_id) (id 'a1' first on line 2)"),
        "conflict": (header + "0\ta1\tgood\t3\n1\ta1\tbad\t0\n",
                     "line 3: bad row (conflicting_duplicate_id) (id 'a1' first on line 2)"),
    }
    for name, (text, message) in cases.items():
        path = _task_file(tmp_path, text, f"{name}.csv")
        with pytest.raises(ValueError) as e:
            read_task_file(path, "sst", strict=True)
        assert str(e.value) == f"{path}: {message}", name


def test_every_line_with_content_is_a_record(tmp_path):
    """Only an empty line is blank: a line holding any character (a space, a tab, a letter, a quote) is a
    record, kept or skipped with a reason, so rows = kept + skipped counts it and the next row still reads."""
    import string

    from mtbert_utils.data import read_task_file
    for c in sorted(set(string.printable) - set("\r\n")):
        path = _task_file(tmp_path, f"\tid\tsentence\tsentiment\n{c}\n0\ta1\tgood\t3\n")
        examples, report = read_task_file(path, "sst", warn=False)
        assert report["rows"] == 2 and report["kept"] + sum(report["skipped"].values()) == 2, repr(c)
        assert [(e.id, e.line) for e in examples] == [("a1", 3)], repr(c)


@pytest.mark.parametrize("blank", [1, 2, 3])
def test_any_run_of_blank_lines_between_records_is_skipped(tmp_path, blank):
    from mtbert_utils.data import read_task_file
    path = _task_file(tmp_path, "\tid\tsentence\tsentiment\n0\ta1\tgood\t3\n" + "\n" * blank + "1\ta2\tfine\t2\n")
    examples, report = read_task_file(path, "sst")
    assert [(e.id, e.line) for e in examples] == [("a1", 2), ("a2", 3 + blank)]
    assert report["rows"] == 2 and report["skipped"] == {}


def test_report_lists_the_first_five_repeated_ids(tmp_path):
    """duplicates: {id: its line numbers} for the first five ids that repeat, in file order."""
    from mtbert_utils.data import read_task_file
    rows = [f"{i}\td{i}\tsame\t1" for i in range(7)] * 2  # seven ids, each repeated exactly once
    path = _task_file(tmp_path, "\tid\tsentence\tsentiment\n" + "\n".join(rows) + "\n")
    examples, report = read_task_file(path, "sst", warn=False)
    assert len(examples) == 7 and report["skipped"] == {"duplicate_id": 7}
    assert report["duplicates"] == {f"d{i}": [2 + i, 9 + i] for i in range(5)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pcgrad_on_cuda_keeps_buffers_and_task_orders_on_the_parameters_device():
    """On a GPU the per-task buffers live on the parameters' device and a CUDA generator draws the task
    orders there: pcgrad_backward and project_conflicting work with CUDA tensors and a CUDA generator,
    and give the surgery's result (two tasks: the visiting order cannot change it)."""
    from mtbert_utils.pcgrad import project_conflicting
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], device="cuda"))
    v = torch.nn.Parameter(torch.tensor([0.3, 0.1], device="cuda"))
    x = torch.tensor([1.0, 2.0, 3.0], device="cuda")
    losses = lambda: {"a": (w * x).sum() ** 2 + v.sum(), "b": -((w * x.flip(0)).sum() + v.sum()) ** 2}  # noqa: E731
    want = _reference(losses, [w, v])
    gen = torch.Generator(device="cuda").manual_seed(0)
    assert pcgrad_backward(losses(), [w, v], generator=gen)["conflicts"] == 1
    assert w.grad.device.type == v.grad.device.type == "cuda"
    torch.testing.assert_close(torch.cat([w.grad, v.grad]), want, rtol=1e-5, atol=1e-5)
    g = [torch.tensor([1.0, 0.0], device="cuda"), torch.tensor([-1.0, 1.0], device="cuda")]
    out = project_conflicting(g, generator=gen)
    torch.testing.assert_close(out[0].cpu(), torch.tensor([0.5, 0.5]))  # g_a - (g_a.g_b / |g_b|^2) g_b


# --------------------------------------------------------------------------- optimisation (optim.py)

def tiny_model_and_config(**kw):
    from mtbert_utils.config import TrainConfig
    from mtbert_utils.training import build_model
    config = TrainConfig(encoder="tiny", progress=False, **kw)
    return build_model(config), config


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_adamw_gets_the_configs_weight_decay(weight_decay):
    """The config's weight decay reaches AdamW, 0 included: torch's AdamW would otherwise decay every weight
    by its own default (0.01), which the study's setup does not."""
    from mtbert_utils.optim import build_optimizer
    model, config = tiny_model_and_config(weight_decay=weight_decay)
    opt = build_optimizer(model, config, torch.device("cpu"))
    assert opt.defaults["weight_decay"] == weight_decay
    assert all(g["weight_decay"] == weight_decay for g in opt.param_groups)


def test_layer_lr_decay_refuses_an_encoder_without_numbered_layers():
    from mtbert_utils.optim import encoder_depths
    with pytest.raises(ValueError, match=r"^layer_lr_decay needs an encoder with numbered layers \(\.layer\.<i>\.\)$"):
        encoder_depths(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_optimizer_is_fused_adamw_on_cuda():
    """optimizer="auto" is fused AdamW on CUDA (one kernel over every tensor), foreach on CPU."""
    from mtbert_utils.optim import build_optimizer
    model, config = tiny_model_and_config()
    opt = build_optimizer(model.cuda(), config, torch.device("cuda"))
    assert opt.defaults["fused"] is True and not opt.defaults["foreach"]


# --------------------------------------------------------------------------- metrics and ensembles (evaluation.py)

def test_summary_metrics_by_hand():
    """The study's mean of the three task metrics and the CS224N overall score, (sst + para + (r + 1) / 2) / 3,
    once all three are there; neither before."""
    from mtbert_utils.evaluation import add_summary_metrics
    m = add_summary_metrics({"sst": 0.5, "para": 0.8, "sts": 0.6})
    assert m["mean"] == pytest.approx((0.5 + 0.8 + 0.6) / 3, rel=float64_tol(3))
    assert m["overall"] == pytest.approx((0.5 + 0.8 + 0.8) / 3, rel=float64_tol(4))
    assert add_summary_metrics({"sst": 0.5, "para": 0.8}) == {"sst": 0.5, "para": 0.8}


# a confident wrong member (c3) against two right ones: averaging probabilities keeps both examples right,
# averaging logits would get the first wrong ((2 + 2 - 9) / 3 < 0)
PARA = {1: np.array([2.0, -2.0]), 2: np.array([2.0, -2.0]), 3: np.array([-9.0, 1.0])}
PARA_GOLD = np.array([1, 0])


def mean_prob_logit(logits):
    p = np.mean([1 / (1 + np.exp(-x)) for x in logits], axis=0)
    return np.log(p / (1 - p))


def test_an_ensemble_averages_each_tasks_probabilities_not_its_logits():
    from mtbert_utils.evaluation import ensemble_prediction, select_members
    members = [{"ids": ["a", "b"], "raw": PARA[k], "pred": None} for k in (1, 2, 3)]
    out = ensemble_prediction("para", members)
    # in float32: a cast, a sigmoid, a mean of 3 and a logit (slope 1 / (p (1 - p)), p >= 0.32 here)
    assert out["raw"] == pytest.approx(mean_prob_logit(list(PARA.values())), abs=float32_tol(7) / (0.32 * 0.68))
    assert list(out["pred"]) == [1, 0]
    assert select_members("para", PARA, PARA_GOLD)["val_by_k"] == [1.0, 1.0, 1.0]
    sst = [np.log([[0.9, 0.05, 0.02, 0.02, 0.01]]), np.log([[0.3, 0.4, 0.1, 0.1, 0.1]])]
    got = ensemble_prediction("sst", [{"ids": ["s"], "raw": r, "pred": None} for r in sst])
    # the mean probabilities (a logit mean would give their geometric mean: 0.52, 0.14, ...); in float32: a softmax
    # over 5 classes, a mean of 2, a log and an exp
    assert np.exp(got["raw"]) == pytest.approx(np.array([[0.6, 0.225, 0.06, 0.06, 0.055]]), rel=float32_tol(5 + 2 + 2))
    assert list(got["pred"]) == [0]


def test_an_sts_ensemble_predicts_the_cosine_heads_scores_by_default():
    """ensemble_prediction's default head is the cosine one: 5 x the mean cosine, as predict gives it."""
    from mtbert_utils.evaluation import ensemble_prediction
    members = [{"ids": ["x", "y"], "raw": np.array(r), "pred": None} for r in ([0.2, 0.4], [0.6, 0.0])]
    out = ensemble_prediction("sts", members)
    assert out["pred"] == pytest.approx([2.0, 1.0], rel=float32_tol(3))
    assert ensemble_prediction("sts", members, "linear")["pred"] == pytest.approx([0.4, 0.2], rel=float32_tol(3))


def test_a_confident_para_ensemble_keeps_a_finite_logit():
    """Probabilities are clamped to [1e-7, 1 - 1e-7] before the logit: members sure enough that float32's sigmoid
    gives exactly 1 or 0 still give a finite logit of the right sign, not an infinity."""
    from mtbert_utils.evaluation import combine_outputs
    out = combine_outputs("para", [np.array([200.0, -200.0]), np.array([100.0, -120.0])])
    assert np.isfinite(out).all() and out[0] > 15 and out[1] < -15


def test_an_empty_ensemble_is_refused_with_its_message():
    from mtbert_utils.evaluation import combine_outputs
    with pytest.raises(ValueError, match="^an ensemble needs at least one member$"):
        combine_outputs("para", [])
