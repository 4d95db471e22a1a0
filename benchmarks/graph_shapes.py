"""How many CUDA graphs `cuda_graphs` records: the distinct encoder input shapes of a run's training batches.

    python benchmarks/graph_shapes.py --data-dir ../shared/data/cs224n [--passes 10] [--out results/bench/graph_shapes.json]

CUDA graphs replay fixed shapes, so a run records one graph per distinct (batch size, padded length) of the
encoder's input, per kind of input (token types or not) and per grad mode (full and heads-only steps). This
counts those shapes for the gpu-minilm / paper-minilm batching (all the local training data, batch 64, grouped
by length, padded to a multiple of 16; Quora pairs joint, STS pairs as model.embed_parts feeds them, both sentences
in one call of twice the batch), over `--passes` shuffled passes of each task. Needs no GPU and no model, only the tokenizer.
With dynamic=True torch.compile compiles once per kind of input and grad mode, not once per shape
(tests/test_levers.py counts the compiles on CPU); the shapes still cost one recording each.

`trees` in the report: how many graphs torch's graph trees would hold after a tuned rr_over run (the gpu-minilm
schedule: 2 heads-only, 6 full, 2 heads-only epochs, seed 0's batch streams), under a model of the trees, for
three kinds of step. The model: a tree node is a recorded call (forward or backward, kind of input, shape); a call
is recorded as a child of the call before it while that call's path still holds live outputs (a full step's
forward keeps its activations for the backward), else as a root; cudagraph_mark_step_begin starts each step at
the roots. So a node is a distinct prefix of a chain of calls made without returning to the roots:
  - a call per task, summed losses: one chain a full step, fwd sst, fwd para, fwd sts, then their backwards;
  - fuse_tasks: one chain, fwd and bwd of the shared call;
  - PCGrad (each task's forward just before its backward): a chain per task, fwd then bwd, assuming the task's
    outputs are dead once its backward has added its gradients in place;
  - heads-only steps (no grad, nothing kept): a chain per encoder call, one call.
The first use of each call, which the trees run eagerly to warm up, is counted as a recording: an upper bound.
It is a model of torch's code (torch/_inductor/cudagraph_trees.py), not a measurement: cuda_graphs runs record
the real count per epoch (cuda_graphs_recorded), which a GPU will compare with it.
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


def tree_nodes(chains) -> int:
    """Nodes of graph trees grown by `chains` (each a sequence of calls from the roots): the distinct prefixes."""
    return len({tuple(chain[:i]) for chain in chains for i in range(1, len(chain) + 1)})


def step_chains(step: dict, trains: bool, how: str) -> list[list[tuple]]:
    """The chains of calls one step makes (see the module's doc). step: task -> (kind of input, rows, length)."""
    grad = "grad" if trains else "no_grad"
    if how == "fused":
        kind = "types" if any(k == "types" for k, _, _ in step.values()) else "no_types"
        calls = [(kind, sum(r for _, r, _ in step.values()), max(n for _, _, n in step.values()))]
    else:
        calls = list(step.values())
    fwd = [("fwd", grad, *c) for c in calls]
    if not trains:
        return [[f] for f in fwd]
    if how == "pcgrad":
        return [[f, ("bwd", *f[1:])] for f in fwd]
    return [fwd + [("bwd", *f[1:]) for f in reversed(fwd)]]


def count_tree_nodes(config: TrainConfig, phases: list, seed: int = 0) -> dict:
    """Graph-tree nodes after a round-robin run of `phases` ([epochs, encoder trains], ...), per kind of step,
    with the training loop's batch streams (training.py: seed * 1000 + the task's index)."""
    enc, _ = prepare_data(config, load_tokenizer(config.encoder))
    streams = {t: TaskBatchStream(enc["train"][t], config.batch_size, seed * 1000 + i,
                                  pair_mode=pair_mode(t, config.para_input), group_by_length=config.group_by_length,
                                  pad_to_multiple=config.pad_to_multiple) for i, t in enumerate(TASKS)}
    steps_per_epoch = max(s.num_batches for s in streams.values())  # rr_over: the largest task's batches
    chains = {how: [] for how in ("a call per task", "fused", "pcgrad")}
    for epochs, trains in phases:
        for _ in range(epochs * steps_per_epoch):
            step = {}
            for t, stream in streams.items():
                b = next(stream)
                step[t] = ("types" if "token_type_ids" in b else "no_types", *encoder_shape(b))
            for how, cs in chains.items():
                cs.extend(step_chains(step, trains, how))
    by_shape = {how: tree_nodes([[c] for chain in cs for c in chain]) for how, cs in chains.items()}
    return {"phases": phases, "steps_per_epoch": steps_per_epoch, "seed": seed,
            "nodes": {how: tree_nodes(cs) for how, cs in chains.items()},
            "distinct_calls": by_shape}  # one node per distinct call: what the trees would hold by shape alone


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
    trees = count_tree_nodes(config, [[2, False], [6, True], [2, False]])  # gpu-minilm's tuned runs
    report = {"encoder": config.encoder, "batch_size": config.batch_size, "pad_to_multiple": config.pad_to_multiple,
              "passes": args.passes, "tasks": tasks, "shapes_per_grad_mode": per_grad_mode,
              "graphs_recorded_at_most": 2 * per_grad_mode,  # full and heads-only steps, by shape alone
              "trees": trees}
    write_json(args.out, report)
    for t, r in tasks.items():
        print(f"{t:5s} {r['examples']:6d} examples, {r['batches_per_pass']} batches a pass: "
              f"{r['distinct_shapes']} shapes over {args.passes} passes")
    print(f"{per_grad_mode} shapes per grad mode, so at most {2 * per_grad_mode} CUDA graphs a run by shape")
    for how, n in trees["nodes"].items():
        print(f"graph trees of a tuned rr_over run, {how}: {n} nodes ({trees['distinct_calls'][how]} distinct calls)")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
