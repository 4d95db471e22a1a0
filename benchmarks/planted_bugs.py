"""Bugs planted by hand in the training loop, where mutmut's mutants would take hours on 2 cores.

mutmut scores training's step half (benchmarks/mutation.sh, results/mutation/training/); its loop (set_up_epoch,
run_epoch, optimizer_step, score_epoch, select_and_finish: about 700 mutants) is out of its scope. Here each
entry of PLANTS is one plausible slip in the loop (a line dropped, a comparison turned, a sum made an
assignment). Each is planted alone in a copy of the repository (.mutation/planted/, tracked and untracked
files), and the training tests of pyproject.toml's [tool.mtbert.mutation-selection] run against it, stopping at
the first failure. A plant no test fails is a survivor: a bug the tests would let through.

    python benchmarks/planted_bugs.py              # every plant (about 10 minutes on 2 cores); writes
                                                   # results/mutation/loop-planted/{summary.json,summary.md}
    python benchmarks/planted_bugs.py --only NAME  # these plants alone (prints, writes nothing)
    python benchmarks/planted_bugs.py --list
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.mutation_summary import OWN_SELECTION  # noqa: E402  (pyproject's mutation selections)

OUT = ROOT / "results" / "mutation" / "loop-planted"
WORK = ROOT / ".mutation" / "planted"


@dataclass(frozen=True)
class Plant:
    name: str
    function: str  # in mtbert_utils/training.py
    old: str  # must occur exactly once in the file
    new: str
    bug: str  # what the slip would do to a run


PLANTS = [
    Plant("train_mode_dropped", "set_up_epoch", "    model.train()\n    if config.cache_frozen_encoder:",
          "    if config.cache_frozen_encoder:",
          "a pretrained encoder arrives in eval mode: its first epoch, and a full phase after a cached frozen one, "
          "train without dropout"),
    Plant("frozen_cache_not_in_eval", "set_up_epoch", "            model.encoder.eval()  # no dropout",
          "            pass  # no dropout",
          "cache_frozen_encoder stores one dropout draw of each example's output and reuses it every epoch"),
    Plant("cache_kept_across_phases", "set_up_epoch", "            model.embed_cache = None\n        else:",
          "            pass\n        else:",
          "the second heads-only phase reads outputs cached before the full epochs changed the encoder"),
    Plant("lr_decay_dropped", "set_up_epoch", 'g["lr"] = g["base_lr"] * mult', 'g["lr"] = g["base_lr"]',
          "the step decay is recorded but never applied"),
    Plant("last_step_loss_dropped", "run_epoch", "    if pending is not None:\n        tally(pending)\n    bar.close()",
          "    bar.close()", "an epoch's train_loss leaves out its last step"),
    Plant("budget_ignored", "run_epoch",
          "            trace.append([state.step, *(state.seen[t] for t in TASKS)])\n            break",
          "            trace.append([state.step, *(state.seen[t] for t in TASKS)])",
          "an examples budget is noted but the epoch trains on"),
    Plant("cosines_not_logged", "run_epoch", '        if out["cosines"] is not None:\n            cos_log.append(out["cosines"])',
          "        pass", "the gradient cosines PCGrad measures never reach the history"),
    Plant("train_time_last_epoch", "run_epoch", "    state.train_time += epoch_time", "    state.train_time = epoch_time",
          "train_time_s holds the last epoch's time only, and examples/s is inflated"),
    Plant("rate_from_steps", "select_and_finish", '"train_examples_per_s": total_seen / state.train_time',
          '"train_examples_per_s": state.step / state.train_time', "examples/s counts steps"),
    Plant("wall_time_of_this_session", "select_and_finish",
          '"wall_time_s": (state.wall_time or 0.0) + time.time() - run.t_start',
          '"wall_time_s": time.time() - run.t_start', "a resumed run's wall time forgets its earlier sessions"),
    Plant("best_epoch_on_ties_is_the_last", "score_epoch", 'dev["mean"] > state.best["score"]',
          'dev["mean"] >= state.best["score"]', "a later epoch that only ties the best on validation replaces it"),
    Plant("snapshot_scores_not_kept", "score_epoch",
          '            state.snapshot_val[epoch + 1] = {t: p["raw"].tolist() for t, p in ev["predictions"].items()}',
          "            pass", "a snapshot ensemble has no epoch's validation outputs to choose from"),
    Plant("epoch_saved_one_ahead", "score_epoch", "    state.epoch = epoch\n", "    state.epoch = epoch + 1\n",
          "a resumed run skips an epoch"),
    Plant("resume_repeats_an_epoch", "train_run", "for epoch in range(state.epoch + 1, last_epoch):",
          "for epoch in range(max(state.epoch, 0), last_epoch):", "a resumed run trains its last saved epoch again"),
    Plant("checkpoint_read_without_resume", "train_run",
          "    if resume and distributed.broadcast_object(run.ckpt_path.exists()):",
          "    if distributed.broadcast_object(run.ckpt_path.exists()):",
          "a fresh run (resume=False) continues from an old checkpoint of the same name"),
    Plant("result_reused_without_resume", "train", "    if resume and (done := finished_result(run)) is not None:",
          "    if (done := finished_result(run)) is not None:", "resume=False returns an earlier result instead of training"),
    Plant("schedule_draws_unseeded", "build_state", "sched_rng=random.Random(config.seed)", "sched_rng=random.Random()",
          "the order of a sampling schedule's tasks differs from run to run of one seed"),
    Plant("pcgrad_order_unseeded", "build_state", "pc_gen=torch.Generator().manual_seed(config.seed)",
          "pc_gen=torch.Generator()", "PCGrad's random task order is the same fixed draw for every seed"),
]
SOURCE = "mtbert_utils/training.py"
SELECTION = OWN_SELECTION["training"]  # the training tests mutmut runs against training.py


def copy_repository(dest: Path) -> None:
    """The tracked files and the untracked ones git does not ignore, as in the working tree."""
    shutil.rmtree(dest, ignore_errors=True)
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)


def run_tests(work: Path) -> tuple[int, str, float]:
    """(pytest's exit status, the first failing test or '', seconds)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t = time.time()
    done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *SELECTION],
                          cwd=work, env=env, capture_output=True, text=True)
    failed = next((line.split()[1] for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))), "")
    return done.returncode, failed, round(time.time() - t, 1)


def planted(text: str, plant: Plant) -> str:
    if text.count(plant.old) != 1:
        raise ValueError(f"plant {plant.name!r}: its line occurs {text.count(plant.old)} times in {SOURCE}, "
                         f"not once; update PLANTS to the code")
    return text.replace(plant.old, plant.new)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="these plants alone; writes nothing")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    if args.list:
        for p in PLANTS:
            print(f"{p.name:32s} {p.function:18s} {p.bug}")
        return 0
    plants = [p for p in PLANTS if not args.only or p.name in args.only]
    if args.only and len(plants) != len(args.only):
        raise SystemExit(f"unknown plant among {args.only}; --list names them")
    if "MTBERT_DATA_DIR" not in os.environ:  # the tests run from the copy, one folder deeper than conftest expects
        os.environ["MTBERT_DATA_DIR"] = str((ROOT.parent / "shared" / "data" / "cs224n").resolve())
    copy_repository(WORK)
    source = (WORK / SOURCE).read_text()
    for p in plants:
        planted(source, p)  # every plant still matches the code, before minutes are spent
    rc, failed, seconds = run_tests(WORK)
    if rc != 0:
        raise SystemExit(f"the tests fail without any plant ({failed}); fix them first")
    print(f"the selection passes unplanted in {seconds} s")
    rows = []
    try:
        for p in plants:
            (WORK / SOURCE).write_text(planted(source, p))
            rc, failed, seconds = run_tests(WORK)
            status = {0: "survived", 1: "killed"}.get(rc, f"error (exit {rc})")
            rows.append({**asdict(p), "status": status, "failed_test": failed, "seconds": seconds})
            print(f"{p.name:32s} {status:9s} {seconds:6.1f} s  {failed}", flush=True)
    finally:
        (WORK / SOURCE).write_text(source)
    if args.only:
        return 0
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    killed = sum(r["status"] == "killed" for r in rows)
    summary = {"commit": commit, "source": SOURCE, "selection": SELECTION, "killed": killed,
               "planted": len(rows), "plants": rows}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = [f"# Bugs planted by hand in the training loop ({SOURCE})", "",
          f"Produced by `python benchmarks/planted_bugs.py` (code at {commit}): each bug planted alone, the "
          f"training tests of pyproject.toml's mutation selection run against it.", "",
          f"**{killed} of {len(rows)} killed.**", "",
          "| plant | function | what it would do | status | first failing test |", "|---|---|---|---|---|"]
    md += [f"| `{r['name']}` | `{r['function']}` | {r['bug']} | {r['status']} | `{r['failed_test']}` |" for r in rows]
    (OUT / "summary.md").write_text("\n".join(md) + "\n")
    print(f"{killed} of {len(rows)} killed; {OUT.relative_to(ROOT)}/summary.md")
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
