"""Where and how a run computes: the device, the precision (autocast dtype, GradScaler), TF32 and CUDA graphs.

Each is a TrainConfig switch (config.py: precision, tf32 and cuda_graphs in its optimisation section, device in
its run section); training.py calls these once per run.
"""

from __future__ import annotations

import contextlib

import torch

from mtbert_utils.config import TrainConfig


def pick_device(config: TrainConfig) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but CUDA is not available here")
        return torch.device("cuda")
    return torch.device("cpu")


def pick_amp(config: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether to use a GradScaler).

    "auto" is fp32 everywhere: on an H100, train() ran at 1,702 examples/s in fp32 against 198 in bf16
    autocast (MiniLM, SST, batch 32; issue 12), as bf16 attention pays a first-use cost per new padded
    length and the step is launch-bound. `python -m mtbert_utils.bench --device cuda` measures both again."""
    p = config.precision
    if p in ("auto", "fp32"):
        return None, False
    if p == "fp16":
        if device.type != "cuda":
            raise ValueError("fp16 needs CUDA; use precision='bf16' or 'fp32' on CPU")
        return torch.float16, True
    return torch.bfloat16, False


def use_cuda_graphs(model, config: TrainConfig, device: torch.device) -> None:
    """cuda_graphs: the encoder's forward in training steps becomes torch.compile(mode="reduce-overhead"),
    i.e. CUDA graphs, recorded per padded shape (pad_to_multiple keeps the shapes few: 24 in 10 passes over
    the local training data at batch 64 and a multiple of 16, results/bench/graph_shapes.json), though within
    a step per sequence of shapes (recorded_cuda_graphs counts them; docs/gpu.md). It compiles
    with dynamic shapes, once per kind of input (token types or not, grad on or off), not once per shape and
    grad mode (up to 48 compiles with dynamic=False; tests/test_levers.py counts them on CPU). Evaluation
    stays eager, as its batch sizes and lengths would record graphs of their own. training_step marks each
    step's start."""
    if not config.cuda_graphs:
        return
    if device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs CUDA; this run is on {device.type} (set cuda_graphs=False)")
    import torch._dynamo
    import torch._inductor.config
    # room for the kinds of input and the sizes dynamo still specializes (a last batch of 1)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    # inductor draws random numbers its own way: other dropout masks than eager's, and the eager generator left
    # elsewhere. Eager's draws keep the switch execution-only (roundings, not other masks: config.EXECUTION_ONLY)
    torch._inductor.config.fallback_random = True
    model.use_graphed_encoder(torch.compile(model.encoder, mode="reduce-overhead", dynamic=True))


def graphs_backward_thread(config: TrainConfig):
    """cuda_graphs: a step's backward runs on the thread that calls it (torch.autograd.set_multithreading_enabled
    off), not on autograd's CUDA worker thread. The graphs runs that segfaulted on an H200 died in that worker thread
    (pt_autograd_0, torch 2.11, docs/speed.md). Graph trees keep state per thread and share one memory pool between
    threads; torch 2.11 does not serialize their capture and warm-up across threads (the lock that does,
    graph_capture_lock, came later: 2.13 has it). On one thread, a run's graph work cannot interleave. Whether this
    was the cause only a GPU can say. Execution only: the same arithmetic; runs without graphs are untouched."""
    return torch.autograd.set_multithreading_enabled(False) if config.cuda_graphs else contextlib.nullcontext()


def recorded_cuda_graphs(device: torch.device) -> int | None:
    """How many CUDA graphs torch.compile's graph trees hold on `device`, in this process. A tree records a graph
    per new input shape, and as a child of the node before it while that node's outputs live: a step's second
    and third task forward (the first one's activations wait for the backward) and its backward grow the tree by
    sequence of shapes, not by shape. None if torch's (private) tree API is not the one this reads."""
    try:
        from torch._inductor import cudagraph_trees
        manager = cudagraph_trees.get_manager(device.index or 0, create_if_none_exists=False)

        def count(nodes) -> int:
            return sum(1 + count([c for cs in n.children.values() for c in cs]) for n in nodes)
        return 0 if manager is None else count(list(manager.get_roots()))
    except Exception:  # noqa: BLE001 - a diagnostic: never fail a run over it
        return None


@contextlib.contextmanager
def tf32_matmuls(enabled: bool, device: torch.device):
    """TF32 tensor cores for fp32 matmuls and convolutions on CUDA while the block runs; the flags restored."""
    if not enabled or device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
