"""PCGrad's random task order, as a property of its distribution: every order occurs, each gives the
formula's result for that order. The existing test only checks that a result is *some* order's."""

import itertools
import math

import torch

from mtbert_utils.pcgrad import pcgrad_backward, project_conflicting

# Four float64 task gradients, every pair in conflict, chosen so that every visiting order of the
# other three gives task i a different projected gradient (checked below, or the test proves nothing).
GRADS = [torch.tensor(v, dtype=torch.float64) for v in
         ([1.0, 0.1, 0.0], [-0.6, 0.9, 0.2], [-0.5, -0.8, 0.4], [-0.3, -0.2, -1.0])]
T = len(GRADS)
SEEDS = range(240)
# float64, a few dozen multiply-adds per result: 1e-12 relative is far from any order's neighbour
ATOL = 1e-12


def by_formula(i: int, order) -> torch.Tensor:
    """Algorithm 1 for task i visiting `order`: g_i <- g_i - (g_i . g_j / |g_j|^2) g_j when g_i . g_j < 0."""
    g = GRADS[i].clone()
    for j in order:
        dot = g @ GRADS[j]
        if dot < 0:
            g = g - dot / (GRADS[j] @ GRADS[j]) * GRADS[j]
    return g


def orders_of(i):
    return list(itertools.permutations([j for j in range(T) if j != i]))


def which_order(i, result):
    hits = [o for o in orders_of(i) if torch.allclose(result, by_formula(i, o), rtol=0, atol=ATOL)]
    assert len(hits) == 1, (i, result, hits)
    return hits[0]


def test_the_vectors_tell_every_order_apart():
    assert all(float(GRADS[i] @ GRADS[j]) < 0 for i, j in itertools.combinations(range(T), 2))
    for i in range(T):
        results = [by_formula(i, o) for o in orders_of(i)]
        gaps = [float((a - b).abs().max()) for a, b in itertools.combinations(results, 2)]
        assert min(gaps) > 1e6 * ATOL, (i, min(gaps))


def test_every_visiting_order_occurs_for_every_task():
    """Invariant: over generators, each task visits the others in every one of the (T-1)! orders,
    about equally often, and in an order drawn independently of the other tasks'.

    Kills: the task order never shuffled (or shuffled once and reused), and one order shared by all tasks.
    """
    seen = [dict.fromkeys(orders_of(i), 0) for i in range(T)]
    joint = set()
    for seed in SEEDS:
        out = project_conflicting(GRADS, generator=torch.Generator().manual_seed(seed))
        picked = [which_order(i, out[i]) for i in range(T)]
        for i, o in enumerate(picked):
            seen[i][o] += 1
        joint.add((picked[0], picked[1]))
    n, k = len(SEEDS), math.factorial(T - 1)
    for i in range(T):
        # each order: Binomial(240, 1/6), mean 40, sd 5.8; below 15 is > 4 sd out (deterministic seeds anyway)
        assert min(seen[i].values()) >= 15, (i, seen[i])
    assert len(joint) == k * k  # tasks 0 and 1 draw their orders independently: all 36 pairs occur
    assert n == sum(seen[0].values())


def test_fixed_order_only_without_shuffle():
    out = project_conflicting(GRADS, shuffle=False)
    for i in range(T):
        assert which_order(i, out[i]) == tuple(j for j in range(T) if j != i)


def test_pcgrad_backward_shuffles_too():
    """pcgrad_backward on losses whose shared gradients are GRADS: the combined gradient is the mean of
    the formula's per-task results for *some* orders, and over seeds more than one choice of orders occurs."""
    per_task = [{o: by_formula(i, o) for o in orders_of(i)} for i in range(T)]
    # pcgrad_backward keeps task gradients in float32 buffers: float32 rounding of O(1) inputs, a few
    # dozen operations
    tol = 64 * torch.finfo(torch.float32).eps
    chosen = set()
    for seed in range(12):
        w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        losses = {f"t{i}": GRADS[i] @ w for i in range(T)}  # d loss_i / d w = GRADS[i]
        out = pcgrad_backward(losses, [w], generator=torch.Generator().manual_seed(seed))
        assert out["projected"] and out["conflicts"] == T * (T - 1) // 2
        matches = [combo for combo in itertools.product(*(orders_of(i) for i in range(T)))
                   if torch.allclose(w.grad, sum(per_task[i][o] for i, o in enumerate(combo)) / T,
                                     rtol=0, atol=tol)]
        assert matches, (seed, w.grad)
        chosen.add(tuple(matches))
    assert len(chosen) > 1
