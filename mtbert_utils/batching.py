"""Batching: tokenize each task once, then pad per batch.

    encode_task (tokenize once) -> collate (pad a batch) / batch_indices (which examples, grouped by length) /
    TaskBatchStream (an endless, resumable per-task stream; data-parallel aware) / eval_batches
    A run's data: load_run_tasks (read, subsample, carve validation) -> prepare_data (tokenized, once per process)
"""
from __future__ import annotations

import math
import numbers
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from mtbert_utils import TASKS
from mtbert_utils.data import COLUMNS, FILES, _check_task, file_digests, load_tasks, split_by_hash
from mtbert_utils.config import TrainConfig
from mtbert_utils.model import ENCODER_NAMES, pair_mode as task_pair_mode

PAIR_MODES = ("joint", "separate", "both")


@dataclass
class EncodedTask:
    """A task's examples tokenized once, unpadded; collate pads per batch."""
    task: str
    ids: list
    labels: torch.Tensor | None          # long for sst, float for para/sts; None if unlabeled
    single: list | None = None           # sst: [CLS] s [SEP]
    joint: list | None = None            # pair tasks: [CLS] a [SEP] b [SEP]
    joint_types: list | None = None      # token type ids for joint
    a: list | None = None                # pair tasks: [CLS] a [SEP]
    b: list | None = None                # pair tasks: [CLS] b [SEP]
    pad_id: int = 0

    def __len__(self):
        return len(self.ids)

    def swapped_joint(self, i):
        """Example i as [CLS] b [SEP] a [SEP] (token types 0 for b, 1 for a), or None where the
        joint encoding was truncated (then the two orders do not hold the same tokens)."""
        a, b = self.a[i], self.b[i]
        if len(a) + len(b) - 1 != len(self.joint[i]):
            return None
        return b + a[1:], [0] * len(b) + [1] * (len(a) - 1)

    def lengths(self, pair_mode="joint"):
        """Per-example token cost, for length grouping."""
        if self.single is not None:
            return [len(s) for s in self.single]
        if pair_mode == "joint":
            return [len(s) for s in self.joint]
        if pair_mode == "separate":
            return [len(x) + len(y) for x, y in zip(self.a, self.b)]
        if pair_mode == "both":
            return [len(j) + len(x) + len(y) for j, x, y in zip(self.joint, self.a, self.b)]
        raise ValueError(f"unknown pair_mode {pair_mode!r}; valid: {PAIR_MODES}")


def encode_task(examples, tokenizer, task, max_length=128):
    """Tokenize every field in one batched call (no padding), truncating to max_length."""
    _check_task(task)
    kw = dict(truncation=True, max_length=max_length, padding=False)
    labeled = bool(examples) and all(ex.label is not None for ex in examples)
    labels = None
    if labeled:
        labels = torch.tensor([ex.label for ex in examples], dtype=torch.long if task == "sst" else torch.float)
    enc = EncodedTask(task, [ex.id for ex in examples], labels,
                      pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    a = [ex.text_a for ex in examples]
    if task == "sst":
        enc.single = tokenizer(a, **kw)["input_ids"] if examples else []
        return enc
    b = [ex.text_b for ex in examples]
    if not examples:
        enc.joint, enc.joint_types, enc.a, enc.b = [], [], [], []
        return enc
    joint = tokenizer(a, b, return_token_type_ids=True, **kw)
    enc.joint, enc.joint_types = joint["input_ids"], joint["token_type_ids"]
    enc.a, enc.b = tokenizer(a, **kw)["input_ids"], tokenizer(b, **kw)["input_ids"]
    return enc


def _pad(seqs, value, multiple=None):
    """(tensor padded to the longest seq in this batch, rounded up to `multiple` if given; attention mask)."""
    width = max((len(s) for s in seqs), default=0)
    if multiple:
        width = -(-width // multiple) * multiple
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return out, mask


def collate(enc, indices, pair_mode="joint", swap=None, pad_to_multiple=None):
    """Batch of enc at indices, padded to the batch's longest sequence (rounded up to pad_to_multiple).

    swap: optional booleans, one per index: those pairs go into the joint input as
    [CLS] b [SEP] a [SEP] (pair-order augmentation / symmetric inference); kept as batch["swap"].
    """
    m = pad_to_multiple
    if pair_mode not in PAIR_MODES:
        raise ValueError(f"unknown pair_mode {pair_mode!r}; valid: {PAIR_MODES}")
    indices = [int(i) for i in indices]
    if swap is not None and len(swap) != len(indices):
        raise ValueError(f"swap has {len(swap)} flags for {len(indices)} examples")
    batch = {}
    if enc.single is not None:
        batch["input_ids"], batch["attention_mask"] = _pad([enc.single[i] for i in indices], enc.pad_id, m)
    else:
        if pair_mode in ("joint", "both"):
            joint = [(enc.joint[i], enc.joint_types[i]) for i in indices]
            if swap is not None:
                joint = [(enc.swapped_joint(i) or j) if s else j for i, j, s in zip(indices, joint, swap)]
            batch["input_ids"], batch["attention_mask"] = _pad([j[0] for j in joint], enc.pad_id, m)
            batch["token_type_ids"], _ = _pad([j[1] for j in joint], 0, m)
        if pair_mode in ("separate", "both"):
            batch["input_ids_a"], batch["attention_mask_a"] = _pad([enc.a[i] for i in indices], enc.pad_id, m)
            batch["input_ids_b"], batch["attention_mask_b"] = _pad([enc.b[i] for i in indices], enc.pad_id, m)
    if enc.labels is not None:
        batch["labels"] = enc.labels[indices]
    batch["ids"] = [enc.ids[i] for i in indices]
    batch["index"] = torch.tensor(indices, dtype=torch.long)
    if swap is not None:
        batch["swap"] = [bool(x) for x in swap]
    return batch


def batch_indices(n, batch_size, rng=None, lengths=None, group_by_length=False):
    """Cut range(n) into batches. rng (random.Random) shuffles; None keeps order.

    group_by_length: shuffle, sort by length inside windows of 50 batches, cut, shuffle
    the batches (bucketing: batches of similar lengths, little padding, still random).
    Without rng it sorts fully by length (evaluation).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = list(range(n))
    if rng is not None:
        rng.shuffle(order)
    if not group_by_length:
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if lengths is None or len(lengths) != n:
        raise ValueError("group_by_length needs one length per example")
    if rng is None:
        order.sort(key=lambda i: lengths[i])  # stable: ties keep file order
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    window = 50 * batch_size
    batches = []
    for w in range(0, n, window):
        chunk = sorted(order[w:w + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)  # else every window would run short-to-long
    return batches


class TaskBatchStream:
    """Endless, reshuffling batch iterator for one task; the trainer keeps one per task.
    Exact resume via state_dict.

    Data parallel: every rank builds the same global batches of batch_size * world_size
    from one permutation (same seed) and yields its rank-th contiguous chunk
    (np.array_split), so the ranks together see each example once per pass. A chunk
    is empty only if the last global batch has fewer than world_size examples.
    """

    def __init__(self, enc, batch_size, seed, pair_mode="joint", group_by_length=False,
                 rank=0, world_size=1, swap_pairs=False, pad_to_multiple=None):
        if len(enc) == 0:
            raise ValueError(f"task {enc.task!r} has no examples to batch")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.enc, self.batch_size, self.seed = enc, batch_size, seed
        self.pair_mode, self.group_by_length = pair_mode, group_by_length
        self.rank, self.world_size = rank, world_size
        self.pad_to_multiple = pad_to_multiple
        # pair-order augmentation: each joint pair is fed as (b, a) with probability 1/2, drawn from
        # (seed, pass, position) so that a resumed stream swaps exactly as the uninterrupted one
        self.swap_pairs = bool(swap_pairs) and enc.single is None and pair_mode == "joint"
        self.lengths = enc.lengths(pair_mode) if group_by_length else None
        self.num_batches = math.ceil(len(enc) / (batch_size * world_size))
        self.rng = random.Random(seed)
        self.passes = 0      # completed passes
        self.position = 0    # next batch in the current pass
        self._new_pass()

    def _new_pass(self):
        self.order = batch_indices(len(self.enc), self.batch_size * self.world_size, self.rng,
                                   self.lengths, self.group_by_length)
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.order[self.position]
        chunk = np.array_split(np.asarray(batch), self.world_size)[self.rank]
        swap = None
        if self.swap_pairs:  # drawn for the global batch, so every rank agrees
            flips = np.random.default_rng([self.seed, self.passes, self.position]).random(len(batch)) < 0.5
            swap = np.array_split(flips, self.world_size)[self.rank].tolist()
        self.position += 1
        if self.position == len(self.order):  # pass done: reshuffle now so state_dict is simple
            self.passes += 1
            self._new_pass()
        return collate(self.enc, chunk.tolist(), self.pair_mode, swap, self.pad_to_multiple)

    def state_dict(self):
        return {"rng_state": self.rng.getstate(), "order": [list(b) for b in self.order],
                "position": self.position, "passes": self.passes, "n": len(self.enc),
                "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state):
        mine = (len(self.enc), self.batch_size, self.world_size)
        theirs = (state["n"], state["batch_size"], state["world_size"])
        if mine != theirs:
            raise ValueError(f"state is for (n, batch_size, world_size) = {theirs}, this stream has {mine}")
        v, internal, gauss = state["rng_state"]
        self.rng.setstate((v, tuple(internal), gauss))  # tuple: survives a json/list round trip
        self.order = [list(b) for b in state["order"]]
        self.position, self.passes = state["position"], state["passes"]


def training_streams(config: TrainConfig, train_enc: dict, rank: int = 0, world_size: int = 1) -> dict:
    """The batch stream of every task the run trains, as train() draws them: task i of TASKS is shuffled with
    seed * 1000 + i, so the streams do not depend on which other tasks train. train_enc: task -> EncodedTask."""
    return {t: TaskBatchStream(train_enc[t], config.batch_size, seed=config.seed * 1000 + i,
                               pair_mode=task_pair_mode(t, config.para_input), group_by_length=config.group_by_length,
                               rank=rank, world_size=world_size, swap_pairs=config.para_swap and t == "para",
                               pad_to_multiple=config.pad_to_multiple)
            for i, t in enumerate(TASKS) if t in config.train_tasks}


def eval_batches(enc, batch_size, pair_mode="joint", sort_by_length=True, swap=False,
                 pad_to_multiple=None) -> Iterator[dict]:
    """Every example once, sorted by length for speed; batch["index"] restores file order.
    swap=True: every joint pair as (b, a)."""
    lengths = enc.lengths(pair_mode) if sort_by_length else None
    for idx in batch_indices(len(enc), batch_size, None, lengths, sort_by_length):
        yield collate(enc, idx, pair_mode, [True] * len(idx) if swap else None, pad_to_multiple)


# ---------------------------------------------------------------------------
# a run's data: loaded, split and tokenized once per process

_DATA_CACHE: dict = {}


def check_trainable(tasks: dict) -> None:
    """Train and dev splits need a label column and at least one usable row: name the file that lacks them."""
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


def load_run_tasks(config: TrainConfig) -> tuple[dict, dict]:
    """The run's tasks, loaded and subsampled (max_train, max_dev, seed), and the validation split carved from
    each train split when val_fraction > 0: (task -> TaskData, task -> validation examples). No tokenizing."""
    tasks = load_tasks(config.data_dir, max_train=config.max_train, max_dev=config.max_dev, seed=config.seed,
                       warn=False)  # skipped rows: recorded in the result (data.skipped); notebook 00 lists them
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
    return tasks, val


def prepare_data(config: TrainConfig, tokenizer) -> dict:
    """Load, subsample and tokenize the three tasks once per process (cached by what changes them, the
    files' contents included)."""
    digests = file_digests(config.data_dir)
    key = (config.data_dir, tuple(digests.items()), str(config.max_train), str(config.max_dev), config.seed,
           config.max_length, config.encoder if config.encoder not in ENCODER_NAMES else "bert-uncased",
           config.val_fraction)
    if key not in _DATA_CACHE:
        tasks, val = load_run_tasks(config)
        enc = {split: {t: encode_task(getattr(td, split), tokenizer, t, config.max_length)
                       for t, td in tasks.items() if getattr(td, split)}
               for split in ("train", "dev", "test")}
        enc["val"] = {t: encode_task(v, tokenizer, t, config.max_length) for t, v in val.items()}
        info = {"sizes": {t: {**td.sizes, **({"val": len(val[t])} if val else {})} for t, td in tasks.items()},
                "sources": {t: td.sources for t, td in tasks.items()},
                "skipped": {name: rep["skipped"] for td in tasks.values() for name, rep in td.reports.items()},
                "sha256": digests}
        _DATA_CACHE.clear()  # keep one data set in memory at a time
        _DATA_CACHE[key] = (enc, info)
    return _DATA_CACHE[key]
