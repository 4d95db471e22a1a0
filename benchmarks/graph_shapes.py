"""How many CUDA graphs `cuda_graphs` records: the distinct encoder input shapes of a run's training batches.

    python benchmarks/graph_shapes.py --data-dir ../shared/data/cs224n [--passes 10] [--out results/bench/graph_shapes.json]

CUDA graphs replay fixed shapes, so a run records one graph per distinct (batch size, padded length) of the
encoder's input, per kind of input (token types or not) and per grad mode (full and heads-only steps). This
counts those shapes for the gpu-minilm / paper-minilm batching (all the local training data, batch 64, grouped
by length, padded to a multiple of 16; Quora pairs joint, STS pairs as model.embed_parts feeds them, both sentences
in one call of twice the batch), over `--passes` shuffled passes of each task. Needs no GPU and no model, only the tokenizer.
With dynamic=True torch.compile compiles once per kind of input and grad mode, not once per shape
(tests/test_levers.py counts the compiles on CPU); the shapes still cost one recording each.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtbert_utils import TASKS  # noqa: E402
from mtbert_utils.batching import TaskBatchStream, prepare_data  # noqa: E402
from mtbert_utils.config import TrainConfig  # noqa: E402
from mtbert_utils.model import load_tokenizer, pair_mode  # noqa: E402
from mtbert_utils.results import write_json  # noqa: E402


def encoder_shape(batch: dict) -> tuple[int, int]:
    """(rows, length) of the encoder's input for one batch (model.embed_parts pads a and b to one length)."""
    if "input_ids" in batch:
        return tuple(batch["input_ids"].shape)
    a, b = batch["input_ids_a"], batch["input_ids_b"]
    return 2 * a.shape[0], max(a.shape[1], b.shape[1])


def count_shapes(config: TrainConfig, passes: int) -> dict:
    enc, _ = prepare_data(config, load_tokenizer(config.encoder))
    out = {}
    for task in TASKS:
        mode = pair_mode(task, config.para_input)
        stream = TaskBatchStream(enc["train"][task], config.batch_size, config.seed, pair_mode=mode,
                                 group_by_length=config.group_by_length, pad_to_multiple=config.pad_to_multiple)
        shapes = collections.Counter(encoder_shape(next(stream)) for _ in range(passes * stream.num_batches))
        out[task] = {"examples": len(enc["train"][task]), "batches_per_pass": stream.num_batches,
                     "distinct_shapes": len(shapes),
                     "shapes": {f"{r}x{length}": n for (r, length), n in sorted(shapes.items())}}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None, help="CS224N folder (default: $MTBERT_DATA_DIR, else data/)")
    ap.add_argument("--passes", type=int, default=10, help="shuffled passes over each task's training data")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--pad-to-multiple", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench" / "graph_shapes.json"))
    args = ap.parse_args(argv)
    config = TrainConfig(data_dir=args.data_dir, batch_size=args.batch_size, pad_to_multiple=args.pad_to_multiple,
                         progress=False)
    tasks = count_shapes(config, args.passes)
    per_grad_mode = sum(t["distinct_shapes"] for t in tasks.values())
    report = {"encoder": config.encoder, "batch_size": config.batch_size, "pad_to_multiple": config.pad_to_multiple,
              "passes": args.passes, "tasks": tasks, "shapes_per_grad_mode": per_grad_mode,
              "graphs_recorded_at_most": 2 * per_grad_mode}  # full and heads-only steps
    write_json(args.out, report)
    for t, r in tasks.items():
        print(f"{t:5s} {r['examples']:6d} examples, {r['batches_per_pass']} batches a pass: "
              f"{r['distinct_shapes']} shapes over {args.passes} passes")
    print(f"{per_grad_mode} shapes per grad mode, so at most {2 * per_grad_mode} CUDA graphs a run -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
