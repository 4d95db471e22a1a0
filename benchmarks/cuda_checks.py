"""CUDA checks, run on a lent GPU machine in one short call (no network there).

    python benchmarks/cuda_checks.py --minilm DIR --data-dir D --out results/cuda/cuda_checks.json

Three parts, written into one JSON object:

precision   the multitask model (MiniLM) trained briefly on CUDA in fp32, bf16 autocast
            and fp16 autocast + GradScaler, 2 seeds each: dev metrics side by side, so a
            precision that costs accuracy shows up (training.pick_amp's CUDA path).
sweep       candidate settings for the `best` profile (issue: best model on 2 CPU cores),
            each trained on the full training data with a 10% validation split carved
            out (val_fraction); the per-epoch validation scores choose the CPU profile's
            settings and epoch count. Dev is scored once per run, at the end, and is not
            used to choose (the CPU run re-does the selection on its own validation split).
bert_base   training examples/s of a bert-base-sized encoder with random weights
            (no download) in bf16 autocast and fp32, and the fraction of the bf16
            matrix-multiply peak measured on the spot (benchmarks/speed.py).

The training runs of `precision` and `sweep` run as parallel processes (the GPU is
far from busy with one MiniLM run), so their examples/s are not clean speed numbers;
`bert_base` runs alone, after them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtbert_utils.presets import SWEEP_BASE as BASE  # noqa: E402  (the `best` candidates: one change at a time from it)

SWEEP = {
    "base": {},
    "para_separate": {"para_input": "separate"},
    "sts_cosine_embedding": {"sts_loss": "cosine_embedding"},
    "dropout_0.3": {"dropout": 0.3},
    "encoder_lr_4e-5": {"lr": {**BASE["lr"], "encoder": 4e-5}},
    "rr_over": {"schedule": "rr_over"},
    "batch_16": {"batch_size": 16},
    "lr_decay_0.7": {"lr_decay": 0.7, "lr_decay_epochs": [2, 3, 4, 5]},
}
# round 2, after round 1 (results/cuda/cuda_checks.json): the joint paraphrase input and the
# SBERT cosine-MSE STS loss won; aim at what still misses its target (Quora, STS, SST)
SWEEP2 = {
    "base": {},
    "para_sbert": {"para_input": "sbert"},
    "sts_weight_10": {"task_weights": {"sst": 1.0, "para": 1.0, "sts": 10.0}},
    "sts_weight_10_rr_over": {"task_weights": {"sst": 1.0, "para": 1.0, "sts": 10.0}, "schedule": "rr_over"},
    "sts_weight_10_para_sbert": {"task_weights": {"sst": 1.0, "para": 1.0, "sts": 10.0}, "para_input": "sbert"},
    "freeze_word_embeddings": {"freeze_word_embeddings": True},
    "sst_head_lr_1e-4": {"lr": {**BASE["lr"], "sst": 1e-4}},
    "heads_lr_1e-3_sts_w10": {"lr": {**BASE["lr"], "shared": 1e-3, "para": 1e-3, "sts": 1e-3},
                              "task_weights": {"sst": 1.0, "para": 1.0, "sts": 10.0}},
}
PRECISION = dict(pooling="mean", dropout=0.1, sts_loss="sbert_mse", schedule="proportional", batch_size=32,
                 phases=[[3, True]], lr_decay=1.0, lr_decay_epochs=[], max_train=4000, max_dev=None)


def child(spec: dict) -> None:
    """Train one config (in its own process) and print its result as one JSON line."""
    from mtbert_utils.config import TrainConfig
    from mtbert_utils.training import train
    r = train(TrainConfig(**spec))
    keep = ("dev", "selection", "train_time_s", "train_examples_per_s", "precision", "device", "examples_seen")
    out = {k: r.get(k) for k in keep}
    out["history"] = [{k: h.get(k) for k in ("epoch", "val", "dev", "epoch_time_s", "train_loss")}
                      for h in r["history"]]
    print("RESULT " + json.dumps(out), flush=True)


def launch(name: str, spec: dict, logs: Path) -> tuple[str, subprocess.Popen, Path]:
    log = logs / f"{name}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdout=open(log, "w"),
                         stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    return name, p, log


def collect(procs, deadline: float) -> dict:
    out = {}
    for name, p, log in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
        lines = log.read_text().splitlines()
        res = [json.loads(l[len("RESULT "):]) for l in lines if l.startswith("RESULT ")]
        # a run cut off by the deadline still shows its epochs (tqdm.write lines)
        out[name] = res[0] if res else {"status": "unfinished", "rc": p.returncode,
                                        "log_tail": [l for l in lines if "epoch" in l or "Error" in l][-12:]}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minilm", help="folder of the all-MiniLM-L6-v2 weights (fp32)")
    ap.add_argument("--data-dir")
    ap.add_argument("--out", default="results/cuda/cuda_checks.json")
    ap.add_argument("--logs", default="/tmp/cuda_check_logs")
    ap.add_argument("--budget-s", type=float, default=330, help="deadline for the parallel training runs")
    ap.add_argument("--round", type=int, default=1, choices=(1, 2),
                    help="1: precision + sweep + bert_base; 2: the second sweep only")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    if not (args.minilm and args.data_dir):
        ap.error("--minilm and --data-dir are required")

    import torch
    from benchmarks.speed import bench_cuda_bert_base
    from mtbert_utils.results import environment, write_json
    assert torch.cuda.is_available(), "these checks need a CUDA GPU"
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    common = dict(encoder=args.minilm, data_dir=args.data_dir, device="cuda", progress=True,
                  out_dir=str(logs / "runs"))
    t0 = time.time()
    sweep = SWEEP if args.round == 1 else SWEEP2
    procs = [launch(f"sweep-{n}", {**common, **BASE, **change, "name": f"sweep{args.round}-{n}"}, logs)
             for n, change in sweep.items()]
    if args.round == 1:
        procs += [launch(f"precision-{p}-seed{s}", {**common, **PRECISION, "precision": p, "seed": s,
                                                    "name": f"precision-{p}"}, logs)
                  for p in ("fp32", "bf16", "fp16") for s in (0, 1)]
    runs = collect(procs, t0 + args.budget_s)
    result = {"device": torch.cuda.get_device_name(0), "round": args.round, "parallel_runs": len(procs),
              "parallel_seconds": time.time() - t0,
              "sweep": {"base": BASE, "changes": sweep,
                        "runs": {n[len("sweep-"):]: r for n, r in runs.items() if n.startswith("sweep-")}}}
    if args.round == 1:
        result["precision"] = {"config": PRECISION, "runs": {n[len("precision-"):]: r for n, r in runs.items()
                                                              if n.startswith("precision-")}}
        result["bert_base"] = {p: bench_cuda_bert_base(precision=p) for p in ("bf16", "fp32")}
    result["environment"] = environment()
    write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
