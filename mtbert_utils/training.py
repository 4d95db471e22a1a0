"""Training: one config dataclass, one `train(config)` entry point.

    data -> tokenize once -> one endless batch stream per task
    for each epoch: schedule.steps() says which tasks go into each optimizer step;
        combined loss = sum_t w_t * L_t  (or PCGrad on the per-task gradients)
    dev evaluation and an atomic checkpoint at the end of every epoch;
    one result JSON at the very end (nothing that looks finished before that).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mtbert_utils import TASKS, distributed
from mtbert_utils.data import TaskBatchStream, collate, encode_task, load_tasks, split_by_hash
from mtbert_utils.evaluation import (add_summary_metrics, autocast_context, ensemble_prediction, evaluate, score,
                                     select_members, to_device, write_predictions)
from mtbert_utils.model import (ENCODER_NAMES, MultitaskBert, default_pooling, load_encoder, load_tokenizer,
                                set_encoder_dropout)
from mtbert_utils.pcgrad import pcgrad_backward
from mtbert_utils.results import environment, save_torch, write_json
from mtbert_utils.schedules import SCHEDULES, get_schedule
from mtbert_utils.tasks import STS_LOSSES, para_loss, sst_loss, sts_cosine_embedding_loss

LR_KEYS = ("encoder", "shared", "sst", "para", "sts")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Every knob of a run. Defaults reproduce the study's tuned setup; `baseline()` its plain one."""
    # model
    encoder: str = "minilm"            # 'minilm' (offline default), 'tiny' (tests), or a HF id / local path
    pooling: str | None = None         # mean | cls | pooler; None = the encoder's default
    dropout: float = 0.3
    para_input: str = "joint"          # joint: [CLS] a [SEP] b [SEP]; separate: [u; v]; sbert: [u; v; |u-v|; u*v]
    sts_head: str = "cosine"           # cosine (the study's extension) | linear (its baseline)
    sts_loss: str | None = None        # mse | cosine_embedding | sbert_mse; None = mse (linear) / cosine_embedding (cosine)
    sts_threshold: float = 2.5         # cosine-embedding loss: gold score >= threshold counts as a similar pair
    sts_margin: float = 0.0            # cosine-embedding loss margin for dissimilar pairs
    class_weights: bool = False        # inverse-frequency class weights for SST cross-entropy
    # multitask
    schedule: str = "rr_over"
    schedule_params: dict = field(default_factory=dict)
    task_weights: dict = field(default_factory=lambda: {"sst": 1.0, "para": 1.0, "sts": 1.0})
    train_tasks: list = field(default_factory=lambda: list(TASKS))  # a subset gives single-task reference runs
    pcgrad: bool = False
    pcgrad_reduction: str = "mean"     # mean (the implementation the study used) | sum (the paper)
    record_grad_cosines: bool = False  # log task-gradient cosines even without surgery
    # optimisation: phases of [epochs, encoder trainable]: 5 heads only, 20 full, 5 heads only
    phases: list = field(default_factory=lambda: [[5, False], [20, True], [5, False]])
    lr: dict = field(default_factory=lambda: {"encoder": 2e-5, "shared": 1e-4, "sst": 9.5e-4,
                                              "para": 1e-4, "sts": 4e-5})
    lr_decay: float = 0.7              # multiply every learning rate by this ...
    lr_decay_epochs: list = field(default_factory=lambda: [5, 25])  # ... at the start of these epochs
    layer_lr_decay: float = 1.0        # layer-wise lr decay: encoder layer i of L learns at lr["encoder"] *
                                       # this ** (L - 1 - i), the embeddings at ** L (1.0: one encoder lr)
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    batch_size: int = 64
    eval_batch_size: int = 128
    examples_budget: int | None = None  # stop once this many training examples (all tasks) were seen
    # data
    data_dir: str | None = None        # None: $MTBERT_DATA_DIR, else ./data
    max_train: int | dict | None = None  # per-task cap on training examples (seeded subsample)
    max_dev: int | dict | None = None
    max_length: int = 128
    val_fraction: float = 0.0          # > 0: carve this share of each train split (by id hash) as validation;
                                       # epochs are scored on it, the best epoch's weights are kept and dev is
                                       # scored once, at the end, with them (honest model selection)
    snapshot_ensemble: int = 0         # > 0 (needs val_fraction): keep every epoch's weights; per task, average
                                       # the outputs of the top-k epochs on validation, k <= this, chosen on
                                       # validation too; dev and test are predicted by that ensemble
    para_swap: bool = False            # joint paraphrase pairs: train on both orders (a, b) / (b, a) at random,
                                       # predict with the average of both orders
    # speed levers (each one alone is measured by mtbert_utils.bench)
    precision: str = "auto"            # auto: bf16 on CUDA if supported (else fp16 + GradScaler), fp32 on CPU
    group_by_length: bool = True       # batches of similar length: less padding
    freeze_word_embeddings: bool = False
    compile: bool = False              # torch.compile the encoder
    attn_implementation: str = "sdpa"  # sdpa | eager
    optimizer: str = "auto"            # AdamW implementation: auto (fused on CUDA, foreach on CPU) | foreach |
                                       # fused | forloop
    encoder_dropout: float | None = None  # dropout inside the encoder; None: the checkpoint's own (0.1)
    # run
    seed: int = 0
    name: str | None = None            # prefix of the run name; default: the schedule
    out_dir: str = "results/runs"
    write_predictions: bool = False    # CS224N prediction files for dev and test
    progress: bool = True
    device: str = "auto"               # auto | cpu | cuda

    # -- presets ---------------------------------------------------------------------
    @classmethod
    def baseline(cls, **overrides) -> "TrainConfig":
        """The study's plain setup: full fine-tuning, one learning rate, linear STS head with MSE."""
        plain = dict(phases=[[10, True]], lr={k: 5e-5 for k in LR_KEYS}, lr_decay=1.0, lr_decay_epochs=[],
                     sts_head="linear", sts_loss="mse", dropout=0.3, batch_size=64)
        return cls(**{**plain, **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(names)}")
        return cls(**d)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Fail early, with the offending value, before any model is loaded."""
        def positive(name, v):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0 or not math.isfinite(v):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        positive("batch_size", self.batch_size)
        positive("eval_batch_size", self.eval_batch_size)
        positive("max_length", self.max_length)
        if not isinstance(self.batch_size, int):
            raise ValueError(f"batch_size must be an integer, got {self.batch_size!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {sorted(SCHEDULES)}")
        missing = [k for k in LR_KEYS if k not in self.lr]
        if missing or set(self.lr) - set(LR_KEYS):
            raise ValueError(f"lr needs exactly the keys {LR_KEYS}, got {sorted(self.lr)}")
        for k, v in self.lr.items():
            positive(f"lr[{k!r}]", v)
        if not self.train_tasks or any(t not in TASKS for t in self.train_tasks) \
                or len(set(self.train_tasks)) != len(self.train_tasks):
            raise ValueError(f"train_tasks must be a non-empty list of distinct tasks from {TASKS}, "
                             f"got {self.train_tasks!r}")
        if set(self.task_weights) != set(TASKS):
            raise ValueError(f"task_weights needs the keys {TASKS}, got {sorted(self.task_weights)}")
        for k, v in self.task_weights.items():
            if not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"task_weights[{k!r}] must be >= 0, got {v!r}")
        if not self.phases or any(len(p) != 2 or int(p[0]) < 0 for p in self.phases) or self.epochs < 1:
            raise ValueError(f"phases must be a list of [epochs, encoder_trainable] with >= 1 epoch in all, "
                             f"got {self.phases!r}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay!r}")
        if not isinstance(self.layer_lr_decay, (int, float)) or not 0 < self.layer_lr_decay <= 1:
            raise ValueError(f"layer_lr_decay must be in (0, 1], got {self.layer_lr_decay!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {PRECISIONS}")
        if self.sts_loss is not None and self.sts_loss not in STS_LOSSES:
            raise ValueError(f"unknown sts_loss {self.sts_loss!r}; choose one of {sorted(STS_LOSSES)}")
        if self.sts_head == "linear" and self.sts_loss not in (None, "mse"):
            raise ValueError("the linear STS head is trained with sts_loss='mse'")
        if self.pcgrad_reduction not in ("mean", "sum"):
            raise ValueError(f"pcgrad_reduction must be 'mean' or 'sum', got {self.pcgrad_reduction!r}")
        if self.examples_budget is not None and (not isinstance(self.examples_budget, int)
                                                 or isinstance(self.examples_budget, bool) or self.examples_budget < 1):
            raise ValueError(f"examples_budget must be None or a positive int, got {self.examples_budget!r}")
        if not isinstance(self.val_fraction, (int, float)) or isinstance(self.val_fraction, bool) \
                or not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if isinstance(self.snapshot_ensemble, bool) or not isinstance(self.snapshot_ensemble, int) \
                or self.snapshot_ensemble < 0:
            raise ValueError(f"snapshot_ensemble must be an int >= 0, got {self.snapshot_ensemble!r}")
        if self.snapshot_ensemble and not self.val_fraction:
            raise ValueError("snapshot_ensemble chooses its members on validation: set val_fraction > 0")
        if not isinstance(self.para_swap, bool):
            raise ValueError(f"para_swap must be True or False, got {self.para_swap!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}")
        if self.encoder_dropout is not None and (isinstance(self.encoder_dropout, bool) or not isinstance(
                self.encoder_dropout, (int, float)) or not 0 <= self.encoder_dropout < 1):
            raise ValueError(f"encoder_dropout must be None or in [0, 1), got {self.encoder_dropout!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        for name in ("max_train", "max_dev"):
            v = getattr(self, name)
            vals = v.values() if isinstance(v, dict) else [v]
            if any(x is not None and (not isinstance(x, int) or x < 1) for x in vals):
                raise ValueError(f"{name} must be None, a positive int, or a dict task -> positive int; got {v!r}")
        if self.encoder not in ENCODER_NAMES and not isinstance(self.encoder, str):
            raise ValueError(f"encoder must be one of {ENCODER_NAMES}, a HF id or a path, got {self.encoder!r}")

    # -- derived ---------------------------------------------------------------------
    @property
    def epochs(self) -> int:
        return int(sum(int(p[0]) for p in self.phases))

    def encoder_trainable(self, epoch: int) -> bool:
        """Whether the encoder trains in this (0-based) epoch."""
        end = 0
        for n, trainable in self.phases:
            end += int(n)
            if epoch < end:
                return bool(trainable)
        return bool(self.phases[-1][1])

    def resolved_sts_loss(self) -> str:
        return self.sts_loss or ("mse" if self.sts_head == "linear" else "cosine_embedding")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of everything that changes the numbers (not the seed, paths or display)."""
        skip = {"seed", "name", "out_dir", "progress", "data_dir", "write_predictions"}
        d = {k: v for k, v in self.to_dict().items()
             if k not in skip and not (k in ADDED_LATER and v == ADDED_LATER[k])}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:8]

    @property
    def run_name(self) -> str:
        return f"{self.name or self.schedule}-{self.fingerprint()}-seed{self.seed}"


# knobs added after results were committed: at their default they stay out of the fingerprint,
# so the run names (and skip-if-complete) of earlier results do not change
ADDED_LATER = {"val_fraction": 0.0, "optimizer": "auto", "encoder_dropout": None, "snapshot_ensemble": 0,
               "para_swap": False, "layer_lr_decay": 1.0}
OPTIMIZERS = ("auto", "foreach", "fused", "forloop")


def lr_multiplier(epoch: int, decay: float, milestones) -> float:
    """Step decay: multiply by `decay` once for every milestone epoch already reached."""
    return decay ** sum(epoch >= m for m in milestones)


# ---------------------------------------------------------------------------
# setup


def pick_device(config: TrainConfig) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but CUDA is not available here")
        return torch.device("cuda")
    return torch.device("cpu")


def pick_amp(config: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether to use a GradScaler)."""
    p = config.precision
    if p == "auto":
        if device.type != "cuda":
            return None, False
        p = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if p == "fp32":
        return None, False
    if p == "fp16":
        if device.type != "cuda":
            raise ValueError("fp16 needs CUDA; use precision='bf16' or 'fp32' on CPU")
        return torch.float16, True
    return torch.bfloat16, False


_DATA_CACHE: dict = {}


def check_trainable(tasks: dict) -> None:
    """Train and dev splits need a label column and at least one usable row: name the file that lacks them."""
    from mtbert_utils.data import COLUMNS, FILES
    for t, td in tasks.items():
        label_col = COLUMNS[t][2]
        for split in ("train", "dev"):
            name = FILES[t][split] if FILES[t][split] in td.reports else FILES[t]["dev"]  # para train: carved from dev
            rep = td.reports[name]
            if not rep["labeled"]:
                raise ValueError(f"{rep['path']}: no {label_col!r} column, so the {t} {split} split has no labels")
            if not getattr(td, split):
                raise ValueError(f"{rep['path']}: no usable {t} {split} rows; skipped {rep['skipped']} "
                                 f"(first bad lines {rep['first_lines']})")


def prepare_data(config: TrainConfig, tokenizer) -> dict:
    """Load, subsample and tokenize the three tasks once per process (cached by what changes them)."""
    key = (config.data_dir, str(config.max_train), str(config.max_dev), config.seed, config.max_length,
           config.encoder if config.encoder not in ENCODER_NAMES else "bert-uncased", config.val_fraction)
    if key not in _DATA_CACHE:
        tasks = load_tasks(config.data_dir, max_train=config.max_train, max_dev=config.max_dev, seed=config.seed)
        check_trainable(tasks)
        val = {}
        if config.val_fraction:
            for t, td in tasks.items():
                td.train, val[t] = split_by_hash(td.train, 1 - config.val_fraction, salt="val:")
                td.sources["val"] = f"{td.sources['train']} (hash split, {config.val_fraction:.0%})"
                td.sources["train"] += f" (hash split, {1 - config.val_fraction:.0%})"
                if not td.train or not val[t]:
                    raise ValueError(f"val_fraction={config.val_fraction} leaves {t} with {len(td.train)} train "
                                     f"and {len(val[t])} validation examples; use more data or another fraction")
        enc = {split: {t: encode_task(getattr(td, split), tokenizer, t, config.max_length)
                       for t, td in tasks.items() if getattr(td, split)}
               for split in ("train", "dev", "test")}
        enc["val"] = {t: encode_task(v, tokenizer, t, config.max_length) for t, v in val.items()}
        info = {"sizes": {t: {**td.sizes, **({"val": len(val[t])} if val else {})} for t, td in tasks.items()},
                "sources": {t: td.sources for t, td in tasks.items()},
                "skipped": {name: rep["skipped"] for td in tasks.values() for name, rep in td.reports.items()}}
        _DATA_CACHE.clear()  # keep one data set in memory at a time
        _DATA_CACHE[key] = (enc, info)
    return _DATA_CACHE[key]


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


def encoder_depths(encoder: nn.Module) -> dict[str, int]:
    """Each encoder parameter's distance from the top, by name: 0 for the last transformer layer (and the
    pooler above it), L - 1 - i for layer i of L, L for the embeddings."""
    names = [n for n, _ in encoder.named_parameters()]
    layer = {n: int(m.group(1)) for n in names if (m := re.search(r"(?:^|\.)layer\.(\d+)\.", n))}
    if not layer:
        raise ValueError("layer_lr_decay needs an encoder with numbered layers (.layer.<i>.)")
    top = max(layer.values())
    return {n: top - layer[n] if n in layer else (top + 1 if "embeddings" in n else 0) for n in names}


def param_groups(model: MultitaskBert, config: TrainConfig) -> list[dict]:
    """Optimizer groups: one per module with its own learning rate (config.lr); with layer_lr_decay != 1
    the encoder is split further, one group per depth (see encoder_depths)."""
    groups = []
    for name, ps in model.module_groups().items():
        if not ps:
            continue
        if name == "encoder" and config.layer_lr_decay != 1.0:
            depth = encoder_depths(model.encoder)
            by_depth = {}
            for n, p in model.encoder.named_parameters():
                by_depth.setdefault(depth[n], []).append(p)
            for d in sorted(by_depth):
                lr = config.lr[name] * config.layer_lr_decay ** d
                groups.append({"params": by_depth[d], "lr": lr, "base_lr": lr, "name": f"encoder.depth{d}"})
            continue
        groups.append({"params": ps, "lr": config.lr[name], "base_lr": config.lr[name], "name": name})
    return groups


def build_optimizer(model: MultitaskBert, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, config)
    # auto: foreach on CPU, fused on CUDA (one kernel over all tensors instead of a Python loop)
    kind = config.optimizer if config.optimizer != "auto" else ("fused" if device.type == "cuda" else "foreach")
    kw = {"fused": {"fused": True}, "foreach": {"foreach": True}, "forloop": {"foreach": False}}[kind]
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay, **kw)


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


def checkpoint_signature(config: TrainConfig) -> dict:
    """What a checkpoint must match to be loaded into a model built from `config`."""
    return {"encoder": config.encoder, "pooling": config.pooling or default_pooling(config.encoder),
            "para_input": config.para_input, "sts_head": config.sts_head}


def load_checkpoint(path: str | Path, config: TrainConfig) -> dict:
    """Read a checkpoint and check that it belongs to a model like `config`'s."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
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


def _load_model_state(model, state, path):
    own = model.state_dict()
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = sorted(set(own) - set(state))
    if bad or missing:
        raise ValueError(f"checkpoint {path} does not fit this model: "
                         f"{'; '.join(bad[:5])}{' missing: ' + ', '.join(missing[:5]) if missing else ''}")
    model.load_state_dict(state)


def training_step(model, optimizer, batches: dict, config: TrainConfig, *, shared: list, device,
                  amp_dtype=None, scaler=None, class_weights=None, generator=None, reduce_fn=None,
                  averager=None, loss_scale: dict | None = None) -> dict:
    """One optimizer step on one batch per task: weighted combined loss, or PCGrad on per-task gradients.

    Data parallel (mtbert_utils.distributed): for plain steps `model` is the DDP wrapper; with PCGrad
    or gradient cosines it is the bare model and `averager` (a TaskGradientAverager) averages each
    task's gradient over the processes before the surgery, on every step, one-task steps included.
    loss_scale: task -> factor on its loss: this process's share of the global batch times the
    number of processes, so that averaging the gradients gives the global-batch mean.

    Returns {"losses": {task: unweighted loss}, "cosines": pairwise task-gradient cosines or None}.
    Raises NonFiniteLossError naming the task and batch when a loss is NaN or infinite.
    """
    with autocast_context(device, amp_dtype):
        outs = model(batches)
    losses, raw = {}, {}
    for t, batch in batches.items():
        loss = task_loss(t, outs[t], batch["labels"], config, class_weights)
        raw[t] = loss.item()
        if loss.requires_grad:  # cosine STS on a frozen encoder has nothing to train this epoch
            if loss_scale is not None:
                loss = loss * loss_scale[t]
            losses[t] = config.task_weights[t] * loss
    bad = [t for t in raw if not math.isfinite(raw[t])]
    if distributed.is_distributed():  # all processes stop at this step: one raising alone leaves the rest in a collective
        if distributed.all_reduce_sum_(torch.tensor([float(len(bad))], device=device)).item() and not bad:
            raise NonFiniteLossError(f"a non-finite loss on another process; process {distributed.rank()} stops too")
    if bad:
        t = bad[0]
        raise NonFiniteLossError(f"non-finite loss ({raw[t]}) for task {t!r} on process {distributed.rank()}; "
                                 f"batch ids start {batches[t]['ids'][:3]}")
    cosines = None
    if losses and (config.pcgrad or config.record_grad_cosines) and (len(losses) > 1 or averager is not None):
        if averager is not None:  # one all-reduce per task, inside pcgrad_backward
            reduce_fn = averager.for_tasks(losses)
        stats = pcgrad_backward(losses, shared, reduction=config.pcgrad_reduction if config.pcgrad else "sum",
                                generator=generator, scaler=scaler, project=config.pcgrad, reduce_fn=reduce_fn)
        cosines = stats["cosines"] if len(losses) > 1 else None
    elif losses:
        total = sum(losses.values())
        (scaler.scale(total) if scaler else total).backward()
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
    return {"losses": raw, "cosines": cosines}


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
    from torch.nn.parallel import DistributedDataParallel
    from tqdm.auto import tqdm

    config.validate()
    t_start = time.time()
    random.seed(config.seed)
    np.random.seed(config.seed)
    device = pick_device(config)
    distributed.init_from_env(device.type)  # no-op unless torchrun started more than one process
    world, rank, main = distributed.world_size(), distributed.rank(), distributed.is_main()
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())  # this process's GPU
    amp_dtype, use_scaler = pick_amp(config, device)
    out_dir = Path(config.out_dir)
    run_name = config.run_name if world == 1 else f"{config.run_name}-ddp{world}"  # another global batch
    ckpt_path = out_dir / "checkpoints" / run_name / "last.pt"
    result_path = out_dir / f"{run_name}.json"

    done = None
    if resume and main and result_path.exists():  # finished before: a re-run after a crash redoes nothing
        done = json.loads(result_path.read_text())
        if done.get("status") == "finished" and done.get("fingerprint") == config.fingerprint():
            done["result_path"] = str(result_path)
        else:
            done = None
    if resume:
        done = distributed.broadcast_object(done)  # rank 0 decides for every process
    if done is not None:
        return done

    tokenizer = load_tokenizer(config.encoder)
    enc, data_info = prepare_data(config, tokenizer)
    model = build_model(config).to(device)
    if rank > 0:
        torch.manual_seed(config.seed * 1000 + rank)  # own dropout masks on every process
    optimizer = build_optimizer(model, config, device)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    schedule = get_schedule(config.schedule, **config.schedule_params)
    class_w = sst_class_weights(enc["train"]["sst"].labels).to(device) if config.class_weights else None

    streams = {t: TaskBatchStream(enc["train"][t], config.batch_size, seed=config.seed * 1000 + i,
                                  pair_mode=model.pair_mode(t), group_by_length=config.group_by_length,
                                  rank=rank, world_size=world, swap_pairs=config.para_swap and t == "para")
               for i, t in enumerate(TASKS) if t in config.train_tasks}
    num_batches = {t: s.num_batches for t, s in streams.items()}
    sched_rng = random.Random(config.seed)
    pc_gen = torch.Generator().manual_seed(config.seed)
    history, seen, step, start_epoch, train_time = [], {t: 0 for t in TASKS}, 0, 0, 0.0
    # wall time of the sessions before this one (up to their last checkpoint), and how many there were;
    # None: resumed from a checkpoint written before it was recorded
    wall_before, resumes = 0.0, 0
    select = bool(config.val_fraction)  # score epochs on validation, keep the best epoch's weights
    best = {"epoch": None, "score": -math.inf, "model": None}
    snap_val = {}  # snapshot ensembles: epoch -> task -> raw validation outputs
    snap_dir = ckpt_path.parent
    sym = config.para_swap  # symmetric paraphrase inference
    # Data parallel: plain steps go through DDP; PCGrad (and gradient cosines) needs each task's
    # gradient averaged on its own before the surgery, which DDP cannot do (mtbert_utils.distributed).
    averager = None
    if world > 1 and (config.pcgrad or config.record_grad_cosines):
        averager = distributed.TaskGradientAverager({t: model.module_groups()[t] for t in TASKS})
    ddp, ddp_key = None, None

    if resume and distributed.broadcast_object(ckpt_path.exists()):  # every process loads rank 0's file
        ckpt = load_checkpoint(ckpt_path, config)
        _load_model_state(model, ckpt["model"], ckpt_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        for t, s in streams.items():
            s.load_state_dict(ckpt["streams"][t])
        schedule.load_state_dict(ckpt["schedule"])
        sched_rng.setstate(ckpt["sched_rng"])
        pc_gen.set_state(ckpt["pcgrad_gen"])
        rngs = ckpt.get("torch_rng_ranks")  # data parallel: one dropout rng per process
        torch.set_rng_state(rngs[rank] if rngs and len(rngs) == world else ckpt["torch_rng"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        history, seen, step = ckpt["history"], ckpt["seen"], ckpt["step"]
        best = ckpt.get("best") or best
        snap_val = {int(k): v for k, v in (ckpt.get("snapshot_val") or {}).items()}
        train_time, start_epoch = ckpt["train_time"], ckpt["epoch"] + 1
        wall_before, resumes = ckpt.get("wall_time"), ckpt.get("resumes", 0) + 1
    distributed.broadcast_module_(model)  # insurance: every process starts from rank 0's weights

    last_epoch = config.epochs if max_epochs is None else min(config.epochs, max_epochs)
    def budget_spent() -> bool:
        return config.examples_budget is not None and sum(seen.values()) >= config.examples_budget

    for epoch in range(start_epoch, last_epoch):
        if budget_spent():  # equal-budget runs end mid-schedule, at the epoch that spent the budget
            break
        trainable = config.encoder_trainable(epoch)
        model.set_encoder_trainable(trainable, config.freeze_word_embeddings)
        shared = [p for p in list(model.encoder.parameters()) + list(model.shared.parameters()) if p.requires_grad]
        if world > 1 and averager is None and ddp_key != [p.requires_grad for p in model.parameters()]:
            # DDP syncs the parameters that require grad when it wraps the model: re-wrap when they change.
            # find_unused_parameters: a step may leave heads (and the unused pooler) out of the graph.
            ddp, ddp_key = None, [p.requires_grad for p in model.parameters()]
            ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          find_unused_parameters=True)
        mult = lr_multiplier(epoch, config.lr_decay, config.lr_decay_epochs)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * mult
        model.train()

        n_steps = schedule.num_steps(num_batches, epoch)
        loss_sum, loss_n = {t: 0.0 for t in TASKS}, {t: 0 for t in TASKS}
        cos_log, trace = [], []
        trace_every = max(1, n_steps // 50)
        bar = tqdm(total=n_steps, desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=not (config.progress and main), leave=False)
        t_epoch = time.time()
        for i, tasks in enumerate(schedule.steps(num_batches, epoch, sched_rng)):
            batches, share = {}, {}
            for t in tasks:
                batch, n_global = next_global_batch(streams[t])
                share[t] = len(batch["ids"]) / n_global  # this process's part of the global batch
                if not batch["ids"]:  # a stand-in example, weighted 0: every process joins every collective
                    batch = collate(streams[t].enc, [0], streams[t].pair_mode)
                batches[t] = to_device(batch, device)
                seen[t] += n_global
            try:
                out = training_step(ddp if ddp is not None else model, optimizer, batches, config, shared=shared,
                                    device=device, amp_dtype=amp_dtype, scaler=scaler, class_weights=class_w,
                                    generator=pc_gen, averager=averager,
                                    loss_scale={t: share[t] * world for t in tasks} if world > 1 else None)
            except NonFiniteLossError as e:
                raise NonFiniteLossError(f"{e} at epoch {epoch + 1}, step {i + 1} (global step {step + 1}). "
                                         f"The last good checkpoint ({ckpt_path}) was kept; "
                                         f"no result was written.") from None
            for t, v in out["losses"].items():
                loss_sum[t] += v * share[t]
                loss_n[t] += 1
            if out["cosines"] is not None:
                cos_log.append(out["cosines"])
            step += 1
            if i % trace_every == 0 or i == n_steps - 1:
                trace.append([step, *(seen[t] for t in TASKS)])
            bar.set_postfix({t: f"{loss_sum[t] / max(loss_n[t], 1):.3f}" for t in TASKS if loss_n[t]})
            bar.update()
            if budget_spent():
                trace.append([step, *(seen[t] for t in TASKS)])
                break
        bar.close()
        epoch_time = time.time() - t_epoch
        train_time += epoch_time

        if world > 1:  # the processes' shares of every step's loss add up to the global-batch loss
            sums = torch.tensor([loss_sum[t] for t in TASKS], dtype=torch.float64, device=device)  # nccl: on GPU
            sums = distributed.all_reduce_sum_(sums)
            loss_sum = dict(zip(TASKS, sums.tolist()))
        # rank 0 evaluates, the others wait for its scores (an adaptive schedule needs them everywhere);
        # with a validation split, epochs are scored on it and dev stays unseen until the end
        split = "val" if select else "dev"
        ev = None
        if main:
            ev = evaluate(model, enc[split], config.eval_batch_size, device, amp_dtype,
                          return_predictions=True, symmetric=sym)
            if config.snapshot_ensemble:  # this epoch's weights are a candidate member
                snap_val[epoch + 1] = {t: p["raw"].tolist() for t, p in ev["predictions"].items()}
                save_torch(snap_dir / f"epoch{epoch + 1}.pt", model.state_dict())
        dev = distributed.broadcast_object(ev["metrics"] if main else None)
        record = {"epoch": epoch + 1, "steps": step, "encoder_trainable": trainable, "lr_multiplier": mult,
                  "train_loss": {t: loss_sum[t] / loss_n[t] for t in TASKS if loss_n[t]},
                  "examples_seen": dict(seen), "seen_trace": trace, split: dev, "epoch_time_s": epoch_time}
        if select and main and dev["mean"] > best["score"]:
            best = {"epoch": epoch + 1, "score": dev["mean"],
                    "model": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}
        if cos_log:
            record["grad_cosines"] = summarize_cosines(cos_log)
        history.append(record)
        if config.progress and main:
            tqdm.write(f"epoch {epoch + 1} {split}: " + " ".join(f"{k} {v:.3f}" for k, v in dev.items()))
        # update before saving: the checkpoint must hold the adaptive schedule's latest dev scores
        schedule.update({t: dev[t] for t in TASKS if t in dev})
        # everything but the dropout rngs is the same on every process: rank 0 writes it
        rngs = {"torch_rng_ranks": distributed.all_gather_object(torch.get_rng_state())} if world > 1 else {}
        if main:
            save_torch(ckpt_path, {
                "epoch": epoch, "step": step, "seen": seen, "history": history, "train_time": train_time,
                "wall_time": None if wall_before is None else wall_before + time.time() - t_start,
                "resumes": resumes,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "streams": {t: s.state_dict() for t, s in streams.items()}, "schedule": schedule.state_dict(),
                "sched_rng": sched_rng.getstate(), "pcgrad_gen": pc_gen.get_state(),
                "torch_rng": torch.get_rng_state(), "scaler": scaler.state_dict() if scaler else None,
                "signature": checkpoint_signature(config), "config": config.to_dict(), **rngs,
                **({"best": best} if select else {}),
                **({"snapshot_val": snap_val} if config.snapshot_ensemble else {})})
        distributed.barrier()  # no process moves on (or returns) before the checkpoint is complete

    if last_epoch < config.epochs and not budget_spent():
        return {"status": "interrupted", "history": history, "checkpoint": str(ckpt_path)}

    total_seen = sum(seen.values())
    selection, dev_eval, test_eval, ensemble = None, None, None, None
    if select and config.snapshot_ensemble:  # per task, an ensemble of epochs chosen on validation
        if main:
            ensemble, dev_eval, test_eval = snapshot_ensemble(model, enc, snap_val, snap_dir, config, device,
                                                              amp_dtype)
        final_dev = distributed.broadcast_object(dev_eval["metrics"] if main else None)
    elif select:  # the best epoch on validation, scored on dev once (predictions kept for the files below)
        if main:
            _load_model_state(model, best["model"], ckpt_path)
            dev_eval = evaluate(model, enc["dev"], config.eval_batch_size, device, amp_dtype,
                                return_predictions=True, symmetric=sym)
        distributed.broadcast_module_(model)
        final_dev = distributed.broadcast_object(dev_eval["metrics"] if main else None)
    if select:
        selection = {"split": "val", "metric": "mean", "epoch": best["epoch"],
                     "val": history[best["epoch"] - 1]["val"], "val_fraction": config.val_fraction,
                     **({"snapshot_ensemble": ensemble} if ensemble is not None else {})}
    else:
        final_dev = history[-1]["dev"]
    result = {
        "status": "finished", "run_name": run_name, "config": config.to_dict(),
        "fingerprint": config.fingerprint(), "seed": config.seed,
        "encoder": {"name": config.encoder, "pooling": config.pooling or default_pooling(config.encoder),
                    "parameters": sum(p.numel() for p in model.encoder.parameters())},
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(0),
        "precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
        "data": data_info, "num_batches": num_batches, "history": history,
        "dev": final_dev, **({"selection": selection} if selection else {}), "steps": step, "examples_seen": seen,
        # wall_time_s: every session's, up to its last checkpoint (this one's to the end); wall_time_complete
        # is False when an earlier session's could not be counted (a checkpoint older than this record)
        "train_time_s": train_time, "wall_time_s": (wall_before or 0.0) + time.time() - t_start,
        "wall_time_complete": wall_before is not None, "resumes": resumes,
        "train_examples_per_s": total_seen / train_time if train_time else None,
        "environment": environment(),
    }
    if world > 1:
        result["distributed"] = {"world_size": world, "backend": torch.distributed.get_backend(),
                                 "batch_size_per_process": config.batch_size,
                                 "global_batch_size": world * config.batch_size}
    if config.write_predictions and main:
        pred_dir = out_dir / "predictions" / run_name
        kept = {"dev": dev_eval, "test": test_eval}
        for split in ("dev", "test"):
            if enc[split]:
                out = kept[split] if kept[split] is not None else evaluate(
                    model, enc[split], config.eval_batch_size, device, amp_dtype, return_predictions=True,
                    symmetric=sym)
                write_predictions(out["predictions"], pred_dir, split)
        result["predictions_dir"] = str(pred_dir)
    if main:
        write_json(result_path, result)
    distributed.barrier()
    result["result_path"] = str(result_path)
    return result


def snapshot_ensemble(model, enc: dict, snap_val: dict, snap_dir: Path, config: TrainConfig, device,
                      amp_dtype=None) -> tuple[dict, dict, dict]:
    """The end of a run with config.snapshot_ensemble: per task, choose epochs on validation
    (evaluation.select_members), then predict dev and test with each chosen epoch's weights and
    average. Returns (what was chosen, with each member's own dev scores; dev {"metrics",
    "predictions"}; test {"predictions"} or None)."""
    tasks = [t for t in TASKS if t in enc["val"]]
    chosen = {t: select_members(t, {e: np.asarray(snap_val[e][t]) for e in sorted(snap_val)},
                                enc["val"][t].labels.numpy(), model.sts_head_kind, config.snapshot_ensemble)
              for t in tasks}
    epochs = sorted({e for c in chosen.values() for e in c["members"]})
    preds = {"dev": {}, "test": {}}
    for e in epochs:
        path = snap_dir / f"epoch{e}.pt"
        _load_model_state(model, torch.load(path, map_location="cpu", weights_only=True), path)
        for split in preds:
            need = {t: enc[split][t] for t in tasks if t in enc[split] and e in chosen[t]["members"]}
            if need:
                preds[split][e] = evaluate(model, need, config.eval_batch_size, device, amp_dtype,
                                           return_predictions=True, symmetric=config.para_swap)["predictions"]
    out = {}
    for split in preds:
        out[split] = {t: ensemble_prediction(t, [preds[split][e][t] for e in chosen[t]["members"]],
                                             model.sts_head_kind)
                      for t in tasks if t in enc[split]}
    metrics = add_summary_metrics({t: score(t, p["pred"], enc["dev"][t]) for t, p in out["dev"].items()})
    info = {t: {"epochs": c["members"], "val": c["val"], "val_by_k": c["val_by_k"],
                "val_single": {str(e): v for e, v in c["single"].items()},
                "dev_single": {str(e): score(t, preds["dev"][e][t]["pred"], enc["dev"][t]) for e in c["members"]}}
            for t, c in chosen.items()}
    return info, {"metrics": metrics, "predictions": out["dev"]}, ({"predictions": out["test"]} if out["test"] else None)


def next_global_batch(stream: TaskBatchStream) -> tuple[dict, int]:
    """(this process's chunk of the stream's next global batch, the global batch's size).

    With one process the chunk is the whole batch. A chunk is empty when the last
    global batch of a pass has fewer examples than there are processes.
    """
    n_global = len(stream.order[stream.position])
    return next(stream), n_global


def summarize_cosines(cos_log: list[dict]) -> dict:
    """Per task pair: mean cosine, fraction of steps in conflict (cos < 0), and the per-step values."""
    out = {}
    pairs = sorted({pair for c in cos_log for pair in c})
    for pair in pairs:
        vals = np.array([c[pair] for c in cos_log if pair in c], dtype=float)
        out[pair] = {"mean": float(vals.mean()), "conflict_rate": float((vals < 0).mean()),
                     "values": [round(float(v), 5) for v in vals]}
    return out
