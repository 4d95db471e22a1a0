"""Training: one `train(config)` entry point, its loop in named steps.

    data -> tokenize once -> one endless batch stream per task
    for each epoch: schedule.steps() says which tasks go into each optimizer step;
        the task losses are combined by the run's gradient method (gradients.GRAD_METHODS: sum | pcgrad)
    validation or dev evaluation and an atomic checkpoint (checkpoint.RunState) at the end of every epoch;
    one result JSON at the very end (nothing that looks finished before that).

The knobs are TrainConfig's (config.py); the presets are in presets.py.
"""

from __future__ import annotations

import functools
import json
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mtbert_utils import TASKS, distributed, progress
from mtbert_utils.checkpoint import RunState
from mtbert_utils.config import TrainConfig
from mtbert_utils.data import digest_changes, file_digests
from mtbert_utils.device import (graphs_backward_thread, pick_amp, pick_device, recorded_cuda_graphs,  # noqa: F401
                                 tf32_matmuls, use_cuda_graphs)  # (also training.*)
from mtbert_utils.batching import TaskBatchStream, collate, prepare_data, training_streams
from mtbert_utils.evaluation import autocast_context, evaluate_run, to_device, write_predictions
from mtbert_utils.gradients import GRAD_METHODS, backs_summed_loss, summarize_cosines
from mtbert_utils.model import (MultitaskBert, default_pooling, load_encoder, load_tokenizer,
                                set_encoder_dropout)
from mtbert_utils.optim import build_optimizer, lr_multiplier
from mtbert_utils.results import environment, repo_relative, save_torch, write_json
from mtbert_utils.schedules import get_schedule
from mtbert_utils.selection import final_model
from mtbert_utils.tasks import STS_LOSSES, para_loss, sst_loss, sts_cosine_embedding_loss


# ---------------------------------------------------------------------------
# setup


def build_model(config: TrainConfig) -> MultitaskBert:
    torch.manual_seed(config.seed)  # head (and tiny encoder) initialisation depends on the seed only
    encoder = load_encoder(config.encoder, attn_implementation=config.attn_implementation)
    model = MultitaskBert(encoder, pooling=config.pooling or default_pooling(config.encoder),
                          dropout=config.dropout, para_input=config.para_input, sts_head=config.sts_head)
    if config.encoder_dropout is not None:
        set_encoder_dropout(model.encoder, config.encoder_dropout)
    if config.compile:
        model.encoder = torch.compile(model.encoder, dynamic=True)
    return model


def sst_class_weights(labels: torch.Tensor) -> torch.Tensor:
    counts = torch.bincount(labels, minlength=5).float().clamp(min=1)
    return counts.sum() / (5 * counts)


def task_loss(task: str, out: torch.Tensor, labels: torch.Tensor, config: TrainConfig, class_weights=None):
    if task == "sst":
        return sst_loss(out, labels, class_weights)
    if task == "para":
        return para_loss(out, labels)
    kind = config.resolved_sts_loss()
    if kind == "cosine_embedding":
        return sts_cosine_embedding_loss(out, labels, config.sts_threshold, config.sts_margin)
    return STS_LOSSES[kind](out, labels)


class NonFiniteLossError(FloatingPointError):
    """A NaN or infinite loss: training stops, the last good checkpoint stays."""


def stop_on_non_finite(raw: dict, ids: dict, device) -> None:
    """Raise NonFiniteLossError naming the task and batch when a loss is NaN or infinite; under data parallel every
    process stops at this step (one raising alone would leave the others waiting in a collective)."""
    bad = [t for t in raw if not math.isfinite(raw[t])]
    if distributed.is_distributed():
        if distributed.all_reduce_sum_(torch.tensor([float(len(bad))], device=device)).item() and not bad:
            raise NonFiniteLossError(f"a non-finite loss on another process; process {distributed.rank()} stops too")
    if bad:
        t = bad[0]
        raise NonFiniteLossError(f"non-finite loss ({raw[t]}) for task {t!r} on process {distributed.rank()}; "
                                 f"batch ids start {ids[t]}")


class PendingLosses:
    """A step's unweighted task losses on their way to the host. On CUDA the copy is queued behind the step's
    backward and `read()` waits for that copy alone, so a loop that reads step k's losses after queuing step k+1
    never leaves the GPU idle while the host prepares the next batch (reading them at once would wait for the
    whole step, and the GPU would then wait for the host)."""

    def __init__(self, raw: dict, batches: dict, device):
        self.tasks, self.device = list(raw), device
        self.ids = {t: list(batches[t]["ids"][:3]) for t in raw}  # for the error message
        values = torch.stack([raw[t] for t in self.tasks])
        self.event = None
        if values.is_cuda:
            self.values = values.to("cpu", non_blocking=True)  # into pinned memory; there once the event is
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.values = values

    def read(self) -> dict:
        """{task: loss}. Raises NonFiniteLossError naming the task and batch when a loss is NaN or infinite."""
        if self.event is not None:
            self.event.synchronize()
        raw = dict(zip(self.tasks, self.values.tolist()))
        stop_on_non_finite(raw, self.ids, self.device)
        return raw


def training_step(model, optimizer, batches: dict, config: TrainConfig, *, shared: list, device,
                  amp_dtype=None, scaler=None, class_weights=None, generator=None,
                  averager=None, loss_scale: dict | None = None) -> dict:
    """One optimizer step on one batch per task: the weighted task losses, combined into gradients by
    the run's method (gradients.GRAD_METHODS[config.grad_method]: sum or pcgrad). With config.fuse_tasks, and a
    method that backs the summed loss, the step's tasks share one encoder call (MultitaskBert.forward's fuse).

    Data parallel (mtbert_utils.distributed): for plain steps `model` is the DDP wrapper; with PCGrad
    or gradient cosines it is the bare model and `averager` (a TaskGradientAverager) averages each
    task's gradient over the processes before the surgery, on every step, one-task steps included.
    loss_scale: task -> factor on its loss: this process's share of the global batch times the
    number of processes, so that averaging the gradients gives the global-batch mean.

    Methods that take each task's gradient on its own (PCGrad, gradient cosines) get, while the encoder trains, each
    task's loss as a function that runs the task's forward, called just before its backward: one task's activations
    alive at a time.

    Returns {"losses": PendingLosses (its read() gives {task: unweighted loss} and raises NonFiniteLossError
    naming the task and batch when one is NaN or infinite), "cosines": pairwise task-gradient cosines or None}.
    The step reads nothing back to the host (PCGrad's bookkeeping, the cosines and fp16's GradScaler aside): the
    loop reads its losses one step later. A non-finite loss has then been through one optimizer step, but only in
    memory: the run stops at that read, before any checkpoint could be written.
    """
    if config.cuda_graphs:  # a new step: the CUDA graphs may reuse the previous step's output memory
        torch.compiler.cudagraph_mark_step_begin()
    raw = {}

    def weighted_loss(t: str, out: torch.Tensor) -> torch.Tensor | None:
        loss = task_loss(t, out, batches[t]["labels"], config, class_weights)
        raw[t] = loss.detach().float()
        if not loss.requires_grad:  # cosine STS on a frozen encoder has nothing to train this epoch
            return None
        return config.task_weights[t] * (loss * loss_scale[t] if loss_scale is not None else loss)

    def forward_and_loss(t: str) -> torch.Tensor:  # one task's forward, when its gradient is taken on its own
        with autocast_context(device, amp_dtype):
            out = model({t: batches[t]})[t]
        if (loss := weighted_loss(t, out)) is None:
            raise RuntimeError(f"task {t!r} has nothing to train though the encoder trains")
        return loss

    summed = backs_summed_loss(config)
    if not summed and not getattr(model, "module", model).encoder_frozen:
        # the method takes each task's gradient on its own: each task's forward runs just before its backward, so
        # one task's activations are alive at a time (pcgrad_backward). A frozen encoder keeps none: forward at once
        losses = {t: functools.partial(forward_and_loss, t) for t in batches}
    else:
        with autocast_context(device, amp_dtype):
            outs = model(batches, fuse=config.fuse_tasks and summed)
        losses = {t: loss for t in batches if (loss := weighted_loss(t, outs[t])) is not None}
    cosines = None
    if losses:
        reduce_fn = averager.for_tasks(losses) if averager is not None else None  # one all-reduce per task
        with graphs_backward_thread(config):  # cuda_graphs: the backward on this thread, not autograd's
            cosines = GRAD_METHODS[config.grad_method](losses, shared, config=config, scaler=scaler,
                                                       generator=generator, reduce_fn=reduce_fn)
    pending = PendingLosses(raw, batches, device)  # queued behind the backward, read by the loop a step later
    if losses:
        if config.max_grad_norm:
            if scaler:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"losses": pending, "cosines": cosines}


# ---------------------------------------------------------------------------
# the loop


def train(config: TrainConfig, resume: bool = False, max_epochs: int | None = None) -> dict:
    """Train one multitask model and return its result dict (also written to `{out_dir}/{run_name}.json`).

    resume=True continues from the run's last complete checkpoint. `max_epochs`
    stops after that many epochs in total without writing a result (used to
    simulate an interruption in tests).

    Under torchrun with N > 1 processes (docs/distributed.md): data parallel with
    config.batch_size examples per process (a global batch of N * batch_size),
    the same task sequence on every process, PCGrad on the global task gradients;
    rank 0 alone evaluates and writes files, under the run name suffixed `-ddpN`.
    """
    config.validate()
    run = Run.start(config)
    if resume and (done := finished_result(run)) is not None:  # a re-run after a crash redoes nothing
        return done
    with tf32_matmuls(config.tf32, run.device):
        return train_run(run, resume, max_epochs)


def train_run(run: "Run", resume: bool, max_epochs: int | None) -> dict:
    """train()'s body, once the run is set up: build or restore the state, the epochs, the result."""
    config = run.config
    state = build_state(run)
    if resume and distributed.broadcast_object(run.ckpt_path.exists()):  # every process loads rank 0's file
        state.restore(run.ckpt_path, config)
    distributed.broadcast_module_(state.model)  # insurance: every process starts from rank 0's weights

    last_epoch = config.epochs if max_epochs is None else min(config.epochs, max_epochs)
    for epoch in range(state.epoch + 1, last_epoch):
        if budget_spent(config, state):  # equal-budget runs end mid-schedule, at the epoch that spent the budget
            break
        record, cosines = run_epoch(run, state, epoch)
        score_epoch(run, state, epoch, record, cosines)
        state.save(run.ckpt_path, config, run.t_start)
        distributed.barrier()  # no process moves on (or returns) before the checkpoint is complete

    if last_epoch < config.epochs and not budget_spent(config, state):
        return {"status": "interrupted", "history": state.history, "checkpoint": str(run.ckpt_path)}
    return select_and_finish(run, state)


@dataclass
class Run:
    """What a run knows that a checkpoint does not hold: where it runs, its files, its data and the
    helpers built from them. (What a checkpoint holds is the RunState.)"""
    config: TrainConfig
    device: torch.device
    amp_dtype: torch.dtype | None
    use_scaler: bool
    world: int
    rank: int
    main: bool
    name: str              # the run name, suffixed -ddpN under N processes (another global batch)
    ckpt_path: Path
    result_path: Path
    t_start: float
    enc: dict | None = None        # split -> task -> EncodedTask
    data_info: dict | None = None
    num_batches: dict | None = None
    class_weights: torch.Tensor | None = None
    averager: object = None        # data parallel with per-task gradients: distributed.TaskGradientAverager
    ddp: object = None             # data parallel, plain steps: the DDP wrapper of the model
    ddp_key: list | None = None    # which parameters required grad when `ddp` was built
    graphs_before: int | None = None  # cuda_graphs: CUDA graphs this process held before the run (device.py)

    @classmethod
    def start(cls, config: TrainConfig) -> "Run":
        t_start = time.time()
        random.seed(config.seed)
        np.random.seed(config.seed)
        device = pick_device(config)
        if config.cuda_graphs and device.type != "cuda":  # fail before any data or model is loaded
            raise ValueError(f"cuda_graphs=True needs CUDA; this run is on {device.type} (set cuda_graphs=False)")
        distributed.init_from_env(device.type)  # no-op unless torchrun started more than one process
        world, rank = distributed.world_size(), distributed.rank()
        if device.type == "cuda" and world > 1:
            device = torch.device("cuda", torch.cuda.current_device())  # this process's GPU
        amp_dtype, use_scaler = pick_amp(config, device)
        name = config.run_name if world == 1 else f"{config.run_name}-ddp{world}"
        out_dir = Path(config.out_dir)
        return cls(config, device, amp_dtype, use_scaler, world, rank, distributed.is_main(), name,
                   out_dir / "checkpoints" / name / "last.pt", out_dir / f"{name}.json", t_start)

    @property
    def select(self) -> bool:
        """Score epochs on validation and keep the best epoch's weights (config.val_fraction > 0)."""
        return bool(self.config.val_fraction)

    def step_model(self, model):
        """The module a training step calls: the DDP wrapper for data-parallel plain steps, else the model."""
        return self.ddp if self.ddp is not None else model

    def wrap_ddp(self, model) -> None:
        """DDP syncs the parameters that require grad when it wraps the model: re-wrap when they change.
        find_unused_parameters: a step may leave heads (and the unused pooler) out of the graph."""
        from torch.nn.parallel import DistributedDataParallel
        key = [p.requires_grad for p in model.parameters()]
        if key != self.ddp_key:
            self.ddp, self.ddp_key = None, key
            self.ddp = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda"
                                               else None, find_unused_parameters=True)


def read_finished(path: Path, config: TrainConfig) -> dict | None:
    """The result JSON at `path` if it is a finished run of `config` (status finished, the same fingerprint,
    trained on the data files there are now), with result_path added; None if there is none there or it is
    another run's. The one test of "already trained", for train() and for packing's run lists."""
    if not path.exists():
        return None
    done = json.loads(path.read_text())
    if done.get("status") != "finished" or done.get("fingerprint") != config.fingerprint():
        return None
    recorded = done.get("data", {}).get("sha256")
    if recorded is None:  # a result from before runs kept them: reused as before, unchecked
        warnings.warn(f"{path.name} records no data digests (it predates them): reused without a data check",
                      stacklevel=2)
    elif changed := digest_changes(recorded, file_digests(config.data_dir)):
        warnings.warn(f"{path.name} was trained on other data files ({changed}): it is trained again", stacklevel=2)
        return None
    done["result_path"] = str(path)
    return done


def finished_result(run: Run) -> dict | None:
    """The run's result if it finished before with this config (rank 0 decides for every process)."""
    return distributed.broadcast_object(read_finished(run.result_path, run.config) if run.main else None)


def build_state(run: Run) -> RunState:
    """Data, model, optimizer, schedule and batch streams of a fresh run (the order fixes the random draws)."""
    config = run.config
    run.enc, run.data_info = prepare_data(config, load_tokenizer(config.encoder))
    model = build_model(config).to(run.device)
    use_cuda_graphs(model, config, run.device)
    if config.cuda_graphs:
        run.graphs_before = recorded_cuda_graphs(run.device)
    if run.rank > 0:
        torch.manual_seed(config.seed * 1000 + run.rank)  # own dropout masks on every process
    optimizer = build_optimizer(model, config, run.device)
    scaler = torch.amp.GradScaler("cuda") if run.use_scaler else None
    schedule = get_schedule(config.schedule, **config.schedule_params)
    if config.class_weights:
        run.class_weights = sst_class_weights(run.enc["train"]["sst"].labels).to(run.device)
    streams = training_streams(config, run.enc["train"], rank=run.rank, world_size=run.world)
    run.num_batches = {t: s.num_batches for t, s in streams.items()}
    # Data parallel: plain steps go through DDP; PCGrad (and gradient cosines) needs each task's
    # gradient averaged on its own before the surgery, which DDP cannot do (mtbert_utils.distributed).
    if run.world > 1 and (config.pcgrad or config.record_grad_cosines):
        run.averager = distributed.TaskGradientAverager({t: model.module_groups()[t] for t in TASKS})
    return RunState(model=model, optimizer=optimizer, streams=streams, schedule=schedule,
                    sched_rng=random.Random(config.seed), pc_gen=torch.Generator().manual_seed(config.seed),
                    scaler=scaler, data_sha256=run.data_info["sha256"])


def budget_spent(config: TrainConfig, state: RunState) -> bool:
    return config.examples_budget is not None and state.examples_seen() >= config.examples_budget


def set_up_epoch(run: Run, state: RunState, epoch: int) -> tuple[bool, float, list]:
    """The epoch's phase (encoder trainable or not) and learning rates. Returns (encoder trainable,
    lr multiplier, the shared parameters that train)."""
    config, model = run.config, state.model
    trainable = config.encoder_trainable(epoch)
    model.set_encoder_trainable(trainable, config.freeze_word_embeddings)
    shared = [p for p in list(model.encoder.parameters()) + list(model.shared.parameters()) if p.requires_grad]
    if run.world > 1 and run.averager is None:
        run.wrap_ddp(model)
    mult = lr_multiplier(epoch, config.lr_decay, config.lr_decay_epochs)
    for g in state.optimizer.param_groups:
        g["lr"] = g["base_lr"] * mult
    model.train()
    if config.cache_frozen_encoder:  # one cache per frozen phase: the encoder's weights change in between
        if trainable:
            model.embed_cache = None
        else:
            model.encoder.eval()  # no dropout: its outputs are the same every epoch, so they can be reused
            if model.embed_cache is None:
                model.embed_cache = {}
    return trainable, mult, shared


def run_epoch(run: Run, state: RunState, epoch: int) -> tuple[dict, list]:
    """Train one epoch (or until the examples budget is spent). Returns (its training record, the task-gradient
    cosines of its steps when the gradient method measured them)."""
    config = run.config
    trainable, mult, shared = set_up_epoch(run, state, epoch)
    n_steps = state.schedule.num_steps(run.num_batches, epoch)
    loss_sum, loss_n = {t: 0.0 for t in TASKS}, {t: 0 for t in TASKS}
    cos_log, trace = [], []
    trace_every = max(1, n_steps // 50)
    bar = progress.bar(total=n_steps, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                       enabled=config.progress and run.main)

    def tally(pending) -> None:  # a step's losses, read once the next step is queued (PendingLosses)
        losses, share, where = pending
        try:
            for t, v in losses.read().items():
                loss_sum[t] += v * share[t]
                loss_n[t] += 1
        except NonFiniteLossError as e:
            raise NonFiniteLossError(f"{e} at {where}. The last good checkpoint ({run.ckpt_path}) was kept; "
                                     f"no result was written.") from None

    t_epoch, pending = time.time(), None
    for i, tasks in enumerate(state.schedule.steps(run.num_batches, epoch, state.sched_rng)):
        out, share = optimizer_step(run, state, tasks, shared)
        state.step += 1
        if pending is not None:
            tally(pending)
        pending = (out["losses"], share, f"epoch {epoch + 1}, step {i + 1} (global step {state.step})")
        if out["cosines"] is not None:
            cos_log.append(out["cosines"])
        if i % trace_every == 0 or i == n_steps - 1:
            trace.append([state.step, *(state.seen[t] for t in TASKS)])
        bar.set_postfix({t: f"{loss_sum[t] / max(loss_n[t], 1):.3f}" for t in TASKS if loss_n[t]})
        bar.update()
        if budget_spent(config, state):
            trace.append([state.step, *(state.seen[t] for t in TASKS)])
            break
    if pending is not None:
        tally(pending)
    bar.close()
    epoch_time = time.time() - t_epoch
    state.train_time += epoch_time
    if run.world > 1:  # the processes' shares of every step's loss add up to the global-batch loss
        sums = torch.tensor([loss_sum[t] for t in TASKS], dtype=torch.float64, device=run.device)  # nccl: on GPU
        loss_sum = dict(zip(TASKS, distributed.all_reduce_sum_(sums).tolist()))
    return {"epoch": epoch + 1, "steps": state.step, "encoder_trainable": trainable, "lr_multiplier": mult,
            "train_loss": {t: loss_sum[t] / loss_n[t] for t in TASKS if loss_n[t]},
            "examples_seen": dict(state.seen), "seen_trace": trace, "epoch_time_s": epoch_time}, cos_log


def optimizer_step(run: Run, state: RunState, tasks: tuple, shared: list) -> tuple[dict, dict]:
    """One step on the next batch of each task in `tasks`. Returns (training_step's output, task -> this
    process's share of the global batch)."""
    batches, share = {}, {}
    for t in tasks:
        batch, n_global = next_global_batch(state.streams[t])
        share[t] = len(batch["ids"]) / n_global  # this process's part of the global batch
        if not batch["ids"]:  # a stand-in example, weighted 0: every process joins every collective
            batch = collate(state.streams[t].enc, [0], state.streams[t].pair_mode,
                            pad_to_multiple=run.config.pad_to_multiple)
        batches[t] = to_device(batch, run.device)
        state.seen[t] += n_global
    out = training_step(run.step_model(state.model), state.optimizer, batches, run.config, shared=shared,
                        device=run.device, amp_dtype=run.amp_dtype, scaler=state.scaler,
                        class_weights=run.class_weights, generator=state.pc_gen, averager=run.averager,
                        loss_scale={t: share[t] * run.world for t in tasks} if run.world > 1 else None)
    return out, share


def score_epoch(run: Run, state: RunState, epoch: int, record: dict, cos_log: list) -> None:
    """Score the epoch (on validation when selecting, else dev), keep the best or every epoch's weights as
    the run selects, add the record to the history and tell the schedule (an adaptive one uses the scores)."""
    config, model = run.config, state.model
    split = "val" if run.select else "dev"
    # rank 0 evaluates, the others wait for its scores (an adaptive schedule needs them everywhere)
    ev = None
    if run.main:
        ev = evaluate_run(model, run.enc[split], config, run.device, run.amp_dtype)
        if config.snapshot_ensemble:  # this epoch's weights are a candidate member
            state.snapshot_val[epoch + 1] = {t: p["raw"].tolist() for t, p in ev["predictions"].items()}
            save_torch(run.ckpt_path.parent / f"epoch{epoch + 1}.pt", model.state_dict())
    dev = distributed.broadcast_object(ev["metrics"] if run.main else None)
    record[split] = dev
    if run.select and run.main and dev["mean"] > state.best["score"]:
        state.best = {"epoch": epoch + 1, "score": dev["mean"],
                      "model": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}
    if cos_log:
        record["grad_cosines"] = summarize_cosines(cos_log)
    if config.cuda_graphs and run.graphs_before is not None:  # graphs recorded so far (resumed: this session's)
        now = recorded_cuda_graphs(run.device)
        record["cuda_graphs_recorded"] = None if now is None else now - run.graphs_before
    state.history.append(record)
    state.epoch = epoch
    if config.progress and run.main:
        progress.write(f"epoch {epoch + 1}/{config.epochs} {split}: " + " ".join(f"{k} {v:.3f}" for k, v in dev.items()))
    # before the checkpoint: it must hold the adaptive schedule's latest scores
    state.schedule.update({t: dev[t] for t in TASKS if t in dev})


def select_and_finish(run: Run, state: RunState) -> dict:
    """Choose the final model, write the prediction files and the result JSON; return the result."""
    config = run.config
    final_dev, selection, kept = final_model(run, state)
    total_seen = state.examples_seen()
    result = {
        **run_record(config, run.name, run.device, state.model, run.data_info),
        "precision": str(run.amp_dtype).replace("torch.", "") if run.amp_dtype else "fp32",
        "num_batches": run.num_batches, "history": state.history,
        "dev": final_dev, **({"selection": selection} if selection else {}), "steps": state.step,
        "examples_seen": state.seen,
        # wall_time_s: every session's, up to its last checkpoint (this one's to the end); wall_time_complete
        # is False when an earlier session's could not be counted (a checkpoint older than this record)
        "train_time_s": state.train_time, "wall_time_s": (state.wall_time or 0.0) + time.time() - run.t_start,
        "wall_time_complete": state.wall_time is not None, "resumes": state.resumes,
        "train_examples_per_s": total_seen / state.train_time if state.train_time else None,
        "environment": environment(),
    }
    if run.world > 1:
        result["distributed"] = {"world_size": run.world, "backend": torch.distributed.get_backend(),
                                 "batch_size_per_process": config.batch_size,
                                 "global_batch_size": run.world * config.batch_size}
    if config.write_predictions and run.main:
        pred_dir = Path(config.out_dir) / "predictions" / run.name
        for split in ("dev", "test"):
            if run.enc[split]:
                out = kept[split] if kept[split] is not None else evaluate_run(
                    state.model, run.enc[split], config, run.device, run.amp_dtype)
                write_predictions(out["predictions"], pred_dir, split)
        result["predictions_dir"] = repo_relative(pred_dir)
    if run.main:
        write_json(run.result_path, result)
    distributed.barrier()
    result["result_path"] = str(run.result_path)
    return result


def run_record(config: TrainConfig, run_name: str, device: torch.device, model, data_info: dict) -> dict:
    """The head of every result JSON (trained runs and the zero-shot floor): what ran, on what, on which data."""
    # paths as they travel: out_dir relative to the repository, never the machine's own folders
    return {"status": "finished", "run_name": run_name,
            "config": {**config.to_dict(), "out_dir": repo_relative(config.out_dir)},
            "fingerprint": config.fingerprint(), "seed": config.seed,
            "encoder": {"name": config.encoder, "pooling": config.pooling or default_pooling(config.encoder),
                        "parameters": sum(p.numel() for p in model.encoder.parameters())},
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(0),
            "data": data_info}


def next_global_batch(stream: TaskBatchStream) -> tuple[dict, int]:
    """(this process's chunk of the stream's next global batch, the global batch's size).

    With one process the chunk is the whole batch. A chunk is empty when the last
    global batch of a pass has fewer examples than there are processes.
    """
    n_global = len(stream.order[stream.position])
    return next(stream), n_global
