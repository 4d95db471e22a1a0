"""Checkpoints: the state a run carries from epoch to epoch, saved and restored by one object.

A checkpoint is one torch file `{out_dir}/checkpoints/{run_name}/last.pt`, written atomically at the
end of every epoch. `RunState` lists what goes into it once: its progress fields (PROGRESS, with the
value a checkpoint that predates a field gets) and the live objects it points at (`parts`). Saving
and restoring walk the same lists, so a new field cannot be saved and forgotten on restore.
"""

from __future__ import annotations

import math
import pickle
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mtbert_utils import TASKS, distributed
from mtbert_utils.config import TrainConfig
from mtbert_utils.data import digest_changes
from mtbert_utils.model import default_pooling
from mtbert_utils.results import save_torch


def checkpoint_signature(config: TrainConfig) -> dict:
    """What a checkpoint must match to be loaded into a model built from `config`."""
    return {"encoder": config.encoder, "pooling": config.pooling or default_pooling(config.encoder),
            "para_input": config.para_input, "sts_head": config.sts_head}


def load_checkpoint(path: str | Path, config: TrainConfig) -> dict:
    """Read a checkpoint and check that it belongs to a model like `config`'s."""
    path = Path(path)
    try:  # weights only: a checkpoint holds tensors, numbers, strings and containers; no pickled code runs
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"checkpoint {path} holds objects other than tensors, numbers, strings and containers, "
                         f"which an mtbert checkpoint never does: not loaded, as unpickling them could run "
                         f"code ({e})") from e
    except Exception as e:
        raise ValueError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "signature" not in ckpt:
        raise ValueError(f"{path} is not an mtbert checkpoint (no model state or signature)")
    want, got = checkpoint_signature(config), ckpt["signature"]
    diff = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
    if diff:
        lines = ", ".join(f"{k}: checkpoint has {a!r}, config wants {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"checkpoint {path} does not match this model ({lines})")
    return ckpt


def load_model_state(model, state: dict, path) -> None:
    """model.load_state_dict, with an error that names the checkpoint and the tensors that do not fit."""
    own = model.state_dict()
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = sorted(set(own) - set(state))
    problems = bad[:5] + ([f"missing: {', '.join(missing[:5])}"] if missing else [])
    if problems:
        raise ValueError(f"checkpoint {path} does not fit this model: {'; '.join(problems)}")
    model.load_state_dict(state)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def dropout_rng_state(model) -> dict:
    """This process's dropout random state: the CPU generator's and, for a model on a GPU, its device's CUDA
    generator's (dropout there draws from it, and build_model's torch.manual_seed reseeds both: without it a
    resumed GPU run would draw its first epoch's masks again)."""
    device = model_device(model)
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _no_best() -> dict:
    return {"epoch": None, "score": -math.inf, "model": None}


# progress fields: name -> the value a checkpoint written before the field existed restores
PROGRESS = {
    "epoch": -1,           # the last complete epoch (0-based); -1: none yet
    "step": 0,             # optimizer steps so far
    "seen": None,          # task -> training examples seen
    "history": None,       # one record per epoch
    "train_time": 0.0,     # seconds inside the training loop, all sessions
    "wall_time": None,     # wall seconds of all sessions up to this checkpoint; None: not all were counted
    "resumes": 0,          # sessions before this one
    "best": None,          # with val_fraction: the best epoch on validation, its score and weights
    "snapshot_val": None,  # with snapshot_ensemble: epoch -> task -> raw validation outputs
    "data_sha256": None,   # the data files' digests (data.file_digests) the run trains on; None: not recorded
}


@dataclass
class RunState:
    """What a run carries from epoch to epoch: its progress (PROGRESS) and the live objects it trains
    (model, optimizer, scaler, task batch streams, schedule, the schedule's and PCGrad's random
    generators). `save` writes both to a checkpoint, `restore` reads them back."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    streams: dict
    schedule: object
    sched_rng: random.Random
    pc_gen: torch.Generator
    scaler: object = None
    epoch: int = -1
    step: int = 0
    seen: dict = field(default_factory=lambda: {t: 0 for t in TASKS})
    history: list = field(default_factory=list)
    train_time: float = 0.0
    wall_time: float | None = 0.0
    resumes: int = 0
    best: dict = field(default_factory=_no_best)
    snapshot_val: dict = field(default_factory=dict)
    data_sha256: dict | None = None

    def parts(self) -> dict:
        """checkpoint key -> (get its state, set its state), for every live object."""
        streams = self.streams
        return {
            "model": (self.model.state_dict, None),  # restored with a shape check, in restore()
            "optimizer": (self.optimizer.state_dict, self.optimizer.load_state_dict),
            "streams": (lambda: {t: s.state_dict() for t, s in streams.items()},
                        lambda d: [s.load_state_dict(d[t]) for t, s in streams.items()]),
            "schedule": (self.schedule.state_dict, self.schedule.load_state_dict),
            "sched_rng": (self.sched_rng.getstate, self.sched_rng.setstate),
            "pcgrad_gen": (self.pc_gen.get_state, self.pc_gen.set_state),
            "scaler": (lambda: self.scaler.state_dict() if self.scaler else None,
                       lambda s: self.scaler.load_state_dict(s) if self.scaler is not None and s else None),
        }

    def examples_seen(self) -> int:
        return sum(self.seen.values())

    def save(self, path: Path, config: TrainConfig, session_start: float) -> None:
        """Write the checkpoint (rank 0; every process must call: the dropout rngs are gathered)."""
        # everything but the dropout rngs is the same on every process: rank 0 writes it
        rng, rngs = dropout_rng_state(self.model), {}
        if distributed.world_size() > 1:
            ranks = distributed.all_gather_object(rng)
            rngs = {"torch_rng_ranks": [r["cpu"] for r in ranks], "cuda_rng_ranks": [r["cuda"] for r in ranks]}
        if not distributed.is_main():
            return
        progress = {k: getattr(self, k) for k in PROGRESS}
        # this session's wall time so far on top of the earlier ones (unknown stays unknown)
        progress["wall_time"] = None if self.wall_time is None else self.wall_time + time.time() - session_start
        save_torch(path, {**progress, **{k: get() for k, (get, _) in self.parts().items()},
                          "torch_rng": rng["cpu"], "cuda_rng": rng["cuda"], **rngs,
                          "signature": checkpoint_signature(config), "config": config.to_dict()})

    def restore(self, path: Path, config: TrainConfig) -> bool:
        """Continue from the checkpoint at `path` (every process reads the same file). A checkpoint written
        while training on other data files is not restored (a warning names them; False): the run starts
        afresh, as train() retrains a finished run whose data files changed."""
        ckpt = load_checkpoint(path, config)
        recorded = ckpt.get("data_sha256")
        changed = recorded is not None and self.data_sha256 is not None and digest_changes(recorded, self.data_sha256)
        if changed:
            warnings.warn(f"checkpoint {path} was written while training on other data files ({changed}): "
                          f"the run starts from scratch", stacklevel=2)
            return False
        load_model_state(self.model, ckpt["model"], path)
        for key, (_, set_state) in self.parts().items():
            if set_state is not None and key in ckpt:
                set_state(ckpt[key])
        rank, world = distributed.rank(), distributed.world_size()

        def rng(key):  # data parallel: one dropout rng per process
            ranks = ckpt.get(f"{key}_ranks")
            return ranks[rank] if ranks and len(ranks) == world else ckpt.get(key)
        torch.set_rng_state(rng("torch_rng"))
        device, cuda_rng = model_device(self.model), rng("cuda_rng")
        if device.type == "cuda" and cuda_rng is not None:  # none from a CPU run or an older checkpoint
            torch.cuda.set_rng_state(cuda_rng, device)
        for k, missing in PROGRESS.items():
            value = ckpt.get(k, missing)
            if value is not None:
                setattr(self, k, value)
            elif k == "wall_time":  # a checkpoint from before wall time was kept: earlier sessions untimed
                self.wall_time = None
        self.snapshot_val = {int(k): v for k, v in self.snapshot_val.items()}
        self.resumes += 1
        return True
