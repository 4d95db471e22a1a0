"""How much memory does one training step's forward keep for its backward? (Why GPU session 3's nine runs with
fused steps took up to 74 GB, and its nine tuned runs, which go task by task, 30: docs/gpu.md.)

    python benchmarks/activation_memory.py --out results/bench/activation_memory_cpu.json

MiniLM in training mode, random token ids: the bytes of every distinct storage autograd saves during one forward
(torch.autograd.graph.saved_tensors_hooks), for a task's batch (64 rows) and a fused step's (the three tasks'
batches stacked: 192 rows), at padded lengths 64 and 128. Twice: with the encoder's attention dropout as trained,
where CPU's attention keeps its probabilities for the backward, and without it, where CPU's fused attention does
not, as CUDA's memory-efficient attention does not with dropout either. On CPU, so the figures are the model's
tensors, not a GPU allocator's.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = [(64, 64), (64, 128), (192, 64), (192, 128)]  # (rows, padded length): one task's batch; a fused step's


def saved_gib(encoder, rows: int, length: int) -> float:
    seen, total = set(), [0]

    def keep(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total[0] += storage.nbytes()
        return t

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (rows, length), generator=g)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.mean()
    return round(total[0] / 2**30, 2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    args = ap.parse_args(argv)
    from mtbert_utils.model import load_encoder
    encoder = load_encoder("minilm").train()
    rows = []
    for attention_dropout in (encoder.config.attention_probs_dropout_prob, 0.0):
        for layer in encoder.encoder.layer:
            layer.attention.self.dropout.p = attention_dropout
        for n, length in SHAPES:
            rows.append({"rows": n, "length": length, "attention_dropout": attention_dropout,
                         "saved_gib": saved_gib(encoder, n, length)})
            print(json.dumps(rows[-1]), flush=True)
    out = {"what": "bytes autograd saves in one MiniLM training forward (distinct storages), by batch rows and "
                   "padded length: 64 rows a task's batch, 192 a fused step's",
           "device": "cpu", "torch": torch.__version__, "rows": rows,
           "command": "python benchmarks/activation_memory.py --out results/bench/activation_memory_cpu.json"}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
