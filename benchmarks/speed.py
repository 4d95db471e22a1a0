"""Speed benchmark: this repository's training step and evaluation against a plain loop, on this machine.

    python -m mtbert_utils.bench [--data-dir D] [--quick] [--levers] [--accuracy] [--out results/bench/bench.json]
    python -m mtbert_utils.bench --device cuda [--levers] [--accuracy] [--time-cap 150]

(mtbert_utils/bench.py is only the entry point: the code is here, outside the package, so that
editing it does not change reproduce.code_version and re-run the notebooks.)

Prints one JSON object and writes it to --out. Everything is measured in one
process, on the same data and the same machine:

    train   (a) a plain Hugging Face loop: AutoModel encoder + linear head, random batches of
                SST train sentences tokenized per batch (padding=True), fp32, AdamW defaults;
            (b) `training.training_step` with the SPEED levers, on exactly the same sentences.
    mfu     model FLOP/s of (b) over the fp32 matrix-multiply peak measured on the spot
            (6 x per-token parameters x real tokens, plus attention 12 x layers x hidden x padded length).
    pcgrad  one PCGrad step / one plain combined-loss step on the same three task batches, and the
            step's peak memory above the plain step's (PCGrad runs one task's forward at a time).
    eval    a plain loop (file order, padded per batch, tokenized per batch, no_grad) vs
            `evaluation.predict` (cached tokens, length-sorted batches) over the three dev sets.
    memory  peak RSS of the process; per part, the peak of the allocator's bytes in use
            (glibc mallinfo2, sampled every 2 ms) above where that part started.

--levers   each speed lever alone against the plain repo config (REFERENCE), training examples/s;
           plus tokenization caching and the evaluation levers.
--task-fusion, --pcgrad: that part alone (run_part), on --device.
--accuracy trains SST briefly with REFERENCE, SPEED and SPEED with the encoder's own dropout kept
           (2 seeds each) and reports dev accuracy, so a lever that costs accuracy shows up.

--device cuda (run_cuda; exits with a message where there is no GPU) measures, in one process: the plain loop
and this repository's step (CUDA_SPEED: SPEED plus lengths padded to a multiple of 16), each in fp32 and
bf16 autocast, on the same batches of 32; `precision` names the faster step, and `train_speedup` is that
step over the plain fp32 loop (target >= 3x); MFU against the fp32 (TF32 off), TF32 and bf16 matmul peaks
measured on the spot; PCGrad; the three-task step with fuse_tasks (one encoder call) against a call per
task (task_fusion_step_ratio: its time over theirs); evaluation (plain vs predict, and predict in fp32 vs
bf16); with --accuracy, SST dev accuracy of REFERENCE, CUDA_SPEED, +TF32 and +bf16; with --levers, each
CUDA_LEVERS switch alone (TF32, padding, fused AdamW, bf16, cache_frozen_encoder, CUDA graphs last). --time-cap
skips what is left of the optional parts once spent, so the whole fits 2-3 minutes of a 10-minute GPU command.

Machines here are shared: variants are interleaved round by round so that load from
other processes hits both alike, and every throughput is the median over rounds.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import math
import os
import platform
import random
import resource
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from mtbert_utils.data import load_tasks
from mtbert_utils.batching import TaskBatchStream, collate, encode_task
from mtbert_utils.evaluation import autocast_context, predict, score, to_device
from mtbert_utils.model import load_tokenizer, minilm_path, tiny_config
from mtbert_utils.results import environment, write_json
from mtbert_utils.tasks import predictions_from_outputs
from mtbert_utils.config import TrainConfig
from mtbert_utils.optim import build_optimizer
from mtbert_utils.presets import REFERENCE, SPEED, make_config
from mtbert_utils.training import build_model, pick_amp, tf32_matmuls, training_step, use_cuda_graphs

# REFERENCE (the plain repo config every lever is measured against, one change at a time) and SPEED
# (the speed config of (b)) are presets: mtbert_utils/presets.py.
# batch_size is the Sizes' unless a lever set names it
NOT_IN_CONFIG = ("batch_size", "frozen")  # frozen: heads-only steps (the encoder frozen), for cache_frozen_encoder


@dataclass
class Sizes:
    """How much work each part does; --quick shrinks everything for tests."""
    encoder: str = "minilm"
    batch_size: int = 32          # the plain loop's batch, and (b)'s, so examples/s compare like for like
    train_steps: int = 8          # batches per timed round (the same sentences in (a) and (b))
    train_rounds: int = 3         # timed rounds, after one warm-up round
    pcgrad_rounds: int = 4        # timed steps of each kind, interleaved, after one warm-up each
    eval_batch_size: int = 32     # predict(), like the plain eval loop (on CPU 128 measured slower)
    max_dev: dict = field(default_factory=lambda: {"para": 1000})  # quora dev (hash split) is 4k pairs
    eval_chunk_batches: int = 16  # evaluation memory is sampled over this many batches per task
    lever_steps: int = 6
    lever_rounds: int = 3
    accuracy_steps: int = 120
    accuracy_seeds: tuple = (0, 1)
    peak_n: int = 2048
    device: str = "cpu"           # cuda: run_cuda (python -m mtbert_utils.bench --device cuda)
    time_cap_s: float | None = None  # cuda: optional parts (levers, accuracy) stop when this is spent


QUICK = Sizes(encoder="tiny", train_steps=2, train_rounds=1, pcgrad_rounds=1, max_dev={t: 48 for t in
              ("sst", "para", "sts")}, lever_steps=2, lever_rounds=1, accuracy_steps=3, accuracy_seeds=(0,),
              peak_n=512)


# ---------------------------------------------------------------------------
# measuring tools


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def _heap_reader():
    """Bytes the C allocator has handed out and not taken back (glibc mallinfo2), or None elsewhere.

    torch's CPU tensors come from malloc, so this sees them (tracemalloc does not), and unlike
    RSS it drops when memory is freed even if the allocator keeps the pages.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2

        def read():
            m = libc.mallinfo2()
            return m.uordblks + m.hblkhd
        read()
        return read
    return None


_HEAP = _heap_reader()


def _cuda_in_use() -> bool:
    """Whether this process computes on a GPU (the CUDA benchmark): its tensors are then in GPU memory."""
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def measures_step_bytes() -> bool:
    return _HEAP is not None or _cuda_in_use()


_cuda_peak_before_resets = 0  # MemSampler resets the CUDA allocator's peak: the process's peak over every reset


def cuda_process_peak_bytes() -> int:
    return max(_cuda_peak_before_resets, torch.cuda.max_memory_allocated())


class MemSampler:
    """Peak memory while a block runs, sampled every 2 ms: process RSS (/proc, Linux) and
    allocator bytes in use (see _heap_reader). `step_bytes`: the heap peak minus the heap at
    entry, i.e. what the block itself allocated at its worst moment (activations, gradients,
    optimizer temporaries), comparable between variants that share one process. On a GPU the
    same from torch's CUDA allocator (its exact peak), as the host heap holds none of those.
    """

    def __init__(self, interval: float = 0.002):
        self.interval, self.rss_peak, self.heap_start, self.heap_peak = interval, 0, 0, 0
        self.cuda = _cuda_in_use()
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:
            return 0

    def _sample(self):
        self.rss_peak = max(self.rss_peak, self._rss())
        if _HEAP is not None:
            self.heap_peak = max(self.heap_peak, _HEAP())

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self.heap_start = self.heap_peak = _HEAP() if _HEAP is not None else 0
        if self.cuda:
            global _cuda_peak_before_resets
            torch.cuda.synchronize()
            self.cuda_start = torch.cuda.memory_allocated()
            _cuda_peak_before_resets = cuda_process_peak_bytes()
            torch.cuda.reset_peak_memory_stats()
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        if self.cuda:
            torch.cuda.synchronize()
            self.cuda_peak = torch.cuda.max_memory_allocated()

    @property
    def step_bytes(self) -> int | None:
        if self.cuda:
            return self.cuda_peak - self.cuda_start
        return self.heap_peak - self.heap_start if _HEAP is not None else None


def peak_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)  # bytes on macOS, KiB on Linux


def matmul_peak_gflops(dtype=torch.float32, n: int = 2048, device="cpu", min_time: float = 1.0) -> float:
    """Best GFLOP/s of an n x n matmul over repeats lasting about min_time seconds."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a @ b
    sync()
    best, start = 0.0, time.perf_counter()
    while True:
        t = time.perf_counter()
        a @ b
        sync()
        dt = time.perf_counter() - t
        best = max(best, 2 * n ** 3 / dt / 1e9)
        if time.perf_counter() - start > min_time:
            return best


def interleave(runners: dict, rounds: int, warmup: int = 1) -> dict:
    """Run each runner's `round()` in turn: `warmup` untimed rounds, one untimed round under the
    memory sampler (its 2 ms polling thread would slow a timed round), then `rounds` timed ones.

    round() returns {"examples", "tokens", "padded", "flops", "seconds"}; the result per
    runner is the median examples/s and tokens/s over the timed rounds, plus the totals.
    """
    for _ in range(warmup):
        for r in runners.values():
            r.round()
    rss, step_mem = {}, {}
    for k, r in runners.items():
        with MemSampler() as m:
            r.round()
        rss[k], step_mem[k] = m.rss_peak, m.step_bytes
    log = {k: [] for k in runners}
    for _ in range(rounds):
        for k, r in runners.items():
            log[k].append(r.round())
    out = {}
    for k, rs in log.items():
        secs = sum(x["seconds"] for x in rs)
        out[k] = {"examples_per_s": statistics.median(x["examples"] / x["seconds"] for x in rs),
                  "tokens_per_s": statistics.median(x["tokens"] / x["seconds"] for x in rs),
                  "flops_per_s": statistics.median(x["flops"] / x["seconds"] for x in rs),
                  "real_token_fraction": sum(x["tokens"] for x in rs) / max(sum(x["padded"] for x in rs), 1),
                  "examples": sum(x["examples"] for x in rs), "seconds": secs,
                  "rounds_examples_per_s": [round(x["examples"] / x["seconds"], 2) for x in rs],
                  "rss_peak_bytes": rss[k], "step_peak_bytes": step_mem[k]}
    return out


def per_token_params(encoder) -> int:
    """Parameters every token goes through: the transformer layers (not embeddings, pooler or heads)."""
    layers = getattr(encoder, "encoder", None)
    if layers is not None:
        return sum(p.numel() for p in layers.parameters())
    emb = sum(p.numel() for p in encoder.get_input_embeddings().parameters())
    return sum(p.numel() for p in encoder.parameters()) - emb


def train_flops(encoder, mask: torch.Tensor) -> float:
    """Forward + backward FLOPs of one batch: 6 N per real token, plus attention scores and
    weighted values (2 matmuls x 2 FLOPs x padded length x hidden per token and layer, x3 for backward)."""
    cfg = encoder.config
    tokens = float(mask.sum())
    attn = 12 * cfg.num_hidden_layers * cfg.hidden_size * mask.shape[1] * tokens
    return 6 * per_token_params(encoder) * tokens + attn


# ---------------------------------------------------------------------------
# (a) the plain loop and (b) this repository's step


def plain_encoder(name: str, attn_implementation: str | None = None):
    """What a plain loop loads: AutoModel with the library's default attention (sdpa in transformers >= 4.36)."""
    from transformers import AutoModel, BertModel
    if name == "tiny":
        torch.manual_seed(0)
        return BertModel(tiny_config())
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return AutoModel.from_pretrained(str(minilm_path()) if name == "minilm" else name, **kw)


class PlainTrainer:
    """A textbook fine-tuning loop: shuffle, tokenize each batch with padding=True, mean-pool, cross-entropy."""

    def __init__(self, encoder_name: str, tokenizer, sentences: list[str], labels: list[int], batch_size: int,
                 device: str = "cpu", amp_dtype=None):
        torch.manual_seed(0)
        self.device, self.amp_dtype = torch.device(device), amp_dtype
        self.encoder = plain_encoder(encoder_name).to(self.device)
        self.head = torch.nn.Linear(self.encoder.config.hidden_size, 5).to(self.device)
        self.opt = torch.optim.AdamW(list(self.encoder.parameters()) + list(self.head.parameters()), lr=2e-5)
        self.tokenizer, self.sentences, self.labels, self.bs = tokenizer, sentences, labels, batch_size
        self.rng = random.Random(0)
        self.encoder.train()

    def round(self) -> dict:
        order = list(range(len(self.sentences)))
        self.rng.shuffle(order)
        n = tokens = padded = flops = 0
        t0 = time.perf_counter()
        for i in range(0, len(order), self.bs):
            idx = order[i:i + self.bs]
            b = self.tokenizer([self.sentences[j] for j in idx], padding=True, truncation=True, max_length=128,
                               return_tensors="pt")
            # counted on the host's mask: read from the GPU's, each count would wait for the step (our bookkeeping,
            # not the plain loop's work)
            tokens += int(b["attention_mask"].sum())
            padded += b["attention_mask"].numel()
            flops += train_flops(self.encoder, b["attention_mask"])
            b = b.to(self.device)
            with autocast_context(self.device, self.amp_dtype):
                hidden = self.encoder(**b).last_hidden_state
                m = b["attention_mask"].unsqueeze(-1).float()
                logits = self.head((hidden * m).sum(1) / m.sum(1))
            loss = F.cross_entropy(logits.float(), torch.tensor([self.labels[j] for j in idx], device=self.device))
            loss.backward()
            self.opt.step()
            self.opt.zero_grad()
            n += len(idx)
        _sync(self.device)
        return {"examples": n, "tokens": tokens, "padded": padded, "flops": flops,
                "seconds": time.perf_counter() - t0}


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def lever_config(sizes: "Sizes", levers: dict, seed: int = 0, **overrides) -> TrainConfig:
    """The tuned preset (presets.make_config) with a lever set on CPU (levers TrainConfig lacks are left to
    make_trainer)."""
    cfg = {k: v for k, v in levers.items() if k not in NOT_IN_CONFIG}
    return make_config("tuned", encoder=sizes.encoder, batch_size=levers.get("batch_size", sizes.batch_size),
                       seed=seed, progress=False, device=sizes.device, **{**cfg, **overrides})


def make_trainer(sizes: "Sizes", levers: dict, source=None, seed: int = 0, **kw) -> "Trainer":
    return Trainer(lever_config(sizes, levers, seed), source, **kw)


def work_trainer(sizes: "Sizes", levers: dict, enc, work: list[list[int]]) -> "Trainer":
    """A Trainer whose round is one pass over `work`, grouped or not as `levers` say."""
    bs = levers.get("batch_size", sizes.batch_size)
    pad = levers.get("pad_to_multiple")
    source = WorkBatches(enc, work, levers["group_by_length"], bs, pad_to_multiple=pad)
    n = sum(len(b) for b in work)
    if levers["group_by_length"] and bs != sizes.batch_size:  # regroup the same sentences at this batch size
        idx = sorted((i for b in work for i in b), key=lambda i: len(enc.single[i]))
        source = WorkBatches(enc, [idx[i:i + bs] for i in range(0, n, bs)], True, bs, pad_to_multiple=pad)
    return make_trainer(sizes, levers, source, batches_per_round=math.ceil(n / bs), frozen=levers.get("frozen", False))


def grouped_work(enc, batch_size: int, n_batches: int, seed: int = 0) -> list[list[int]]:
    """The first n_batches batches of a length-grouped training pass over all of `enc`: what
    training with group_by_length would run (buckets as fine as in a real epoch, random order)."""
    stream = TaskBatchStream(enc, batch_size, seed=seed, group_by_length=True)
    return [list(b) for b in stream.order[:n_batches]]


class WorkBatches:
    """Endless batches over a fixed set of examples of `enc` (SST): each pass either replays the
    given length-grouped batches in a new random order, or reshuffles all their examples into
    random batches (group_by_length off), so both variants see exactly the same sentences."""

    def __init__(self, enc, batches: list[list[int]], group_by_length: bool, batch_size: int, seed: int = 0,
                 pad_to_multiple: int | None = None):
        self.enc, self.batches, self.group, self.bs = enc, batches, group_by_length, batch_size
        self.pad = pad_to_multiple
        self.rng, self.queue = random.Random(seed), []

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self.queue:
            if self.group:
                self.queue = [list(b) for b in self.batches]
                self.rng.shuffle(self.queue)
            else:
                flat = [i for b in self.batches for i in b]
                self.rng.shuffle(flat)
                self.queue = [flat[i:i + self.bs] for i in range(0, len(flat), self.bs)]
        return collate(self.enc, self.queue.pop(0), pad_to_multiple=self.pad)


class Trainer:
    """This repository's path: build_model, build_optimizer and training_step on SST batches from `source`."""

    def __init__(self, config: TrainConfig, source=None, batches_per_round: int = 1, frozen: bool = False):
        self.config, self.device = config, torch.device(config.device)
        self.model = build_model(config).to(self.device)  # applies config.encoder_dropout
        use_cuda_graphs(self.model, config, self.device)
        self.model.set_encoder_trainable(not frozen, config.freeze_word_embeddings)
        self.model.train()
        if frozen and config.cache_frozen_encoder:  # as training.set_up_epoch does in a heads-only epoch
            self.model.encoder.eval()
            self.model.embed_cache = {}
        self.opt = build_optimizer(self.model, config, self.device)  # config.optimizer
        self.amp_dtype, _ = pick_amp(config, self.device)
        self.shared = [p for p in list(self.model.encoder.parameters()) + list(self.model.shared.parameters())
                       if p.requires_grad]
        self.source, self.batches_per_round = source, batches_per_round
        self.gen = torch.Generator().manual_seed(config.seed)
        self.pending = None  # the last step's losses, not read yet

    def step(self, batches: dict) -> dict:
        """One training step; like the training loop, it reads the previous step's losses once this one is queued."""
        with tf32_matmuls(self.config.tf32, self.device):
            out = training_step(self.model, self.opt, {t: to_device(b, self.device) for t, b in batches.items()},
                                self.config,
                                shared=self.shared, device=self.device, amp_dtype=self.amp_dtype, generator=self.gen)
        if self.pending is not None:
            self.pending.read()
        self.pending = out["losses"]
        return out

    def round(self) -> dict:
        """batches_per_round SST steps (with WorkBatches: one pass over the work)."""
        n = tokens = padded = flops = 0
        t0 = time.perf_counter()
        for _ in range(self.batches_per_round):
            batch = next(self.source)
            self.step({"sst": batch})
            mask = batch["attention_mask"]
            n += len(batch["ids"])
            tokens += int(mask.sum())
            padded += mask.numel()
            flops += train_flops(self.model.encoder, mask)
        _sync(self.device)
        return {"examples": n, "tokens": tokens, "padded": padded, "flops": flops,
                "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------
# the parts


def bench_train(sizes: Sizes, tokenizer, sst_train: list, sst_enc, peak: float) -> dict:
    """(a) vs (b) on the same SST train sentences, interleaved round by round.

    The sentences are those of train_steps batches of a length-grouped pass over all of SST
    train (what (b) trains on); the plain loop gets them in random batches.
    """
    work = grouped_work(sst_enc, sizes.batch_size, sizes.train_steps, seed=0)
    subset = [sst_train[i] for b in work for i in b]
    runners = {
        "plain": PlainTrainer(sizes.encoder, tokenizer, [e.text_a for e in subset], [e.label for e in subset],
                              sizes.batch_size),
        "repo": work_trainer(sizes, SPEED, sst_enc, work),
    }
    res = interleave(runners, sizes.train_rounds)
    plain, repo = res["plain"], res["repo"]
    return {
        "train_plain_examples_per_s": plain["examples_per_s"],
        "train_plain_tokens_per_s": plain["tokens_per_s"],
        "train_examples_per_s": repo["examples_per_s"],
        "train_tokens_per_s": repo["tokens_per_s"],
        "train_speedup": repo["examples_per_s"] / plain["examples_per_s"],
        "mfu": repo["flops_per_s"] / (peak * 1e9),
        "mfu_plain": plain["flops_per_s"] / (peak * 1e9),
        "train_plain_peak_bytes": plain["step_peak_bytes"],
        "train_peak_bytes": repo["step_peak_bytes"],
        "train_detail": {
            "sentences_per_round": len(subset), "batch_size": sizes.batch_size,
            "sentences": "the first train_steps batches of a length-grouped pass over SST train",
            "timed_rounds": sizes.train_rounds, "plain": plain, "repo": repo,
            "plain_attn_implementation": runners["plain"].encoder.config._attn_implementation,
            "repo_config": SPEED,
            "per_token_params": per_token_params(runners["repo"].model.encoder),
        },
    }


def three_batches(encoded: dict, model, batch_size: int) -> dict:
    """One fixed batch per task (sst, para, sts), collated as the model wants them."""
    out = {}
    for i, (t, enc) in enumerate(encoded.items()):
        out[t] = next(TaskBatchStream(enc, batch_size, seed=i, pair_mode=model.pair_mode(t)))
    return out


class _StepRunner:
    """A round: the trainer's step on `batches` (one step's {task: batch}, or a list of them) under `config`."""

    def __init__(self, trainer: Trainer, config: TrainConfig, batches: dict | list):
        self.trainer, self.config = trainer, config
        self.steps = batches if isinstance(batches, list) else [batches]

    def round(self) -> dict:
        saved = self.trainer.config
        self.trainer.config = self.config
        t0 = time.perf_counter()
        for batches in self.steps:
            self.trainer.step(batches)
        _sync(self.trainer.device)
        dt = time.perf_counter() - t0
        self.trainer.config = saved
        n = sum(len(b["ids"]) for batches in self.steps for b in batches.values())
        return {"examples": n, "tokens": 0, "padded": 0, "flops": 0, "seconds": dt}


def bench_pcgrad(sizes: Sizes, train_enc: dict) -> dict:
    """Time of one PCGrad step / one plain combined-loss step, same model, same three batches."""
    trainer = make_trainer(sizes, SPEED)
    batches = three_batches(train_enc, trainer.model, sizes.batch_size)
    pc_config = lever_config(sizes, SPEED, pcgrad=True)
    runners = {"plain": _StepRunner(trainer, trainer.config, batches),
               "pcgrad": _StepRunner(trainer, pc_config, batches)}
    res = interleave(runners, sizes.pcgrad_rounds)
    shared_params = sum(p.numel() for p in trainer.shared)
    T = len(batches)
    n = sum(len(b["ids"]) for b in batches.values())
    step_s = {k: n / v["examples_per_s"] for k, v in res.items()}  # median step time
    # measured: the heap peak of a PCGrad step minus that of a plain step (same model, same batches)
    measured = (res["pcgrad"]["step_peak_bytes"] - res["plain"]["step_peak_bytes"]
                if res["plain"]["step_peak_bytes"] is not None else None)
    return {
        "pcgrad_step_ratio": step_s["pcgrad"] / step_s["plain"],
        "pcgrad_extra_bytes": measured if measured is not None else T * shared_params * 4,
        "pcgrad_detail": {
            "plain_step_s": step_s["plain"], "pcgrad_step_s": step_s["pcgrad"],
            "plain_rounds_examples_per_s": res["plain"]["rounds_examples_per_s"],
            "pcgrad_rounds_examples_per_s": res["pcgrad"]["rounds_examples_per_s"],
            "timed_steps_each": sizes.pcgrad_rounds, "tasks": list(batches),
            "batch_examples": {t: len(b["ids"]) for t, b in batches.items()},
            "batch_tokens": {t: int(sum(v.sum() for k, v in b.items() if k.startswith("attention_mask")))
                             for t, b in batches.items()},
            "shared_params": shared_params,
            "extra_bytes_measured": measured,
            # pcgrad_backward keeps one P-sized float32 buffer per task and the final .grad are views
            # of the first, so a PCGrad step holds T - 1 more than a plain step's .grad (see pcgrad.py)
            "extra_bytes_buffer": (T - 1) * shared_params * 4,
            "one_flat_copy_per_task_bytes": T * shared_params * 4,
            "step_peak_bytes": {k: v["step_peak_bytes"] for k, v in res.items()},
            "rss_peak_bytes": {k: v["rss_peak_bytes"] for k, v in res.items()},
        },
    }


def bench_task_fusion(sizes: Sizes, train_enc: dict, levers: dict, steps: int = 4) -> dict:
    """Three-task steps with summed losses and a call of the encoder per task, against the same steps with
    fuse_tasks (one call for the three, padded to the longest): same model, interleaved. Each round is `steps`
    steps of batches as training draws them (grouped by length within each task, padded as `levers` say), so the
    tasks' lengths differ as they do in a run."""
    trainer = make_trainer(sizes, levers)
    streams = {t: TaskBatchStream(enc, sizes.batch_size, seed=i, pair_mode=trainer.model.pair_mode(t),
                                  group_by_length=levers.get("group_by_length", False),
                                  pad_to_multiple=levers.get("pad_to_multiple"))
               for i, (t, enc) in enumerate(train_enc.items())}
    work = [{t: next(s) for t, s in streams.items()} for _ in range(steps)]
    runners = {"apart": _StepRunner(trainer, trainer.config, work),
               "fused": _StepRunner(trainer, lever_config(sizes, levers, fuse_tasks=True), work)}
    res = interleave(runners, sizes.pcgrad_rounds)
    n = sum(len(b["ids"]) for batches in work for b in batches.values())
    step_s = {k: n / v["examples_per_s"] / steps for k, v in res.items()}  # median over rounds, per step
    # per step, each task's encoder input length; the token positions the encoder runs on (rows x padded length),
    # a call per task against the shared call
    lengths, positions = [], {"apart": 0, "fused": 0}
    for batches in work:
        shapes = {t: [p[0].shape for p in trainer.model.encoder_inputs(t, b)] for t, b in batches.items()}
        rows = {t: sum(s[0] for s in ss) for t, ss in shapes.items()}
        lengths.append({t: max(s[1] for s in ss) for t, ss in shapes.items()})
        positions["apart"] += sum(rows[t] * lengths[-1][t] for t in shapes)
        positions["fused"] += sum(rows.values()) * max(lengths[-1].values())
    return {"task_fusion_step_ratio": step_s["fused"] / step_s["apart"],
            "task_fusion_detail": {"apart_step_s": step_s["apart"], "fused_step_s": step_s["fused"],
                                   "steps_per_round": steps, "timed_rounds": sizes.pcgrad_rounds,
                                   "encoder": sizes.encoder, "batch_size": sizes.batch_size, "levers": levers,
                                   "encoder_input_lengths": lengths, "encoder_positions": positions,
                                   "step_peak_bytes": {k: v["step_peak_bytes"] for k, v in res.items()}}}


def _plain_eval_batch(tokenizer, task: str, pair_mode: str, exs: list) -> dict:
    kw = dict(padding=True, truncation=True, max_length=128, return_tensors="pt")
    a = [e.text_a for e in exs]
    if task == "sst":
        return dict(tokenizer(a, **kw))
    b = [e.text_b for e in exs]
    if pair_mode == "joint":
        return dict(tokenizer(a, b, return_token_type_ids=True, **kw))
    ta, tb = tokenizer(a, **kw), tokenizer(b, **kw)
    return {"input_ids_a": ta["input_ids"], "attention_mask_a": ta["attention_mask"],
            "input_ids_b": tb["input_ids"], "attention_mask_b": tb["attention_mask"]}


@torch.no_grad()
def plain_predict(model, tokenizer, task: str, examples: list, batch_size: int, device="cpu") -> torch.Tensor:
    """The plain evaluation loop: file order, tokenize and pad each batch, model.eval(), no_grad."""
    model.eval()
    outs = []
    for i in range(0, len(examples), batch_size):
        batch = _plain_eval_batch(tokenizer, task, model.pair_mode(task), examples[i:i + batch_size])
        outs.append(model.forward_task(task, to_device(batch, device)).float().cpu())
    return torch.cat(outs)


def bench_eval(sizes: Sizes, tokenizer, dev: dict) -> dict:
    """Plain loop vs evaluation.predict over the three dev sets.

    Each dev set is evaluated whole by both loops, as evaluation does (predict() sorts the whole
    set by length), the two taking turns task by task (alternating which goes first) so that a
    burst of load from other processes hits both. Tokenization for predict() happens before the
    clock starts (the trainer tokenizes once per run); the plain loop tokenizes every batch
    inside its loop. Memory is sampled on a separate, untimed pass over the first
    `sizes.eval_chunk_batches` batches of each task (the sampler's polling thread slows timing).
    """
    model = build_model(lever_config(sizes, SPEED)).to(sizes.device)
    chunk = sizes.eval_chunk_batches * sizes.batch_size
    encoded = {t: encode_task(exs, tokenizer, t) for t, exs in dev.items()}

    def run(which: str, t: str, exs: list, enc) -> torch.Tensor:
        if which == "plain":
            return plain_predict(model, tokenizer, t, exs, sizes.batch_size, sizes.device)
        return torch.as_tensor(predict(model, enc, sizes.eval_batch_size, sizes.device)["raw"])

    rss, step = {"plain": 0, "repo": 0}, {"plain": 0, "repo": 0}
    for t, exs in dev.items():  # warm up both paths, then measure memory on a slice (untimed)
        part = exs[:chunk]
        for which in ("plain", "repo"):
            run(which, t, part[:sizes.batch_size], encode_task(part[:sizes.batch_size], tokenizer, t))
            with MemSampler() as m:
                run(which, t, part, encode_task(part, tokenizer, t))
            rss[which], step[which] = max(rss[which], m.rss_peak), max(step[which], m.step_bytes or 0)
    times, diff = {"plain": 0.0, "repo": 0.0}, 0.0
    raw = {"plain": {t: [] for t in dev}, "repo": {t: [] for t in dev}}
    for i, (t, exs) in enumerate(dev.items()):
        for which in (("plain", "repo") if i % 2 == 0 else ("repo", "plain")):
            t0 = time.perf_counter()
            out = run(which, t, exs, encoded[t])  # outputs come back to the CPU: synchronized
            times[which] += time.perf_counter() - t0
            raw[which][t].append(out)
    metrics = {}
    for t, exs in dev.items():
        rp, rr = torch.cat(raw["plain"][t]), torch.cat(raw["repo"][t])
        diff = max(diff, float((rp - rr).abs().max()))
        enc = encode_task(exs, tokenizer, t)
        metrics[t] = score(t, predictions_from_outputs(t, rr, model.sts_head_kind), enc)
    n = sum(len(e) for e in dev.values())
    return {
        "eval_plain_examples_per_s": n / times["plain"],
        "eval_examples_per_s": n / times["repo"],
        "eval_speedup": times["plain"] / times["repo"],
        "eval_plain_peak_bytes": step["plain"] if measures_step_bytes() else None,
        "eval_peak_bytes": step["repo"] if measures_step_bytes() else None,
        "eval_detail": {"examples": {t: len(e) for t, e in dev.items()}, "plain_s": times["plain"],
                        "repo_s": times["repo"], "plain_batch_size": sizes.batch_size,
                        "repo_batch_size": sizes.eval_batch_size, "memory_pass_examples_per_task": chunk,
                        "max_abs_output_diff": diff,  # same model: the two loops must agree
                        "dev_metrics_untrained_heads": metrics, "rss_peak_bytes": rss,
                        "step_peak_bytes": step},
    }


# ---------------------------------------------------------------------------
# levers, accuracy, CUDA


def _lever_pair(sizes, sst_enc, name, base: dict, lever: dict, reference: dict = REFERENCE) -> dict:
    work = grouped_work(sst_enc, sizes.batch_size, sizes.lever_steps, seed=1)
    try:
        res = interleave({"off": work_trainer(sizes, {**reference, **base}, sst_enc, work),
                          "on": work_trainer(sizes, {**reference, **lever}, sst_enc, work)}, sizes.lever_rounds)
    except Exception as e:  # a lever this machine cannot run (e.g. compile without a compiler)
        return {"lever": name, "skipped": f"{type(e).__name__}: {e}"}
    return {"lever": name, "off": base, "on": lever,
            "off_examples_per_s": res["off"]["examples_per_s"], "on_examples_per_s": res["on"]["examples_per_s"],
            "speedup": res["on"]["examples_per_s"] / res["off"]["examples_per_s"],
            "real_token_fraction": {"off": res["off"]["real_token_fraction"], "on": res["on"]["real_token_fraction"]}}


def bench_levers(sizes: Sizes, tokenizer, sst_train: list, sst_enc, dev_enc: dict, peaks: dict,
                 with_compile: bool = False) -> dict:
    """Each lever alone against REFERENCE (training examples/s), plus the evaluation and tokenization levers."""
    out = {}
    pairs = {
        "group_by_length": ({}, {"group_by_length": True}),
        "freeze_word_embeddings": ({}, {"freeze_word_embeddings": True}),
        "sdpa_vs_eager": ({"attn_implementation": "eager"}, {}),
        "foreach_vs_forloop_adamw": ({"optimizer": "forloop"}, {}),
        "fused_vs_foreach_adamw": ({}, {"optimizer": "fused"}),
        "encoder_dropout_0": ({}, {"encoder_dropout": 0.0}),
        "batch_size_64_vs_32": ({}, {"batch_size": 2 * sizes.batch_size}),
    }
    if peaks["bf16"] >= 0.5 * peaks["fp32"]:
        pairs["bf16_autocast"] = ({}, {"precision": "bf16"})
    else:
        out["bf16_autocast"] = {"lever": "bf16_autocast", "skipped": (
            f"bf16 matmul peak {peaks['bf16']:.1f} GFLOP/s vs fp32 {peaks['fp32']:.1f}: "
            f"no native bf16 on this CPU ({torch.backends.cpu.get_cpu_capability()}), autocast would be slower")}
    if with_compile:
        pairs["torch_compile"] = ({}, {"compile": True})
    else:
        out["torch_compile"] = {"lever": "torch_compile", "skipped": (
            "off unless --compile: with dynamic=True, inductor on 2 CPU cores took about 4 minutes "
            "to compile and recompile over the first 10 MiniLM steps (5.8 examples/s overall)")}
    for name, (base, lever) in pairs.items():
        print(f"[bench] lever {name}", file=sys.stderr, flush=True)
        out[name] = _lever_pair(sizes, sst_enc, name, base, lever)

    # tokenization: once for all epochs (encode_task) vs per batch inside the loop
    sents = [e.text_a for e in sst_train]
    t0 = time.perf_counter()
    encode_task(sst_train, tokenizer, "sst")
    once = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(0, len(sents), sizes.batch_size):
        tokenizer(sents[i:i + sizes.batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt")
    per_batch = time.perf_counter() - t0
    out["cached_tokenization"] = {"lever": "cached_tokenization", "sst_train_examples": len(sents),
                                  "tokenize_once_s": once, "tokenize_per_batch_s_per_epoch": per_batch,
                                  "note": "per-batch tokenization is paid every epoch; encode_task once per run"}

    # evaluation levers, on the same model: length sorting and batch size
    model = build_model(lever_config(sizes, SPEED))
    variants = {"unsorted_bs32": (False, sizes.batch_size), "sorted_bs32": (True, sizes.batch_size),
                "sorted_bs128": (True, sizes.eval_batch_size)}
    secs = {k: 0.0 for k in variants}
    for t, enc in dev_enc.items():
        predict(model, enc, sizes.batch_size, "cpu")  # warm-up
        for k, (sort, bs) in variants.items():
            t0 = time.perf_counter()
            predict(model, enc, bs, "cpu", sort_by_length=sort)
            secs[k] += time.perf_counter() - t0
    out["eval_sort_by_length"] = {"lever": "eval_sort_by_length", "seconds": secs,
                                  "speedup": secs["unsorted_bs32"] / secs["sorted_bs32"]}
    out["eval_batch_128_vs_32"] = {"lever": "eval_batch_128_vs_32",
                                   "speedup": secs["sorted_bs32"] / secs["sorted_bs128"]}
    return out


# the speed config against the plain one, and the lever not in it because it changes the model
ACCURACY_CONFIGS = {"reference_fp32": REFERENCE, "speed": SPEED,
                    "speed_with_encoder_dropout": dict(SPEED, encoder_dropout=None)}


def bench_accuracy(sizes: Sizes, sst_enc, sst_dev_enc, steps: int, configs: dict = ACCURACY_CONFIGS,
                   deadline: float | None = None) -> dict:
    """SST dev accuracy after `steps` steps (encoder trainable) for each of `configs`, per seed."""
    out = {"steps": steps, "batch_size": sizes.batch_size, "task": "sst", "runs": []}
    for name, levers in configs.items():
        for seed in sizes.accuracy_seeds:
            if deadline is not None and time.perf_counter() > deadline:
                out.setdefault("skipped", []).append(f"{name} seed {seed}: the time cap was spent")
                continue
            print(f"[bench] accuracy {name} seed {seed}", file=sys.stderr, flush=True)
            stream = TaskBatchStream(sst_enc, sizes.batch_size, seed=seed, group_by_length=levers["group_by_length"])
            tr = make_trainer(sizes, levers, stream, seed=seed, batches_per_round=steps)
            t0 = time.perf_counter()
            tr.round()
            train_s = time.perf_counter() - t0
            p = predict(tr.model, sst_dev_enc, sizes.eval_batch_size, sizes.device, tr.amp_dtype,
                        pad_to_multiple=tr.config.pad_to_multiple)
            out["runs"].append({"config": name, "seed": seed, "sst_dev_acc": score("sst", p["pred"], sst_dev_enc),
                                "train_s": train_s})
    for name in configs:
        accs = [r["sst_dev_acc"] for r in out["runs"] if r["config"] == name]
        out[f"{name}_mean_acc"] = sum(accs) / len(accs) if accs else None
        if name != "reference_fp32" and accs and out.get("reference_fp32_mean_acc") is not None:
            out[f"{name}_minus_reference"] = out[f"{name}_mean_acc"] - out["reference_fp32_mean_acc"]
    out["configs"] = configs
    return out


def bench_cuda_bert_base(steps: int = 20, batch_size: int = 32, seq_len: int = 128, precision: str = "bf16") -> dict:
    """bert-base-sized random weights (no download): training examples/s and fraction of bf16 peak.

    precision: 'bf16' (autocast) or 'fp32' (full precision, for the autocast speedup).
    """
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'bf16' or 'fp32', got {precision!r}")
    from transformers import BertConfig, BertModel
    dev = torch.device("cuda")
    peak = matmul_peak_gflops(torch.bfloat16, 8192, dev)
    enc = BertModel(BertConfig(attn_implementation="sdpa")).to(dev)
    head = torch.nn.Linear(768, 5).to(dev)
    opt = torch.optim.AdamW(list(enc.parameters()) + list(head.parameters()), lr=2e-5, fused=True)
    ids = torch.randint(1000, 30000, (batch_size, seq_len), device=dev)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 5, (batch_size,), device=dev)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            h = enc(input_ids=ids, attention_mask=mask).last_hidden_state.mean(1)
            loss = F.cross_entropy(head(h).float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    flops = steps * train_flops(enc, mask)
    return {"device": torch.cuda.get_device_name(0), "encoder": "bert-base (random weights)",
            "batch_size": batch_size, "seq_len": seq_len,
            "precision": "bf16 autocast" if precision == "bf16" else "fp32",
            "examples_per_s": steps * batch_size / dt, "bf16_matmul_peak_gflops": peak,
            "fraction_of_bf16_peak": flops / dt / (peak * 1e9)}


# ---------------------------------------------------------------------------
# CUDA: python -m mtbert_utils.bench --device cuda

# this repository's training step on CUDA: the CPU speed config plus lengths padded to a multiple of 16
# (few distinct shapes: bf16 attention pays a first-use cost per new length, CUDA graphs record one per shape)
CUDA_SPEED = dict(SPEED, pad_to_multiple=16)
# on one H100/H200 MiniLM runs ~1,500 examples/s: bigger rounds than on CPU, and a cap for the optional parts
CUDA_SIZES = Sizes(device="cuda", train_steps=32, train_rounds=5, pcgrad_rounds=8, eval_batch_size=128,
                   lever_steps=16, lever_rounds=3, accuracy_steps=120, peak_n=8192, time_cap_s=150.0)
CUDA_TARGETS = {"train_speedup": (">=", 3.0)}  # issue 12: the training step >= 3x the plain fp32 loop
CUDA_ACCURACY_CONFIGS = {"reference_fp32": REFERENCE, "speed": CUDA_SPEED,
                         "speed_tf32": dict(CUDA_SPEED, tf32=True), "speed_bf16": dict(CUDA_SPEED, precision="bf16")}
# each alone against REFERENCE (fp32, no grouping, foreach AdamW); (off, on) as in bench_levers
CUDA_LEVERS = {
    # first: the lever the step targets depend on (docs/gpu.md). Compiled with dynamic shapes, once per kind of
    # input, so it no longer costs a compile per padded shape; each still needs 30 s left to start
    "cuda_graphs": ({"pad_to_multiple": 16, "group_by_length": True},
                    {"pad_to_multiple": 16, "group_by_length": True, "cuda_graphs": True}),
    "cuda_graphs_bf16": ({"pad_to_multiple": 16, "group_by_length": True, "precision": "bf16"},
                         {"pad_to_multiple": 16, "group_by_length": True, "precision": "bf16", "cuda_graphs": True}),
    # inductor's fused kernels without CUDA graphs (no cudagraph trees, which crashed in packed runs: docs/gpu.md),
    # the same buckets. `compile` is fingerprinted (it predates the execution-only switches): measured here only
    "torch_compile": ({"pad_to_multiple": 16, "group_by_length": True},
                      {"pad_to_multiple": 16, "group_by_length": True, "compile": True}),
    "pad_to_multiple_16": ({}, {"pad_to_multiple": 16}),
    "tf32": ({}, {"tf32": True}),
    "fused_vs_foreach_adamw": ({}, {"optimizer": "fused"}),
    "group_by_length": ({}, {"group_by_length": True}),
    "freeze_word_embeddings": ({}, {"freeze_word_embeddings": True}),
    "bf16_autocast": ({}, {"precision": "bf16"}),
    "bf16_autocast_padded_16": ({"pad_to_multiple": 16}, {"pad_to_multiple": 16, "precision": "bf16"}),
    "batch_size_64_vs_32": ({}, {"batch_size": 64}),
    # heads-only steps (the frozen encoder), outputs reused: what heads-only epochs after a phase's first run
    "cache_frozen_encoder": ({"frozen": True, "encoder_dropout": 0.0},
                             {"frozen": True, "encoder_dropout": 0.0, "cache_frozen_encoder": True}),
}


def device_peaks(n: int, device: str) -> dict:
    """Matrix-multiply peaks measured on the spot, GFLOP/s: fp32 (TF32 off), tf32 (on), bf16."""
    dev = torch.device(device)
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        fp32 = matmul_peak_gflops(torch.float32, n, dev, min_time=0.5)
        with tf32_matmuls(True, dev):
            tf32 = matmul_peak_gflops(torch.float32, n, dev, min_time=0.5) if dev.type == "cuda" else fp32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    return {"fp32": fp32, "tf32": tf32, "bf16": matmul_peak_gflops(torch.bfloat16, n, dev, min_time=0.5)}


def bench_train_precisions(sizes: Sizes, tokenizer, sst_train: list, sst_enc, peaks: dict) -> dict:
    """(a) the plain loop and (b) this repository's step (CUDA_SPEED), each in fp32 and bf16 autocast, on the
    same sentences, interleaved. The headline keys are the CPU benchmark's: (b) in its faster precision
    (named in `precision`) against the plain fp32 loop; MFU against the peak of the precision used."""
    work = grouped_work(sst_enc, sizes.batch_size, sizes.train_steps, seed=0)
    subset = [sst_train[i] for b in work for i in b]
    texts, labels = [e.text_a for e in subset], [e.label for e in subset]
    runners = {
        "plain_fp32": PlainTrainer(sizes.encoder, tokenizer, texts, labels, sizes.batch_size, sizes.device),
        "plain_bf16": PlainTrainer(sizes.encoder, tokenizer, texts, labels, sizes.batch_size, sizes.device,
                                   torch.bfloat16),
        "repo_fp32": work_trainer(sizes, CUDA_SPEED, sst_enc, work),
        "repo_bf16": work_trainer(sizes, dict(CUDA_SPEED, precision="bf16"), sst_enc, work),
    }
    res = interleave(runners, sizes.train_rounds)
    precision = max(("fp32", "bf16"), key=lambda p: res[f"repo_{p}"]["examples_per_s"])
    plain, repo = res["plain_fp32"], res[f"repo_{precision}"]
    return {
        "precision": precision,
        "train_plain_examples_per_s": plain["examples_per_s"], "train_plain_tokens_per_s": plain["tokens_per_s"],
        "train_examples_per_s": repo["examples_per_s"], "train_tokens_per_s": repo["tokens_per_s"],
        "train_speedup": repo["examples_per_s"] / plain["examples_per_s"],
        "mfu": repo["flops_per_s"] / (peaks[precision] * 1e9),
        "mfu_plain": plain["flops_per_s"] / (peaks["fp32"] * 1e9),
        "train_plain_peak_bytes": plain["step_peak_bytes"], "train_peak_bytes": repo["step_peak_bytes"],
        "train_by_precision": {k: v["examples_per_s"] for k, v in res.items()},
        "train_detail": {
            "sentences_per_round": len(subset), "batch_size": sizes.batch_size,
            "sentences": "the first train_steps batches of a length-grouped pass over SST train",
            "timed_rounds": sizes.train_rounds, **res, "repo_config": CUDA_SPEED,
            "mfu_by_precision": {k: v["flops_per_s"] / (peaks[k.split("_")[1]] * 1e9) for k, v in res.items()},
            "plain_attn_implementation": runners["plain_fp32"].encoder.config._attn_implementation,
            "per_token_params": per_token_params(runners["repo_fp32"].model.encoder),
        },
    }


def bench_eval_precisions(sizes: Sizes, dev_enc: dict) -> dict:
    """evaluation.predict over the three dev sets on the device, fp32 against bf16 autocast, same model."""
    model = build_model(lever_config(sizes, CUDA_SPEED)).to(sizes.device)
    secs = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        for enc in dev_enc.values():  # warm-up
            predict(model, enc, sizes.eval_batch_size, sizes.device, dtype, pad_to_multiple=16)
        t0 = time.perf_counter()
        for enc in dev_enc.values():
            predict(model, enc, sizes.eval_batch_size, sizes.device, dtype, pad_to_multiple=16)
        secs[name] = time.perf_counter() - t0
    n = sum(len(e) for e in dev_enc.values())
    return {f"eval_{k}_examples_per_s": n / v for k, v in secs.items()}


@contextlib.contextmanager
def compiler_settings_restored():
    """torch.compile's process-wide settings (dynamo's and inductor's) put back as they were when the block ends.
    use_cuda_graphs sets inductor's fallback_random and raises dynamo's cache limit for the rest of its process:
    without this, a lever measured after the graphs levers (torch_compile) would run with eager's random draws,
    not with what a run of that lever alone gets."""
    import torch._dynamo.config
    import torch._inductor.config
    saved = [(c, c.get_config_copy()) for c in (torch._dynamo.config, torch._inductor.config)]
    try:
        yield
    finally:
        for c, before in saved:  # only what changed: setting a deprecated entry back would warn
            now = c.get_config_copy()
            for key in [k for k, v in before.items() if now[k] != v]:
                setattr(c, key, before[key])


def bench_cuda_levers(sizes: Sizes, sst_enc, deadline: float) -> dict:
    """Each CUDA_LEVERS entry alone against REFERENCE, until the time cap is spent, each with torch.compile's
    settings as the benchmark found them (compiler_settings_restored)."""
    out = {}
    for name, (base, lever) in CUDA_LEVERS.items():
        compiles = lever.get("cuda_graphs") or lever.get("compile")
        # compiling takes seconds on a GPU machine: start only with 30 s to spare
        if time.perf_counter() > deadline - (30 if compiles else 0):
            out[name] = {"lever": name, "skipped": "the benchmark's time cap was spent before this lever"}
            continue
        if lever.get("compile") and sizes.device == "cpu":
            out[name] = {"lever": name, "skipped": "inductor on CPU takes minutes to compile "
                                                   "(the CPU benchmark measures it with --compile)"}
            continue
        print(f"[bench] lever {name}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        with compiler_settings_restored():
            pair = _lever_pair(sizes, sst_enc, name, base, lever)
        out[name] = {**pair, "wall_s": time.perf_counter() - t0}  # with cuda_graphs: mostly compiling
    return out


def run_cuda(data_dir=None, sizes: Sizes = CUDA_SIZES, levers: bool = False, accuracy: bool = False,
             accuracy_steps: int | None = None, on_part=None) -> dict:
    """The CUDA benchmark (sizes.device; tests run it on CPU with QUICK sizes): the CPU benchmark's keys plus
    `device` and `precision`, the fp32/tf32/bf16 peaks, and the levers as TrainConfig switches.
    on_part(result so far) after each part: a job that is killed at its time limit keeps what was measured."""
    on_part = on_part or (lambda r: None)
    t_start = time.perf_counter()
    deadline = t_start + (sizes.time_cap_s or float("inf"))
    log = lambda msg: print(f"[bench] {msg} ({time.perf_counter() - t_start:.0f}s)", file=sys.stderr, flush=True)
    dev = torch.device(sizes.device)
    torch.manual_seed(0)
    peaks = device_peaks(sizes.peak_n, sizes.device)
    log(f"matmul peaks GFLOP/s: {', '.join(f'{k} {v:.0f}' for k, v in peaks.items())}")
    tokenizer, sst_train, dev_sets, dev_enc, sst_enc, train_enc = bench_data(sizes, data_dir)
    result = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else str(dev), "machine": _machine(),
              "encoder": sizes.encoder, "quick": sizes.encoder == "tiny",
              "matmul_peak_gflops": peaks["fp32"], "matmul_peak_gflops_bf16": peaks["bf16"],
              "matmul_peak_gflops_tf32": peaks["tf32"], "time_cap_s": sizes.time_cap_s}
    result.update(bench_train_precisions(sizes, tokenizer, sst_train, sst_enc, peaks))
    log(f"train ex/s: {result['train_by_precision']}; faster precision {result['precision']}")
    on_part(result)
    result.update(bench_pcgrad(sizes, train_enc))
    result.update(bench_task_fusion(sizes, train_enc, CUDA_SPEED))
    log(f"three-task step, one encoder call / a call per task: {result['task_fusion_step_ratio']:.2f}x the time")
    result.update(bench_eval(sizes, tokenizer, dev_sets))
    result.update(bench_eval_precisions(sizes, dev_enc))
    log(f"eval: plain {result['eval_plain_examples_per_s']:.0f}, repo {result['eval_examples_per_s']:.0f} ex/s")
    on_part(result)
    if accuracy:  # before the levers: the accuracy check matters more than the last lever
        result["accuracy_check"] = bench_accuracy(sizes, sst_enc, dev_enc["sst"],
                                                  accuracy_steps or sizes.accuracy_steps, CUDA_ACCURACY_CONFIGS,
                                                  deadline)
        log("accuracy check done")
        on_part(result)
    if levers:
        result["levers"] = bench_cuda_levers(sizes, sst_enc, deadline)
        log("levers done")
    # the peak again at the end, as on CPU (reported; the MFU figures stay against the start's)
    result["matmul_peak_gflops_start_end"] = [peaks["fp32"], matmul_peak_gflops(torch.float32, sizes.peak_n,
                                                                                 sizes.device)]
    result["peak_rss_bytes"] = peak_rss_bytes()
    if dev.type == "cuda":
        result["cuda_max_memory_allocated_bytes"] = cuda_process_peak_bytes()
    result["bench_seconds"] = time.perf_counter() - t_start
    result["targets"] = {k: f"{op} {v}" for k, (op, v) in CUDA_TARGETS.items()}
    result["targets_met"] = meets_targets(result, CUDA_TARGETS)
    result["load_average"] = {"start": None, "end": os.getloadavg() if hasattr(os, "getloadavg") else None}
    result["environment"] = environment()
    return result


def run_part(part: str, data_dir, sizes: Sizes) -> dict:
    """One part of the benchmark alone: "task_fusion" (--task-fusion: bench_task_fusion, with the levers of this
    device's training step, CUDA_SPEED on a GPU, SPEED on CPU) or "pcgrad" (--pcgrad: bench_pcgrad)."""
    t0 = time.perf_counter()
    torch.manual_seed(0)
    train_enc = bench_data(sizes, data_dir)[5]
    levers = CUDA_SPEED if sizes.device == "cuda" else SPEED
    parts = {"task_fusion": lambda: bench_task_fusion(sizes, train_enc, levers),
             "pcgrad": lambda: bench_pcgrad(sizes, train_enc)}
    device = torch.cuda.get_device_name(0) if sizes.device == "cuda" else "cpu"
    return {"device": device, "machine": _machine(), **parts[part](),
            "bench_seconds": time.perf_counter() - t0, "environment": environment()}


# ---------------------------------------------------------------------------
# entry point


def run(data_dir=None, quick: bool = False, levers: bool = False, accuracy: bool = False,
        with_compile: bool = False, accuracy_steps: int | None = None) -> dict:
    threads = torch.get_num_threads()
    if quick:  # the tiny encoder gains nothing from threads, and one thread is robust on a busy machine
        torch.set_num_threads(1)
    try:
        return _run(data_dir, quick, levers, accuracy, with_compile, accuracy_steps)
    finally:
        torch.set_num_threads(threads)


# what the issue asks for (2-core CPU, MiniLM)
TARGETS = {"train_speedup": (">=", 2.0), "pcgrad_step_ratio": ("<=", 1.10), "eval_speedup": (">=", 2.0)}


def _run(data_dir, quick, levers, accuracy, with_compile, accuracy_steps) -> dict:
    sizes = QUICK if quick else Sizes()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    t_start = time.perf_counter()
    log = lambda msg: print(f"[bench] {msg} ({time.perf_counter() - t_start:.0f}s)", file=sys.stderr, flush=True)
    torch.manual_seed(0)
    peaks = {"fp32": matmul_peak_gflops(torch.float32, sizes.peak_n),
             # one small bf16 product: on CPUs without native bf16 it is ~100x slower than fp32
             "bf16": matmul_peak_gflops(torch.bfloat16, min(sizes.peak_n, 512), min_time=0.2)}
    log(f"matmul peak fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.1f}")

    tokenizer, sst_train, dev, dev_enc, sst_enc, train_enc = bench_data(sizes, data_dir)
    log("data ready")

    result = {"machine": _machine(),
              "encoder": sizes.encoder, "quick": quick,
              "matmul_peak_gflops": peaks["fp32"], "matmul_peak_gflops_bf16": peaks["bf16"]}
    result.update(bench_train(sizes, tokenizer, sst_train, sst_enc, peaks["fp32"]))
    log(f"train: plain {result['train_plain_examples_per_s']:.1f}, repo {result['train_examples_per_s']:.1f} ex/s")
    result.update(bench_pcgrad(sizes, train_enc))
    log(f"pcgrad ratio {result['pcgrad_step_ratio']:.3f}")
    result.update(bench_eval(sizes, tokenizer, dev))
    log(f"eval: plain {result['eval_plain_examples_per_s']:.1f}, repo {result['eval_examples_per_s']:.1f} ex/s")
    if levers:
        result["levers"] = bench_levers(sizes, tokenizer, sst_train, sst_enc, dev_enc, peaks, with_compile)
        log("levers done")
    if accuracy:
        result["accuracy_check"] = bench_accuracy(sizes, sst_enc, dev_enc["sst"], accuracy_steps or sizes.accuracy_steps)
        log("accuracy check done")
    # the peak again at the end: a peak measured during a burst of load elsewhere (or while the
    # cores clock down) would inflate the MFU; the larger of the two is the machine's
    peak_end = matmul_peak_gflops(torch.float32, sizes.peak_n)
    result["matmul_peak_gflops_start_end"] = [peaks["fp32"], peak_end]
    if peak_end > peaks["fp32"]:
        result["matmul_peak_gflops"] = peak_end
        for key, part in (("mfu", "repo"), ("mfu_plain", "plain")):
            result[key] = result["train_detail"][part]["flops_per_s"] / (peak_end * 1e9)
    if torch.cuda.is_available():
        result["cuda_bert_base"] = bench_cuda_bert_base()
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["bench_seconds"] = time.perf_counter() - t_start
    met = meets_targets(result, TARGETS)
    met["pcgrad_extra_bytes"] = result["pcgrad_extra_bytes"] <= result["pcgrad_detail"]["one_flat_copy_per_task_bytes"]
    result["targets_met"] = met
    # other work on the machine slows everything: the 1/5/15-minute load averages, before and after
    result["load_average"] = {"start": load_start, "end": os.getloadavg() if hasattr(os, "getloadavg") else None}
    result["environment"] = environment()
    return result


def bench_data(sizes: "Sizes", data_dir) -> tuple:
    """What every benchmark part measures on: (tokenizer, SST train examples, dev examples per task, dev encoded,
    SST train encoded, a slice of each train split encoded: three task batches for the PCGrad comparison)."""
    tokenizer = load_tokenizer(sizes.encoder)
    tasks = load_tasks(data_dir, max_dev=sizes.max_dev, seed=0)
    sst_train = tasks["sst"].train
    dev = {t: td.dev for t, td in tasks.items()}
    dev_enc = {t: encode_task(exs, tokenizer, t) for t, exs in dev.items()}
    sst_enc = encode_task(sst_train, tokenizer, "sst")
    train_enc = {t: encode_task(td.train[:8 * sizes.batch_size], tokenizer, t) for t, td in tasks.items()}
    return tokenizer, sst_train, dev, dev_enc, sst_enc, train_enc


def _machine() -> dict:
    return {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def meets_targets(result: dict, targets: dict) -> dict:
    """{key: whether result[key] meets its (op, value) target}."""
    return {k: (result[k] >= v if op == ">=" else result[k] <= v) for k, (op, v) in targets.items()}


def target_label(r: dict, key: str, fmt: str = ".1f") -> str:
    """The target a report was held to: its own (the CUDA report stores them), else the CPU benchmark's."""
    if key in r.get("targets", {}):
        return r["targets"][key]
    op, value = TARGETS[key]
    return f"{op} {value:{fmt}}"


def summary_markdown(r: dict) -> str:
    """The headline numbers of a saved bench JSON as a Markdown table (for the README)."""
    m, mb = r["machine"], 1 / 2 ** 20
    rows = [
        ("training, plain HF loop (a)", f"{r['train_plain_examples_per_s']:.1f} ex/s",
         f"{r['train_plain_tokens_per_s']:.0f} tok/s, MFU {r['mfu_plain']:.0%}"),
        ("training, repo step (b)", f"{r['train_examples_per_s']:.1f} ex/s",
         f"{r['train_tokens_per_s']:.0f} tok/s, MFU {r['mfu']:.0%}"),
        ("training speedup b/a", f"{r['train_speedup']:.2f}x", f"target {target_label(r, 'train_speedup')}x"),
        ("PCGrad step / plain step", f"{r['pcgrad_step_ratio']:.3f}",
         f"target {target_label(r, 'pcgrad_step_ratio', '.2f')}"),
        ("PCGrad step memory above a plain step's", f"{r['pcgrad_extra_bytes'] * mb:.0f} MiB",
         f"one flat copy per task: {r['pcgrad_detail']['one_flat_copy_per_task_bytes'] * mb:.0f} MiB"),
        ("evaluation, plain loop", f"{r['eval_plain_examples_per_s']:.1f} ex/s", "three dev sets"),
        ("evaluation, predict()", f"{r['eval_examples_per_s']:.1f} ex/s", f"speedup {r['eval_speedup']:.2f}x, "
                                                                          f"target {target_label(r, 'eval_speedup')}x"),
        ("fp32 matmul peak", f"{r['matmul_peak_gflops']:.0f} GFLOP/s",
         f"bf16 {r['matmul_peak_gflops_bf16']:.1f} GFLOP/s"),
        ("peak RSS", f"{r['peak_rss_bytes'] * mb:.0f} MiB", f"bench took {r['bench_seconds']:.0f} s"),
    ]
    cuda = "train_by_precision" in r  # the CUDA benchmark: both loops in both precisions, and evaluation's
    if cuda:
        rows.insert(3, ("training by precision (ex/s)",
                        ", ".join(f"{k} {v:.0f}" for k, v in r["train_by_precision"].items()),
                        f"faster repo precision: {r['precision']}; evaluation fp32 "
                        f"{r['eval_fp32_examples_per_s']:.0f}, bf16 {r['eval_bf16_examples_per_s']:.0f} ex/s"))
        if "task_fusion_step_ratio" in r:  # measured since fuse_tasks
            d = r["task_fusion_detail"]
            rows.insert(6, ("three-task step, one encoder call / a call per task", f"{r['task_fusion_step_ratio']:.3f}",
                            f"{d['fused_step_s'] * 1e3:.1f} ms vs {d['apart_step_s'] * 1e3:.1f} ms (fuse_tasks)"))
    lines = [(f"Device: {r['device']}. " if cuda else "")
             + f"Machine: {m['cpu']}, {m['cores']} cores ({m['cpu_capability']}), torch {r['environment']['torch']}, "
             f"encoder {r['encoder']}; load average at start {r.get('load_average', {}).get('start')}.", "",
             "| measure | value | notes |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    if "levers" in r:
        lines += ["", "| lever (alone, vs the plain repo config) | speedup |", "|---|---|"]
        for name, lv in r["levers"].items():
            val = f"{lv['speedup']:.2f}x" if "speedup" in lv else (
                lv.get("skipped") or f"tokenize once {lv['tokenize_once_s']:.2f} s vs "
                                      f"{lv['tokenize_per_batch_s_per_epoch']:.2f} s per epoch per batch")
            lines.append(f"| {name} | {val} |")
    if "accuracy_check" in r:
        a = r["accuracy_check"]
        lines += ["", f"SST dev accuracy after {a['steps']} steps (mean over seeds): " + ", ".join(
            f"{k} {a[f'{k}_mean_acc']:.3f}" for k in a["configs"])]
    return "\n".join(lines) + "\n"


def default_out(task_fusion: bool, pcgrad: bool, device: str) -> str:
    """Where a benchmark writes without --out: one part alone into a file of its own, so that it never
    overwrites the whole benchmark's bench.json."""
    if task_fusion or pcgrad:
        return f"results/bench/{'task_fusion' if task_fusion else 'pcgrad'}_{device}.json"
    return "results/bench/bench.json"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m mtbert_utils.bench", description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=None, help="CS224N data folder (default: $MTBERT_DATA_DIR or ./data)")
    p.add_argument("--quick", action="store_true", help="tiny encoder and a few steps (tests, < 30 s)")
    p.add_argument("--levers", action="store_true", help="also measure each speed lever alone")
    p.add_argument("--accuracy", action="store_true", help="also train SST briefly: reference vs speed config")
    p.add_argument("--accuracy-steps", type=int, default=None, help="steps per accuracy run (default 120)")
    p.add_argument("--compile", action="store_true", help="include torch.compile among the levers (slow)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (default): the 2-core benchmark; cuda: fp32 vs bf16, CUDA levers (run_cuda)")
    p.add_argument("--time-cap", type=float, default=None,
                   help="cuda: seconds after which the optional parts (accuracy, levers) are skipped (default 150)")
    p.add_argument("--task-fusion", action="store_true",
                   help="only the three-task step with and without fuse_tasks (bench_task_fusion), on --device")
    p.add_argument("--pcgrad", action="store_true",
                   help="only one PCGrad step against one plain step, time and memory (bench_pcgrad), on --device")
    p.add_argument("--out", default=None,
                   help="where to write the JSON (default: results/bench/bench.json; with --task-fusion or --pcgrad "
                        "results/bench/{task_fusion,pcgrad}_{device}.json, the committed part files' names)")
    p.add_argument("--summarize", metavar="JSON", help="print a saved result as a Markdown table and exit")
    args = p.parse_args(argv)
    args.out = args.out or default_out(args.task_fusion, args.pcgrad, args.device)
    if args.summarize:
        import json
        text = summary_markdown(json.loads(Path(args.summarize).read_text()))
        print(text, end="")
        return {"summary": text}
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device cuda: no CUDA device here (torch {torch.__version__}, built for CUDA "
                         f"{torch.version.cuda or 'none'}); run it on a GPU machine, e.g. through "
                         f"benchmarks/gpu_run.py, or use --device cpu")
    if args.task_fusion or args.pcgrad:
        result = run_part("task_fusion" if args.task_fusion else "pcgrad", args.data_dir, dataclasses.replace(
            QUICK if args.quick else (CUDA_SIZES if args.device == "cuda" else Sizes()), device=args.device))
    elif args.device == "cuda":
        sizes = dataclasses.replace(QUICK, device="cuda") if args.quick else CUDA_SIZES
        if args.time_cap is not None:
            sizes = dataclasses.replace(sizes, time_cap_s=args.time_cap)
        result = run_cuda(args.data_dir, sizes, levers=args.levers, accuracy=args.accuracy,
                          accuracy_steps=args.accuracy_steps,
                          on_part=lambda r: write_json(args.out, {**r, "partial": True}))
    else:
        result = run(args.data_dir, quick=args.quick, levers=args.levers, accuracy=args.accuracy,
                     with_compile=args.compile, accuracy_steps=args.accuracy_steps)
    write_json(args.out, result)
    import json
    print(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
