"""Data parallelism over torch.distributed: the few collectives the trainer needs.

Launch any entry point with torchrun, which sets RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT for every process:

    torchrun --nproc_per_node 4 -m mtbert_utils.train --config cfg.json

Without a launcher (or with one process) every function here is a no-op, so
the trainer calls them unconditionally.

Plain multitask steps use DistributedDataParallel (one forward and one backward
per step, gradients averaged in DDP's buckets). PCGrad cannot: DDP would average
the *sum* of the task gradients, after which the surgery has nothing to work on.
So PCGrad steps skip DDP and `TaskGradientAverager` averages each task's
gradient over the processes before the projection, one all-reduce per task.
"""

from __future__ import annotations

import datetime
import os
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

# Rank 0 evaluates and writes checkpoints while the others wait in a collective:
# give that more time than the default.
TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("MTBERT_DIST_TIMEOUT_MIN", "60")))


def init_from_env(device_type: str | None = None) -> bool:
    """Join the process group that torchrun describes in the environment, once.

    device_type: "cuda" (backend nccl, this process's GPU from LOCAL_RANK) or
    "cpu" (gloo); None: cuda if available. Returns whether more than one process runs.
    """
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    cuda = (device_type or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes files and shows progress."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean_(tensor: Tensor) -> Tensor:
    """Average `tensor` over all processes, in place (and return it)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj=None, src: int = 0):
    """Rank `src`'s (picklable) `obj` on every process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every process."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_module_(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers to every process (what DDP does when it wraps a model)."""
    if is_distributed():
        for t in module.state_dict().values():
            dist.broadcast(t, src=src)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class TaskGradientAverager:
    """Exact PCGrad across processes: average each task's gradient over all of them
    before any projection, so N processes with batch b take the same step as one
    process with batch N*b. (Projecting each process's local gradients and then
    averaging is a different algorithm.)

    pcgrad_backward calls the reduce_fn that `for_tasks` returns once per task,
    in the order of its task losses, with that task's flat shared gradient. The
    task's own head gradients (parameters that only that task reaches, outside
    the flat buffer) travel in the same buffer, so a step costs one all-reduce
    per task and nothing else.

    task_params: task -> the parameters only that task reaches (its head).
    """

    def __init__(self, task_params: dict[str, Iterable[torch.nn.Parameter]]):
        self.task_params = {t: list(ps) for t, ps in task_params.items()}

    def for_tasks(self, tasks: Iterable[str]) -> Callable[[Tensor], Tensor]:
        order = iter(list(tasks))
        return lambda flat: self.reduce(next(order), flat)

    def reduce(self, task: str, flat: Tensor) -> Tensor:
        heads = [p for p in self.task_params.get(task, []) if p.requires_grad]
        # a head is always reached when its task has a loss, so .grad is None only off the graph
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in heads]
        buf = torch.cat([flat.reshape(-1)] + [g.reshape(-1).to(flat.dtype) for g in grads])
        all_reduce_mean_(buf)
        flat.copy_(buf[: flat.numel()].view_as(flat))
        chunks = buf[flat.numel():].split([p.numel() for p in heads])
        for p, g in zip(heads, chunks):
            p.grad = g.view_as(p).to(p.dtype).clone()
        return flat
