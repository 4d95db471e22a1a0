"""PCGrad against vectors projected by hand and against per-task autograd."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import float32_tol, float_tol
from mtbert_utils.pcgrad import pairwise_cosines, pcgrad_backward, project_conflicting

T_ = torch.tensor


def close(a, b, reductions, dtype=None):
    """a == b up to `reductions` sequential roundings in `dtype` (default a's), relative to b's largest entry."""
    tol = float_tol(dtype or a.dtype, reductions) * float(b.abs().max())
    torch.testing.assert_close(a, b, rtol=0, atol=tol)


# sequential roundings (conftest.float_tol) along the longest chain of each kind of test:
BY_HAND = 2 * (2 * 3 + 1)   # <= 2 projections of 3-vectors: a dot and a squared norm of 3 terms, and an update
RANDOM_6 = 3 * (2 * 6 + 1)  # 3 projections of 6-vectors
# TinyMultitask runs in float64, so the autograd reference is exact next to pcgrad_backward, which
# keeps task gradients in float32 buffers: its Gram dot products sum the 94 shared weights' float32
# terms (a dot and a squared norm per projection coefficient), then 3 tasks are added in float32
TINY = 2 * 94 + 3 + 1


def test_two_conflicting_vectors_by_hand():
    g1, g2 = T_([1.0, 0.0]), T_([-1.0, 1.0])
    p1, p2 = project_conflicting([g1, g2], shuffle=False)
    close(p1, T_([0.5, 0.5]), BY_HAND)  # g1 - (-1 / 2) g2
    close(p2, T_([0.0, 1.0]), BY_HAND)  # g2 - (-1 / 1) g1
    assert abs(float(p1 @ g2)) <= float32_tol(BY_HAND) and abs(float(p2 @ g1)) <= float32_tol(BY_HAND)  # orthogonal


def test_non_conflicting_unchanged():
    grads = [T_([1.0, 2.0, 0.0]), T_([0.5, 0.0, 3.0]), T_([0.0, 1.0, 1.0])]
    for p, g in zip(project_conflicting(grads), grads):
        assert torch.equal(p, g)


def test_three_tasks_project_against_original_gradients():
    g0, g1, g2 = T_([1.0, 0.0, 0.0]), T_([-1.0, 1.0, 0.0]), T_([0.0, -1.0, 1.0])
    p0, p1, p2 = project_conflicting([g0, g1, g2], shuffle=False)
    # task 0: vs g1: dot -1, |g1|^2 = 2 -> (1/2, 1/2, 0); vs g2: dot now -1/2 (was 0), |g2|^2 = 2
    #         -> (1/2, 1/2, 0) + 1/4 (0, -1, 1)
    close(p0, T_([0.5, 0.25, 0.25]), BY_HAND)
    # task 1: vs g0: dot -1 -> (0, 1, 0); vs g2: dot -1 -> (0, 1, 0) + 1/2 (0, -1, 1)
    close(p1, T_([0.0, 0.5, 0.5]), BY_HAND)
    # task 2: vs g0: dot 0, no change; vs ORIGINAL g1: dot -1 -> (0, -1, 1) + 1/2 (-1, 1, 0).
    # Against the projected g1' = (0, 1/2, 1/2) the dot would be 0 and g2 would stay (0, -1, 1).
    close(p2, T_([-0.5, -0.5, 1.0]), BY_HAND)


def test_zero_norm_gradient_guard():
    zero, g = T_([0.0, 0.0]), T_([1.0, -2.0])
    p0, p1 = project_conflicting([zero, g], shuffle=False)
    assert torch.equal(p0, zero) and torch.equal(p1, g)
    assert all(torch.isfinite(p).all() for p in (p0, p1))


def test_inputs_not_modified_and_shape_dtype_kept():
    grads = [torch.randn(3, 4, dtype=torch.float64) for _ in range(3)]
    grads[1] = -grads[0] + 0.1 * grads[1]  # make sure something gets projected
    copies = [g.clone() for g in grads]
    out = project_conflicting(grads)
    for g, c, o in zip(grads, copies, out):
        assert torch.equal(g, c)
        assert o.shape == g.shape and o.dtype == g.dtype
    assert not torch.equal(out[0], grads[0])


def _naive_pcgrad(grads, orders):
    """Direct transcription of Algorithm 1 (Tseng-style loop) for given visiting orders."""
    out = []
    for i, order in enumerate(orders):
        g = grads[i].clone()
        for j in order:
            dot = g @ grads[j]
            if dot < 0:
                g = g - dot / (grads[j] @ grads[j]) * grads[j]
        out.append(g)
    return out


def test_fixed_order_matches_direct_loop_random_vectors():
    torch.manual_seed(0)
    for _ in range(20):
        grads = [torch.randn(6, dtype=torch.float64) for _ in range(4)]
        orders = [[j for j in range(4) if j != i] for i in range(4)]
        for p, e in zip(project_conflicting(grads, shuffle=False), _naive_pcgrad(grads, orders)):
            close(p, e, RANDOM_6)


def test_shuffle_is_some_order_and_reproducible():
    torch.manual_seed(1)
    grads = [torch.randn(5, dtype=torch.float64) for _ in range(4)]
    a = project_conflicting(grads, generator=torch.Generator().manual_seed(7))
    b = project_conflicting(grads, generator=torch.Generator().manual_seed(7))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    # each task's result is the direct loop over *some* permutation of the other tasks
    for i, p in enumerate(a):
        others = [j for j in range(4) if j != i]
        candidates = [_naive_pcgrad(grads, [list(o) if k == i else [] for k in range(4)])[i]
                      for o in itertools.permutations(others)]
        tol = float_tol(torch.float64, RANDOM_6)
        assert any(((p - c).abs().max() <= tol * c.abs().max()) for c in candidates)


def test_pairwise_cosines_match_torch():
    torch.manual_seed(2)
    grads = [torch.randn(10) for _ in range(3)]
    cos = pairwise_cosines(grads, ["sst", "para", "sts"])
    assert list(cos) == ["sst|para", "sst|sts", "para|sts"]
    for key, (i, j) in zip(cos, [(0, 1), (0, 2), (1, 2)]):
        # a dot and two norms of 10 float32 terms, a product and a division
        assert cos[key] == pytest.approx(float(F.cosine_similarity(grads[i], grads[j], dim=0)), abs=float32_tol(3 * 10 + 2))


# ----------------------------------------------------------------------------- pcgrad_backward

NAMES = ["sst", "para", "sts"]


class TinyMultitask(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)  # float64: the tests check the algorithm, not float32 rounding
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6))
        self.heads = nn.ModuleDict({n: nn.Linear(6, 1) for n in NAMES})
        self.double()

    def losses(self):
        torch.manual_seed(1)
        x = torch.randn(5, 4, dtype=torch.float64)
        h = self.trunk(x)
        y = torch.randn(5, 1, dtype=torch.float64)
        # scaled so that the tasks conflict: para pushes against sst
        return {
            "sst": F.mse_loss(self.heads["sst"](h), y),
            "para": -0.7 * F.mse_loss(self.heads["sst"](h).detach() + self.heads["para"](h), y),
            "sts": F.mse_loss(self.heads["sts"](h), -y),
        }


def _per_task_grads(model):
    """Reference: each task's gradient of the shared trunk (flat) and of its head, from autograd."""
    shared = list(model.trunk.parameters())
    flat, heads = [], {}
    for n, loss in model.losses().items():
        gs = torch.autograd.grad(loss, shared, retain_graph=True)
        flat.append(torch.cat([g.reshape(-1) for g in gs]))
        heads[n] = torch.autograd.grad(loss, list(model.heads[n].parameters()), retain_graph=True)
    return flat, heads


def _shared_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.trunk.parameters()])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_pcgrad_backward_matches_projection_of_autograd_grads(reduction):
    model = TinyMultitask()
    flat, heads = _per_task_grads(model)
    projected = project_conflicting(flat, generator=torch.Generator().manual_seed(3))
    expected = torch.stack(projected).sum(0) / (len(NAMES) if reduction == "mean" else 1)

    model.zero_grad(set_to_none=True)
    out = pcgrad_backward(model.losses(), list(model.trunk.parameters()), reduction=reduction,
                          generator=torch.Generator().manual_seed(3))
    assert out["projected"] is True
    assert out["conflicts"] >= 1  # otherwise this test proves nothing
    close(_shared_grad(model), expected, TINY, torch.float32)
    for n in NAMES:  # heads: their own task's gradient, untouched by the surgery
        for p, g in zip(model.heads[n].parameters(), heads[n]):
            close(p.grad, g, TINY, torch.float32)


def test_losses_given_as_functions_run_each_forward_just_before_its_backward():
    """A task's loss may be a function that runs its forward: pcgrad_backward calls it once the earlier tasks'
    backwards are done (their graphs freed: one task's activations alive at a time), and the gradients, cosines
    and conflicts are those of the losses computed up front."""
    model = TinyMultitask()
    trunk = list(model.trunk.parameters())
    ref = pcgrad_backward(model.losses(), trunk, generator=torch.Generator().manual_seed(3))
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    events = []

    def forward(n):
        events.append(("forward", n))
        loss = model.losses()[n]  # this task's graph only: the others' are dropped at once
        loss.register_hook(lambda g: events.append(("backward", n)))
        return loss

    out = pcgrad_backward({n: (lambda n=n: forward(n)) for n in NAMES}, trunk, generator=torch.Generator().manual_seed(3))
    assert events == [(e, n) for n in NAMES for e in ("forward", "backward")]
    assert out["conflicts"] == ref["conflicts"] >= 1
    assert out["cosines"] == pytest.approx(ref["cosines"], abs=float32_tol(TINY))
    for k, p in model.named_parameters():
        close(p.grad, ref_grads[k], TINY, torch.float32)


def test_project_false_sum_equals_plain_backward():
    model = TinyMultitask()
    sum(model.losses().values()).backward()
    plain = {k: p.grad.clone() for k, p in model.named_parameters()}

    model.zero_grad(set_to_none=True)
    out = pcgrad_backward(model.losses(), list(model.trunk.parameters()), reduction="sum", project=False)
    assert out["projected"] is False
    for k, p in model.named_parameters():
        close(p.grad, plain[k], TINY, torch.float32)


def test_cosines_and_conflicts_from_backward():
    model = TinyMultitask()
    flat, _ = _per_task_grads(model)
    model.zero_grad(set_to_none=True)
    out = pcgrad_backward(model.losses(), list(model.trunk.parameters()))
    pairs = [(0, 1), (0, 2), (1, 2)]
    assert list(out["cosines"]) == ["sst|para", "sst|sts", "para|sts"]
    for key, (i, j) in zip(out["cosines"], pairs):
        assert out["cosines"][key] == pytest.approx(float(F.cosine_similarity(flat[i], flat[j], dim=0)), abs=float32_tol(TINY))
    assert out["conflicts"] == sum(float(flat[i] @ flat[j]) < 0 for i, j in pairs)


def test_reduce_fn_called_once_per_task_and_applied():
    model = TinyMultitask()
    flat, _ = _per_task_grads(model)
    calls = []

    def halve(g):  # stands in for an all-reduce-mean; in place
        calls.append(g.shape)
        g.mul_(0.5)

    model.zero_grad(set_to_none=True)
    pcgrad_backward(model.losses(), list(model.trunk.parameters()), reduction="sum", project=False, reduce_fn=halve)
    assert len(calls) == len(NAMES) and all(s == flat[0].shape for s in calls)
    close(_shared_grad(model), 0.5 * torch.stack(flat).sum(0), TINY, torch.float32)


def test_existing_grads_accumulate():
    model = TinyMultitask()
    for p in model.trunk.parameters():
        p.grad = torch.ones_like(p)
    flat, _ = _per_task_grads(model)
    pcgrad_backward(model.losses(), list(model.trunk.parameters()), reduction="sum", project=False)
    close(_shared_grad(model), 1 + torch.stack(flat).sum(0), TINY, torch.float32)


def test_grad_scaler_scale_invariant():
    model = TinyMultitask()
    pcgrad_backward(model.losses(), list(model.trunk.parameters()), shuffle=False)
    ref = _shared_grad(model).clone()
    model.zero_grad(set_to_none=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    pcgrad_backward(model.losses(), list(model.trunk.parameters()), shuffle=False, scaler=scaler)
    close(_shared_grad(model) / 1024.0, ref, TINY, torch.float32)


@pytest.mark.parametrize("method", ["sum", "pcgrad"])
def test_grad_methods_by_hand(method):
    """The gradient-combination registry on two conflicting linear losses: `sum` gives g1 + g2, `pcgrad`
    (reduction sum) the projections worked out in test_two_conflicting_vectors_by_hand, added."""
    from types import SimpleNamespace

    from mtbert_utils.gradients import GRAD_METHODS
    w = nn.Parameter(torch.zeros(2))
    losses = {"a": w @ T_([1.0, 0.0]), "b": w @ T_([-1.0, 1.0])}  # gradients g1 = [1, 0], g2 = [-1, 1]
    config = SimpleNamespace(record_grad_cosines=False, pcgrad_reduction="sum")
    GRAD_METHODS[method](losses, [w], config=config, generator=torch.Generator().manual_seed(0))
    want = T_([0.0, 1.0]) if method == "sum" else T_([0.5, 0.5]) + T_([0.0, 1.0])
    close(w.grad, want, BY_HAND)


def test_cosine_summary_leaves_out_and_counts_non_finite_steps():
    """fp16: a step the GradScaler skips has inf gradients and a NaN cosine; the epoch's summary keeps the other
    steps' mean and says how many it left out (a clean epoch's summary has no such key)."""
    from mtbert_utils.gradients import summarize_cosines
    out = summarize_cosines([{"sst|para": 0.5}, {"sst|para": float("nan")}, {"sst|para": -0.1},
                             {"sst|para": float("inf")}])
    assert out["sst|para"]["values"] == [0.5, -0.1] and out["sst|para"]["non_finite_steps"] == 2
    assert abs(out["sst|para"]["mean"] - 0.2) < 1e-12 and out["sst|para"]["conflict_rate"] == 0.5
    assert "non_finite_steps" not in summarize_cosines([{"sst|para": 0.25}])["sst|para"]
    assert summarize_cosines([{"sst|para": float("nan")}])["sst|para"]["mean"] is None
