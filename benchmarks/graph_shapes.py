"""How many CUDA graphs `cuda_graphs` records: the distinct encoder input shapes of a run's training batches.

    python benchmarks/graph_shapes.py --data-dir ../shared/data/cs224n [--passes 10] [--out results/bench/graph_shapes.json]
    python benchmarks/graph_shapes.py --profile gpu-minilm [--set KEY=VALUE ...]   # the model's count for each run

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
  - task by task (PCGrad, and gradient cosines, `record_grad_cosines`: each task's forward just before its
    backward): a chain per task, fwd then bwd, assuming the task's outputs are dead once its backward has added
    its gradients in place;
  - heads-only steps (no grad, nothing kept): a chain per encoder call, one call.
The first use of each call, which the trees run eagerly to warm up, is counted as a recording: an upper bound.
It is a model of torch's code (torch/_inductor/cudagraph_trees.py), not a measurement: cuda_graphs runs record
the real count per epoch (cuda_graphs_recorded), which a GPU will compare with it.
`trees.encoder_positions`, an exact count: the token positions (rows x padded length) the encoder processes in
that run, a call per task against fuse_tasks, which pads a step's rows to its longest task's length.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtbert_utils import TASKS  # noqa: E402
from mtbert_utils.batching import TaskBatchStream, prepare_data, training_streams  # noqa: E402
from mtbert_utils.config import TrainConfig  # noqa: E402
from mtbert_utils.gradients import backs_summed_loss  # noqa: E402
from mtbert_utils.model import load_tokenizer, pair_mode  # noqa: E402
from mtbert_utils.reproduce import parse_override  # noqa: E402
from mtbert_utils.results import write_json  # noqa: E402
from mtbert_utils.schedules import get_schedule  # noqa: E402


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
    if how == "task by task":
        return [[f, ("bwd", *f[1:])] for f in fwd]
    return [fwd + [("bwd", *f[1:]) for f in reversed(fwd)]]


def step_kind(config: TrainConfig) -> str:
    """How a run's full steps call the encoder (training.training_step): a task at a time with its own backward
    (PCGrad, gradient cosines), one shared call (fuse_tasks), or a call per task with one summed backward.
    gradients.backs_summed_loss decides, as it does for training_step: the tuned runs record gradient cosines,
    so fuse_tasks leaves them task by task (GPU session 3 found this prediction calling them fused)."""
    if not backs_summed_loss(config):
        return "task by task"
    return "fused" if config.fuse_tasks else "a call per task"


def run_steps(config: TrainConfig) -> list[tuple[dict, bool]]:
    """(step, encoder trains) for each optimizer step of a run, as train() draws them: its schedule, phases and
    examples_budget, the training loop's batch streams (seed * 1000 + the task's index) and the schedule's
    random.Random(seed). A step: task -> (kind of input, rows, length) of its encoder input."""
    enc, _ = prepare_data(config, load_tokenizer(config.encoder))
    streams = training_streams(config, enc["train"])
    num_batches = {t: s.num_batches for t, s in streams.items()}
    schedule, rng = get_schedule(config.schedule, **config.schedule_params), random.Random(config.seed)
    steps, seen = [], 0
    for epoch in range(config.epochs):
        trains = config.encoder_trainable(epoch)
        for tasks in schedule.steps(num_batches, epoch, rng):
            step = {}
            for t in tasks:
                b = next(streams[t])
                step[t] = ("types" if "token_type_ids" in b else "no_types", *encoder_shape(b))
                seen += len(b["ids"])
            steps.append((step, trains))
            if config.examples_budget is not None and seen >= config.examples_budget:
                return steps
    return steps


def tree_counts(steps: list[tuple[dict, bool]], how: str) -> dict:
    """Graph-tree nodes after `steps` (run_steps') made the `how` way (see the module's doc), and the distinct
    calls among them (what the trees would hold by shape alone)."""
    chains = [chain for step, trains in steps for chain in step_chains(step, trains, how)]
    return {"step_kind": how, "nodes": tree_nodes(chains),
            "distinct_calls": tree_nodes([[c] for chain in chains for c in chain])}


def encoder_positions(steps: list[tuple[dict, bool]]) -> dict:
    """Token positions the encoder processes over `steps` (run_steps'): a call per task pads each task's batch to
    its own length; fuse_tasks pads a step's rows to the step's longest (what fusion pays for fewer calls)."""
    per_task = sum(r * n for step, _ in steps for _, r, n in step.values())
    fused = sum(sum(r for _, r, _ in step.values()) * max(n for _, _, n in step.values()) for step, _ in steps)
    return {"a call per task": per_task, "fused": fused, "fused_ratio": round(fused / per_task, 3)}


def profile_predictions(profile: str, overrides: dict) -> dict:
    """run name -> the model's graph-tree nodes, for the first-stage runs of a profile with `overrides` (reproduce's
    --set): what a cuda_graphs run's last cuda_graphs_recorded should be, if the model holds."""
    from mtbert_utils.packing import stage_wave, training_notebooks
    from mtbert_utils.reproduce import resolve
    _, results_dir, _, plan = resolve(profile, None, overrides, None)
    params = training_notebooks(plan)
    wave = stage_wave(params, {nb: [] for nb in params}, 0, results_dir / "runs", [])
    return {cfg.run_name: {"notebook": nb, **tree_counts(run_steps(cfg), step_kind(cfg))} for nb, _, cfg, _ in wave}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None, help="CS224N folder (default: $MTBERT_DATA_DIR, else data/)")
    ap.add_argument("--passes", type=int, default=10, help="shuffled passes over each task's training data")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--pad-to-multiple", type=int, default=16)
    ap.add_argument("--out", default=None, help="default: results/bench/graph_shapes.json, or with --profile "
                                                "results/bench/graph_trees-PROFILE.json")
    ap.add_argument("--profile", default=None, help="instead: the model's graph counts for each first-stage run "
                                                    "of this profile (reproduce's profiles), with --set overrides")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as reproduce's --set")
    args = ap.parse_args(argv)
    args.out = args.out or str(ROOT / "results" / "bench" / (f"graph_trees-{args.profile}.json" if args.profile
                                                             else "graph_shapes.json"))
    if args.profile:  # predictions for a profile's runs, e.g. the GPU check's (docs/gpu.md)
        overrides = dict(parse_override(o) for o in args.set)
        report = {"profile": args.profile, "overrides": overrides, "model": "graph_shapes.py's docstring",
                  "runs": profile_predictions(args.profile, overrides)}
        write_json(args.out, report)
        for name, r in report["runs"].items():
            print(f"{name:55s} {r['step_kind']:16s} {r['nodes']:5d} graphs ({r['distinct_calls']} distinct calls)")
        print(f"-> {args.out}")
        return 0
    config = TrainConfig(data_dir=args.data_dir, batch_size=args.batch_size, pad_to_multiple=args.pad_to_multiple,
                         progress=False)
    tasks = count_shapes(config, args.passes)
    per_grad_mode = sum(t["distinct_shapes"] for t in tasks.values())
    tuned = dataclasses.replace(config, phases=[[2, False], [6, True], [2, False]])
    trees = {"phases": tuned.phases, "schedule": tuned.schedule, "seed": tuned.seed,
             **{k: {} for k in ("nodes", "distinct_calls")}}
    steps = run_steps(tuned)
    for how in ("a call per task", "fused", "task by task"):  # a tuned rr_over run's steps, each way
        counted = tree_counts(steps, how)
        trees["nodes"][how], trees["distinct_calls"][how] = counted["nodes"], counted["distinct_calls"]
    trees["encoder_positions"] = encoder_positions(steps)
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
    print(f"fuse_tasks pads that run's encoder input to {trees['encoder_positions']['fused_ratio']}x the token "
          f"positions of a call per task")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
