"""TrainConfig: every knob of a run, in five sections (model, data, schedule, optimisation, run).

Defaults reproduce the study's tuned setup; the other presets (baseline, best, the benchmark's
lever sets) live in `presets.py`. The run name is `{name or schedule}-{fingerprint}-seed{seed}`:
the fingerprint hashes every field that changes the numbers, so an equal name means an equal run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field

from mtbert_utils import TASKS
from mtbert_utils.model import ENCODER_NAMES, PARA_INPUTS, POOLINGS
from mtbert_utils.schedules import SCHEDULES, get_schedule
from mtbert_utils.tasks import STS_LOSSES

LR_KEYS = ("encoder", "shared", "sst", "para", "sts")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
OPTIMIZERS = ("auto", "foreach", "fused", "forloop")

# knobs added after results were committed: at their default they stay out of the fingerprint,
# so the run names (and skip-if-complete) of earlier results do not change
ADDED_LATER = {"val_fraction": 0.0, "optimizer": "auto", "encoder_dropout": None, "snapshot_ensemble": 0,
               "para_swap": False, "layer_lr_decay": 1.0, "cache_frozen_encoder": False}
# how a run executes, not what it computes: the same run names on CPU and GPU (issue 12). Their values are
# still in the result JSON's config. (pad_to_multiple: masked positions; tf32 and cuda_graphs: rounding only;
# fuse_tasks: masked positions, and the dropout masks drawn in another order, as a longer padding draws them.)
EXECUTION_ONLY = ("pad_to_multiple", "tf32", "cuda_graphs", "fuse_tasks")
# what does not change the numbers: out of the fingerprint
NOT_FINGERPRINTED = ("seed", "name", "out_dir", "progress", "data_dir", "write_predictions", *EXECUTION_ONLY)


@dataclass
class TrainConfig:
    """Every knob of a run. Defaults reproduce the study's tuned setup; `baseline()` its plain one."""
    # -- model ------------------------------------------------------------------------
    encoder: str = "minilm"            # 'minilm' (offline default), 'tiny' (tests), or a HF id / local path
    pooling: str | None = None         # mean | cls | pooler; None = the encoder's default
    dropout: float = 0.3               # dropout of the heads
    encoder_dropout: float | None = None  # dropout inside the encoder; None: the checkpoint's own (0.1)
    para_input: str = "joint"          # joint: [CLS] a [SEP] b [SEP]; separate: [u; v]; sbert: [u; v; |u-v|; u*v]
    sts_head: str = "cosine"           # cosine (the study's extension) | linear (its baseline)
    sts_loss: str | None = None        # mse | cosine_embedding | sbert_mse; None = mse (linear) / cosine_embedding (cosine)
    sts_threshold: float = 2.5         # cosine-embedding loss: gold score >= threshold counts as a similar pair
    sts_margin: float = 0.0            # cosine-embedding loss margin for dissimilar pairs
    class_weights: bool = False        # inverse-frequency class weights for SST cross-entropy
    attn_implementation: str = "sdpa"  # sdpa | eager
    compile: bool = False              # torch.compile the encoder
    cache_frozen_encoder: bool = False  # heads-only epochs: the frozen encoder runs in eval mode (no dropout)
                                       # and each training example's pooled output is computed once per
                                       # frozen phase, then reused. Equal to the uncached run when the
                                       # encoder has no dropout (encoder_dropout=0.0); else it removes the
                                       # encoder's dropout noise from those epochs, so it is fingerprinted
    # -- data -------------------------------------------------------------------------
    data_dir: str | None = None        # None: $MTBERT_DATA_DIR, else ./data
    max_train: int | dict | None = None  # per-task cap on training examples (seeded subsample)
    max_dev: int | dict | None = None
    max_length: int = 128
    val_fraction: float = 0.0          # > 0: carve this share of each train split (by id hash) as validation;
                                       # epochs are scored on it, the best epoch's weights are kept and dev is
                                       # scored once, at the end, with them (honest model selection)
    para_swap: bool = False            # joint paraphrase pairs: train on both orders (a, b) / (b, a) at random,
                                       # predict with the average of both orders
    group_by_length: bool = True       # batches of similar length: less padding
    pad_to_multiple: int | None = None  # pad every batch's length up to a multiple of this (8, 16, ...): fewer
                                       # distinct shapes (bf16 attention's first-use cost, CUDA-graph buckets);
                                       # the extra positions are masked, so the numbers do not change
    batch_size: int = 64
    eval_batch_size: int = 128
    # -- schedule: which tasks train, in which steps, for how long ----------------------
    train_tasks: list = field(default_factory=lambda: list(TASKS))  # a subset gives single-task reference runs
    schedule: str = "rr_over"          # a name in schedules.SCHEDULES
    schedule_params: dict = field(default_factory=dict)
    task_weights: dict = field(default_factory=lambda: {"sst": 1.0, "para": 1.0, "sts": 1.0})
    # phases of [epochs, encoder trainable]: 5 heads only, 20 full, 5 heads only
    phases: list = field(default_factory=lambda: [[5, False], [20, True], [5, False]])
    examples_budget: int | None = None  # stop once this many training examples (all tasks) were seen
    # -- optimisation -----------------------------------------------------------------
    lr: dict = field(default_factory=lambda: {"encoder": 2e-5, "shared": 1e-4, "sst": 9.5e-4,
                                              "para": 1e-4, "sts": 4e-5})
    lr_decay: float = 0.7              # multiply every learning rate by this ...
    lr_decay_epochs: list = field(default_factory=lambda: [5, 25])  # ... at the start of these epochs
    layer_lr_decay: float = 1.0        # layer-wise lr decay: encoder layer i of L learns at lr["encoder"] *
                                       # this ** (L - 1 - i), the embeddings at ** L (1.0: one encoder lr)
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    pcgrad: bool = False               # combine the task gradients with PCGrad (gradients.GRAD_METHODS
                                       # "pcgrad") instead of summing them ("sum"); see grad_method
    pcgrad_reduction: str = "mean"     # mean (the implementation the study used) | sum (the paper)
    record_grad_cosines: bool = False  # log task-gradient cosines even without surgery
    optimizer: str = "auto"            # AdamW implementation: auto (fused on CUDA, foreach on CPU) | foreach |
                                       # fused | forloop
    precision: str = "auto"            # auto: fp32 on CPU and on CUDA. On an H100 train() ran at 1,702
                                       # examples/s in fp32 against 198 in bf16 autocast (issue 12); the CUDA
                                       # benchmark measures both again (python -m mtbert_utils.bench --device cuda)
    tf32: bool = False                 # CUDA, fp32 matmuls on TF32 tensor cores (torch's backend flags, set for
                                       # the run and restored after); no effect on CPU
    cuda_graphs: bool = False          # CUDA only: torch.compile(mode="reduce-overhead") on the forward pass,
                                       # one CUDA graph per padded shape (needs pad_to_multiple); on CPU
                                       # train() stops with a ValueError
    fuse_tasks: bool = False           # a step's task batches go through the encoder in one call (padded to the
                                       # longest) instead of one call per task: a third of the kernel launches on
                                       # a launch-bound GPU, one CUDA graph per step. Steps that take each task's
                                       # gradient on its own (PCGrad, record_grad_cosines) keep one call per task
    freeze_word_embeddings: bool = False
    # -- run --------------------------------------------------------------------------
    seed: int = 0
    name: str | None = None            # prefix of the run name; default: the schedule
    out_dir: str = "results/runs"
    snapshot_ensemble: int = 0         # > 0 (needs val_fraction): keep every epoch's weights; per task, average
                                       # the outputs of the top-k epochs on validation, k <= this, chosen on
                                       # validation too; dev and test are predicted by that ensemble
    write_predictions: bool = False    # CS224N prediction files for dev and test
    progress: bool = True
    device: str = "auto"               # auto | cpu | cuda

    @classmethod
    def baseline(cls, **overrides) -> "TrainConfig":
        """The study's plain setup (presets.BASELINE): full fine-tuning, one learning rate, linear STS head."""
        from mtbert_utils.presets import BASELINE
        return cls(**{**BASELINE, **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        check_keys(d)
        return cls(**d)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Fail early, with the offending value, before any model is loaded."""
        _validate_model(self)
        _validate_data(self)
        _validate_schedule(self)
        _validate_optimisation(self)
        _validate_run(self)

    # -- derived ----------------------------------------------------------------------
    @property
    def epochs(self) -> int:
        return int(sum(int(p[0]) for p in self.phases))

    @property
    def grad_method(self) -> str:
        """The gradients.GRAD_METHODS entry that combines the task gradients. Derived from the `pcgrad` field
        (not a field of its own), so the config dict and the run names of earlier results stay as they were."""
        return "pcgrad" if self.pcgrad else "sum"

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
        d = {k: v for k, v in self.to_dict().items()
             if k not in NOT_FINGERPRINTED and not (k in ADDED_LATER and v == ADDED_LATER[k])}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:8]

    @property
    def run_name(self) -> str:
        return self.named(self.name or self.schedule)

    def named(self, prefix: str) -> str:
        """The run name of this config under another prefix (the zero-shot floor: 'zero-shot')."""
        return f"{prefix}-{self.fingerprint()}-seed{self.seed}"


def check_keys(d: dict) -> None:
    """Raise on keys that are not TrainConfig fields, listing the valid ones."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(names)}")


# ---------------------------------------------------------------------------
# validation, one function per section


def _is_number(v) -> bool:
    """An int or a float, not a bool (True is an int to Python, not a number to a config)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_count(v, low) -> bool:
    """An int >= low, not a bool."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _positive(name, v):
    if not _is_number(v) or not v > 0 or not math.isfinite(v):
        raise ValueError(f"{name} must be a positive number, got {v!r}")


def _fraction(name, v, what="in [0, 1)"):
    if not _is_number(v) or not 0 <= v < 1:
        raise ValueError(f"{name} must be {what}, got {v!r}")


def _number(name, v, low=-math.inf, what="a number"):
    """A finite int or float (not a bool) >= low."""
    if not _is_number(v) or not math.isfinite(v) or v < low:
        raise ValueError(f"{name} must be {what}, got {v!r}")


def _count(name, v, low=1, allow_none=False):
    """An int (not a bool) >= low, or None where allowed."""
    if v is None and allow_none:
        return
    if not _is_count(v, low):
        raise ValueError(f"{name} must be {'None or ' if allow_none else ''}an int >= {low}, got {v!r}")


def _choice(name, v, choices, allow_none=False):
    if not (v is None and allow_none) and (not isinstance(v, str) or v not in choices):
        raise ValueError(f"unknown {name} {v!r}; choose one of {sorted(choices)}{' or None' if allow_none else ''}")


# switches: True or False only (a JSON 1 or "false" would pass a truth test and change the run's name)
BOOL_FIELDS = ("class_weights", "compile", "cache_frozen_encoder", "para_swap", "group_by_length", "pcgrad",
               "record_grad_cosines", "tf32", "cuda_graphs", "fuse_tasks", "freeze_word_embeddings",
               "write_predictions", "progress")


def _validate_model(c: TrainConfig) -> None:
    if not isinstance(c.encoder, str) or not c.encoder:
        raise ValueError(f"encoder must be one of {ENCODER_NAMES}, a HF id or a path, got {c.encoder!r}")
    _fraction("dropout", c.dropout)
    if c.encoder_dropout is not None:
        _fraction("encoder_dropout", c.encoder_dropout, "None or in [0, 1)")
    _choice("pooling", c.pooling, POOLINGS, allow_none=True)
    _choice("para_input", c.para_input, PARA_INPUTS)
    _choice("sts_head", c.sts_head, ("cosine", "linear"))
    _choice("sts_loss", c.sts_loss, STS_LOSSES, allow_none=True)
    _number("sts_threshold", c.sts_threshold)
    _number("sts_margin", c.sts_margin)
    if not isinstance(c.attn_implementation, str):
        raise ValueError(f"attn_implementation must be a name such as 'sdpa' or 'eager', got {c.attn_implementation!r}")
    if c.sts_head == "linear" and c.sts_loss not in (None, "mse"):
        raise ValueError("the linear STS head is trained with sts_loss='mse'")


def _validate_data(c: TrainConfig) -> None:
    _count("batch_size", c.batch_size)
    _count("eval_batch_size", c.eval_batch_size)
    _count("max_length", c.max_length)
    for name in ("max_train", "max_dev"):
        v = getattr(c, name)
        vals = v.values() if isinstance(v, dict) else [v]
        if any(x is not None and not _is_count(x, 1) for x in vals) \
                or (isinstance(v, dict) and set(v) - set(TASKS)):
            raise ValueError(f"{name} must be None, a positive int, or a dict task -> positive int; got {v!r}")
    _fraction("val_fraction", c.val_fraction)
    _count("pad_to_multiple", c.pad_to_multiple, allow_none=True)  # 8, 16, ...


def _validate_schedule(c: TrainConfig) -> None:
    _choice("schedule", c.schedule, SCHEDULES)
    if not isinstance(c.schedule_params, dict):
        raise ValueError(f"schedule_params must be a dict of the schedule's parameters, got {c.schedule_params!r}")
    if not isinstance(c.train_tasks, (list, tuple)) or not c.train_tasks or any(t not in TASKS for t in c.train_tasks) \
            or len(set(c.train_tasks)) != len(c.train_tasks):
        raise ValueError(f"train_tasks must be a non-empty list of distinct tasks from {TASKS}, "
                         f"got {c.train_tasks!r}")
    if not isinstance(c.task_weights, dict) or set(c.task_weights) != set(TASKS):
        raise ValueError(f"task_weights needs a dict with the keys {TASKS}, got {c.task_weights!r}")
    for k, v in c.task_weights.items():
        _number(f"task_weights[{k!r}]", v, 0, "a number >= 0")
    if not isinstance(c.phases, (list, tuple)) or not c.phases \
            or any(not isinstance(p, (list, tuple)) or len(p) != 2 or not _is_count(p[0], 0)
                   or not isinstance(p[1], bool) for p in c.phases) \
            or c.epochs < 1:
        raise ValueError(f"phases must be a list of [epochs, encoder_trainable] with >= 1 epoch in all, "
                         f"got {c.phases!r}")
    _count("examples_budget", c.examples_budget, allow_none=True)
    try:  # the schedule's own checks, on its params and the tasks it will see (else they fail after loading)
        get_schedule(c.schedule, **c.schedule_params).num_steps({t: 1 for t in c.train_tasks}, epoch=1)
    except (TypeError, ValueError) as e:
        raise ValueError(f"schedule {c.schedule!r} with schedule_params={c.schedule_params!r} and "
                         f"train_tasks={list(c.train_tasks)!r}: {e}") from None


def _validate_optimisation(c: TrainConfig) -> None:
    if not isinstance(c.lr, dict) or set(c.lr) != set(LR_KEYS):
        raise ValueError(f"lr needs exactly the keys {LR_KEYS} (a dict of learning rates), got {c.lr!r}")
    for k, v in c.lr.items():
        _positive(f"lr[{k!r}]", v)
    for name in ("lr_decay", "layer_lr_decay"):
        if not _is_number(getattr(c, name)) or not 0 < getattr(c, name) <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {getattr(c, name)!r}")
    if not isinstance(c.lr_decay_epochs, (list, tuple)) \
            or any(not _is_count(e, 0) for e in c.lr_decay_epochs):
        raise ValueError(f"lr_decay_epochs must be a list of epoch numbers (ints >= 0), got {c.lr_decay_epochs!r}")
    _number("weight_decay", c.weight_decay, 0, "a number >= 0")
    if c.max_grad_norm is not None:
        _positive("max_grad_norm", c.max_grad_norm)
    _choice("pcgrad_reduction", c.pcgrad_reduction, ("mean", "sum"))
    _choice("precision", c.precision, PRECISIONS)
    _choice("optimizer", c.optimizer, OPTIMIZERS)
    if c.cuda_graphs and not c.pad_to_multiple:
        raise ValueError("cuda_graphs records one graph per batch shape: set pad_to_multiple (e.g. 16) too, "
                         "else every new padded length compiles a new graph")
    if c.precision == "fp16" and c.device == "cpu":
        raise ValueError("precision='fp16' needs CUDA; device='cpu' was asked for (use 'bf16' or 'fp32' on CPU)")
    if c.cuda_graphs and c.device == "cpu":
        raise ValueError("cuda_graphs=True needs CUDA; device='cpu' was asked for")


def _validate_run(c: TrainConfig) -> None:
    for name in BOOL_FIELDS:
        if not isinstance(getattr(c, name), bool):
            raise ValueError(f"{name} must be True or False, got {getattr(c, name)!r}")
    _count("seed", c.seed, 0)
    if c.name is not None and (not isinstance(c.name, str) or not c.name):
        raise ValueError(f"name must be None or a non-empty string, got {c.name!r}")
    for name in ("out_dir", "data_dir"):
        v = getattr(c, name)
        if not (v is None and name == "data_dir") and not isinstance(v, (str, os.PathLike)):
            raise ValueError(f"{name} must be a folder path, got {v!r}")
    _count("snapshot_ensemble", c.snapshot_ensemble, 0)
    if c.snapshot_ensemble and not c.val_fraction:
        raise ValueError("snapshot_ensemble chooses its members on validation: set val_fraction > 0")
    _choice("device", c.device, ("auto", "cpu", "cuda"))
