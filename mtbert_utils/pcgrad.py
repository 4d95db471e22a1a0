"""PCGrad: gradient surgery for multi-task learning (Yu et al. 2020).

    project_conflicting(grads)      the surgery on a list of per-task gradients
    pcgrad_backward(losses, params) per-task backward + surgery on the shared params (a loss may be a
                                    function that runs its task's forward: one task's activations at a time)
    pairwise_cosines(grads, names)  diagnostics: cosine between every task pair

All three work from the T x T Gram matrix of the task gradients (one matmul):
the projections only change each g_i by a combination of the original g_j, so
every dot product the algorithm needs follows from the Gram matrix and the
final gradients cost one more matmul.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def _orders(T: int, shuffle: bool, generator: torch.Generator | None) -> list[list[int]]:
    """For each task i, the order in which it visits the other tasks j != i."""
    if not shuffle:
        return [[j for j in range(T) if j != i] for i in range(T)]
    device = generator.device if generator is not None else "cpu"
    # One permutation of all tasks per i, skipping i (as Tseng's random.shuffle of the whole list); drawn one by
    # one as before, read back to the host together (on CUDA each read waits for the GPU)
    perms = torch.stack([torch.randperm(T, generator=generator, device=device) for _ in range(T)]).tolist()
    return [[j for j in perm if j != i] for i, perm in enumerate(perms)]


def _projection_coefficients(gram: Tensor, orders: list[list[int]]) -> Tensor:
    """C such that the projected g_i' = g_i - sum_k C[i, k] g_k.

    While g_i' = g_i - sum_k c_k g_k, its dot with g_j is G[i, j] - sum_k c_k G[k, j],
    so no P-sized work is needed here.
    """
    G = gram.double().tolist()  # T is tiny: plain floats, float64 for the bookkeeping
    T = len(G)
    C = [[0.0] * T for _ in range(T)]
    for i in range(T):
        c = C[i]
        for j in orders[i]:
            dot = G[i][j] - sum(c[k] * G[k][j] for k in range(T))  # g_i' . g_j
            if dot < 0 and G[j][j] > 0:  # conflict; a zero g_j cannot be projected on
                c[j] += dot / G[j][j]  # g_i' <- g_i' - (g_i'.g_j / ||g_j||^2) g_j, original g_j
    return torch.tensor(C, dtype=torch.float64)


def project_conflicting(
    grads: list[Tensor], shuffle: bool = True, generator: torch.Generator | None = None
) -> list[Tensor]:
    """Project each task gradient off the others it conflicts with (Yu et al. 2020,
    "Gradient Surgery for Multi-Task Learning", Algorithm 1).

    For each task i, over the other tasks j in random order (j = 0..T-1 when
    shuffle=False; `generator` seeds the permutations): if g_i . g_j < 0 then
    g_i <- g_i - (g_i . g_j / ||g_j||^2) g_j, always against the ORIGINAL g_j,
    with the dot recomputed from the already projected g_i.

    Note: the study's write-up divides by ||g_i||^2; the paper and the public
    implementation the study used (Tseng's Pytorch-PCGrad) divide by ||g_j||^2,
    which is what makes g_i' orthogonal to g_j. We use ||g_j||^2.

    grads: one tensor per task, all the same shape. They are not modified;
    new tensors of the same shape and dtype are returned (computed in at
    least float32).
    """
    if not grads:
        raise ValueError("project_conflicting needs at least one gradient")
    shape = grads[0].shape
    if any(g.shape != shape for g in grads):
        raise ValueError(f"all gradients must have the same shape, got {[tuple(g.shape) for g in grads]}")
    dtype = torch.promote_types(grads[0].dtype, torch.float32)  # fp16/bf16 dots would overflow/round badly
    flat = torch.stack([g.reshape(-1).to(dtype) for g in grads])  # a copy: inputs stay untouched
    C = _projection_coefficients(flat @ flat.T, _orders(len(grads), shuffle, generator))
    out = []
    for i, g in enumerate(grads):
        if C[i].any():
            out.append((flat[i] - C[i].to(flat.device, dtype) @ flat).reshape(shape).to(g.dtype))  # C is on the CPU
        else:
            out.append(g.clone())  # no conflict: returned unchanged
    return out


def _cosines_from_gram(gram: Tensor, names: list[str], eps: float = 1e-8) -> dict[str, float]:
    G = gram.double()
    norms = G.diagonal().clamp_min(0).sqrt()
    out = {}
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            # same convention as F.cosine_similarity: divide by max(|a||b|, eps)
            out[f"{names[i]}|{names[j]}"] = float(G[i, j] / torch.clamp_min(norms[i] * norms[j], eps))
    return out


def pairwise_cosines(grads: list[Tensor], names: list[str]) -> dict[str, float]:
    """Cosine similarity of every pair of task gradients, keyed "a|b" in `names` order."""
    if len(grads) != len(names):
        raise ValueError(f"{len(grads)} gradients but {len(names)} names")
    flat = torch.stack([g.reshape(-1).to(torch.promote_types(g.dtype, torch.float32)) for g in grads])
    return _cosines_from_gram(flat @ flat.T, list(names))


def _graph_nodes(loss: Tensor) -> set:
    """The autograd nodes behind `loss`, without the parameters' AccumulateGrad leaves
    (every task reaches those; sharing them needs no retained activations)."""
    seen, stack = set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen or type(fn).__name__ == "AccumulateGrad":
            continue
        seen.add(fn)  # the node objects stay alive in the set, so identity is reliable
        stack.extend(f for f, _ in fn.next_functions)
    return seen


def _task_gradients(losses: list[Tensor | Callable[[], Tensor]], shared: list[torch.nn.Parameter], as_views: bool,
                    scaler, reduce_fn) -> list[Tensor]:
    """Backward each loss in turn; return flat[t], task t's shared gradient (float32, P-sized), allocated
    when its backward starts. as_views: the parameters' .grad are views of flat[t] while task t runs.
    A loss given as a function is called just before its backward: its graph does not exist before then."""
    sizes = [p.numel() for p in shared]
    P, device = sum(sizes), shared[0].device
    nodes = [set() if callable(loss) else _graph_nodes(loss) for loss in losses]
    later = [set().union(*nodes[t + 1:]) for t in range(len(losses))]
    flat: list[Tensor] = []
    for t, loss in enumerate(losses):
        if callable(loss):  # the task's forward, now that the earlier tasks' graphs are freed
            loss = loss()
            if later[t]:  # a later loss given as a tensor may share activations with it (all functions: none may)
                nodes[t] = _graph_nodes(loss)
        flat.append(torch.zeros(P, dtype=torch.float32, device=device))
        rows = [row.view_as(p) for p, row in zip(shared, flat[t].split(sizes))]
        if as_views:
            for p, row in zip(shared, rows):
                p.grad = row
        if scaler is not None:
            loss = scaler.scale(loss)
        # keep a task's graph only if a later task's graph runs through it (shared activations);
        # otherwise free it now, as a plain backward would
        loss.backward(retain_graph=bool(nodes[t] & later[t]))
        for p, row in zip(shared, rows):
            if p.grad is None or p.grad is row:  # None: this task does not reach p -> zeros
                continue
            row.copy_(p.grad)  # a .grad that autograd (or a hook) replaced instead of accumulating into
            if as_views:
                p.grad = None
            else:
                p.grad.zero_()
        if reduce_fn is not None:
            row = flat[t]
            reduced = reduce_fn(row)
            if reduced is not None and reduced is not row:
                row.copy_(reduced)
    return flat


def pcgrad_backward(
    task_losses: dict[str, Tensor | Callable[[], Tensor]],
    shared_params: list[torch.nn.Parameter],
    *,
    reduction: str = "mean",
    shuffle: bool = True,
    generator: torch.Generator | None = None,
    scaler: torch.amp.GradScaler | None = None,
    reduce_fn: Callable[[Tensor], Tensor | None] | None = None,
    project: bool = True,
) -> dict:
    """Backward each task's (already weighted) loss and write the PCGrad-combined
    gradient of the shared parameters into their .grad.

    A loss may also be given as a function of no arguments that runs the task's
    forward and returns its loss. It is called just before that task's backward,
    so that only one task's activations are alive at a time (the earlier tasks'
    graphs are freed by then) instead of every task's: the step's peak memory is
    its largest task's (plus the earlier tasks' gradient buffers), not the sum.
    The gradients are the same as with the losses computed up front: the
    forwards run in the same order, so dropout draws the same masks.

    Head parameters (anything not in `shared_params`) accumulate their task's
    gradient normally and are not projected. The shared gradients of each task
    are kept in one float32 P-sized buffer per task, so the extra memory is at most
    one flat copy of the shared gradients per task. A task's buffer is allocated
    when its own backward starts, so at the first backward (with the losses
    computed up front, the step's peak: every task's activations alive) only one
    exists. For float32 parameters, backward writes into the buffer directly and
    the final .grad are views of the first buffer.

    reduction: "mean" over tasks (Tseng's Pytorch-PCGrad, used by the study) or
        "sum" (the paper).
    reduce_fn: called once per task on its flat shared gradient (may modify it
        in place or return a new tensor); the distributed trainer passes an
        all-reduce-mean so that the surgery sees the global gradient.
    project: False skips the surgery (plain sum/mean of the task gradients;
        with reduction="sum" identical to backward of the summed loss) but still
        measures the cosines.

    Returns {"cosines": pairwise cosines before projection, "conflicts": number
    of task pairs with a negative dot, "projected": whether surgery was applied}.

    With a GradScaler every task gradient carries the same scale s, and the
    projection is invariant to it (g_i - (s g_i.s g_j / |s g_j|^2) s g_j = s g_i'),
    so the scaler's later unscale_/inf check work as usual: an inf/NaN in any
    task's gradient reaches the combined gradient and the step is skipped.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not task_losses:
        raise ValueError("pcgrad_backward needs at least one task loss")
    names = list(task_losses)
    shared = list({id(p): p for p in shared_params if p.requires_grad}.values())  # tied weights once
    if not shared:
        raise ValueError("no shared parameter requires grad")
    T, device = len(names), shared[0].device
    # float32 parameters get .grad = a view of their slice of flat[t]: autograd then adds
    # the task's gradient straight into the buffer (no copy, no zeroing, no extra P-sized .grad)
    as_views = all(p.dtype == torch.float32 and p.device == device and p.layout == torch.strided
                   for p in shared)

    prior = _take_prior_grads(shared, as_views)  # gradients already in .grad (accumulation): added back at the end
    flat = _task_gradients([task_losses[n] for n in names], shared, as_views, scaler, reduce_fn)

    pairs = [(i, j) for i in range(T) for j in range(i, T)]
    dots = torch.stack([flat[i] @ flat[j] for i, j in pairs]).tolist()  # one read back to the host, not one per pair
    gram = torch.empty(T, T, dtype=torch.float64)  # T x T dot products; no [T, P] stack
    for (i, j), dot in zip(pairs, dots):
        gram[i, j] = gram[j, i] = dot
    cosines = _cosines_from_gram(gram, names)
    conflicts = int((gram.triu(diagonal=1) < 0).sum())

    # combined = sum_i w_i (g_i - sum_k C[i,k] g_k) = sum_t (w (I - C))_t flat[t], accumulated in flat[0]
    w = torch.full((T,), 1.0 / T if reduction == "mean" else 1.0, dtype=torch.float64)
    if project:
        w = w @ (torch.eye(T, dtype=torch.float64) - _projection_coefficients(gram, _orders(T, shuffle, generator)))
    w = w.tolist()
    combined = flat[0].mul_(w[0])
    for t in range(1, T):
        combined.add_(flat[t], alpha=w[t])
    if prior is not None:
        combined += prior

    _write_grads(shared, combined, as_views)
    return {"cosines": cosines, "conflicts": conflicts, "projected": bool(project)}


def _take_prior_grads(shared: list[torch.nn.Parameter], as_views: bool) -> Tensor | None:
    """Gradients already in .grad (accumulation), flat, kept aside to be added back at the end; .grad cleared."""
    if not any(p.grad is not None for p in shared):
        return None
    prior = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in shared])
    for p in shared:
        if p.grad is not None:
            p.grad = None if as_views else p.grad.zero_()
    return prior


def _write_grads(shared: list[torch.nn.Parameter], combined: Tensor, as_views: bool) -> None:
    """The combined flat gradient into the parameters' .grad."""
    for p, g in zip(shared, combined.split([p.numel() for p in shared])):
        if as_views:
            p.grad = g.view_as(p)  # keeps flat alive until the optimizer's zero_grad(set_to_none=True)
        elif p.grad is None:
            p.grad = g.view_as(p).to(p.dtype).clone()
        else:
            p.grad.copy_(g.view_as(p))
