"""Run packing: every training run a profile's notebooks make, trained without papermill, N at a time.

    python -m mtbert_utils.reproduce --profile gpu-minilm --train-only --jobs 10     # one GPU, 10 processes
    python -m mtbert_utils.reproduce --profile gpu-minilm --train-only --shard 3/8   # machine 3 of 8 (0-based)
    python -m mtbert_utils.reproduce --profile gpu-minilm --list-runs                 # what would train

The runs come from mtbert_utils.plans with the parameters papermill would give each notebook, so their
names match the notebooks' and a later `reproduce` (on any machine) reuses their result files. Runs are
listed stage by stage (notebook 09's later stages need its earlier runs); within a stage, notebooks in
profile order, seed by seed, each run once (notebook 05 reuses 04's runs). Each worker process trains one
run at a time; one that dies fails only its run (RunPool). See docs/gpu.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

from mtbert_utils.budget import expected_examples, relative_cost
from mtbert_utils.reproduce import (ReproduceError, absolute_path, declared_parameters, notebook_path, resolve,
                                    with_absolute_data_dir)
from mtbert_utils.results import repo_relative, write_json


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N): K is 0-based (0 <= K < N), as a SLURM array's $SLURM_ARRAY_TASK_ID with --array=0-(N-1)."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ReproduceError(f"--shard {text!r}: expected K/N with integers, e.g. 0/8") from None
    if n < 1 or not 0 <= k < n:
        raise ReproduceError(f"--shard {text!r}: need N >= 1 and 0 <= K < N (K is 0-based)")
    return k, n


def notebook_defaults(name: str) -> dict:
    return {k: spec["default"] for k, spec in declared_parameters(notebook_path(name)).items()}


def training_notebooks(plan: list[tuple[str, dict]]) -> dict[str, dict]:
    """notebook -> its full parameters (parameters-cell defaults overlaid by the profile's), for the notebooks of
    `plan` (reproduce.resolve's) that train; a relative data_dir resolved against the caller's directory."""
    from mtbert_utils import plans
    return {nb: {**notebook_defaults(nb), **with_absolute_data_dir(p)} for nb, p in plan if nb in plans.STAGES}


def finished_run(config) -> dict | None:
    """The run's result if it finished with this config (training.read_finished, as train() decides), else None;
    an unreadable result file counts as not finished here (training it says why)."""
    from mtbert_utils.training import read_finished
    try:
        return read_finished(Path(config.out_dir) / f"{config.run_name}.json", config)
    except (OSError, json.JSONDecodeError):
        return None


def stage_runs(notebook: str, params: dict, stage: int, earlier: list, out_dir: Path) -> list[tuple[str, object]]:
    """[(key, config with seed and out_dir)] of one stage of a notebook, seed by seed (as experiments.run_grid)."""
    from mtbert_utils import plans
    configs = plans.STAGES[notebook][stage](params, earlier)
    return [(key, dataclasses.replace(cfg, seed=int(seed), out_dir=str(out_dir)))
            for seed in params["seeds"] for key, cfg in configs.items()]


def _init_worker(threads: int, env: dict) -> None:
    import faulthandler
    import torch
    # a Ctrl-C goes to the whole process group: the parent alone answers it (RunPool stops its workers), instead
    # of every worker printing its own KeyboardInterrupt traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.update(env)
    torch.set_num_threads(threads)
    faulthandler.enable(all_threads=True)  # a crash in C++ (a segfault, say) still prints each thread's Python stack
    try:  # Linux: end with the parent (killed at a time budget, say) instead of training on as an orphan
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_main(conn, threads: int, env: dict, target) -> None:
    """A worker process: take one item at a time from the pipe, send back target(item); None ends it."""
    _init_worker(threads, env)
    while (item := conn.recv()) is not None:
        # names the run in the log, so that a crash's stack dump below it can be traced to its run
        print(f"[worker {os.getpid()}] {item.get('name')} seed {item.get('seed')}", file=sys.stderr, flush=True)
        conn.send(target(item))


def died(exitcode: int | None) -> str:
    """How a worker process ended, in words: 'killed by SIGSEGV (exit -11)'."""
    if exitcode is not None and exitcode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-exitcode).name} (exit {exitcode})"
    return f"exit {exitcode}"


class RunPool:
    """Up to `jobs` spawned worker processes (started as runs come), each training one run at a time, its data
    cache kept between runs.
    Unlike a ProcessPoolExecutor, a worker that dies (a segfault, the OOM killer) fails only the run it held:
    that run comes back as failed, saying how the process ended, and a new worker takes the next run."""

    def __init__(self, jobs: int, threads: int, env: dict, target=None):
        import multiprocessing
        import queue
        import threading
        from concurrent.futures import ThreadPoolExecutor
        self.ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked CUDA or thread pools
        self.jobs, self.args, self.target = jobs, (threads, env), target or _train_worker
        self.idle, self.lock = queue.SimpleQueue(), threading.Lock()
        self.workers: list = []
        self.threads = ThreadPoolExecutor(jobs)  # one waits on each busy worker

    def _start(self):
        conn, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker_main, args=(child, *self.args, self.target))
        proc.start()
        child.close()
        return proc, conn

    def submit(self, item: dict):
        return self.threads.submit(self._run, item)

    def _take(self):
        """An idle worker, or a new one while fewer than `jobs` have started (no process for a call that reuses
        every run)."""
        with self.lock:
            if self.idle.empty() and len(self.workers) < self.jobs:
                self.workers.append(self._start())
                return self.workers[-1]
        return self.idle.get()

    def _run(self, item: dict) -> dict:
        proc, conn = worker = self._take()
        t0 = time.time()
        try:
            conn.send(item)
            out = conn.recv()
        except (EOFError, OSError):  # the worker died with the run (or __exit__ stopped it)
            proc.join(timeout=30)
            with self.lock:
                self.workers.remove(worker)  # the next run starts a new one
            return {"status": "failed", "error": f"its worker process died: {died(proc.exitcode)}",
                    "exitcode": proc.exitcode, "started_unix": t0, "seconds": time.time() - t0}
        except BaseException:  # the item could not be sent (not picklable, say): the worker is still fine
            self.idle.put(worker)
            raise
        self.idle.put(worker)
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        workers = list(self.workers)
        for proc, conn in workers:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc, _ in workers:
            proc.join(timeout=None if exc[0] is None else 5)
            if proc.is_alive():  # interrupted: do not wait for a run to finish
                proc.terminate()
                proc.join()
        self.threads.shutdown(wait=True, cancel_futures=True)


def _train_worker(config_dict: dict) -> dict:
    """Train one run in a worker process; failures come back as a record (the pool keeps going)."""
    import traceback
    from mtbert_utils.training import TrainConfig, train
    t0 = time.time()
    try:
        result = train(TrainConfig.from_dict(config_dict), resume=True)
    except Exception as e:  # noqa: BLE001 - reported by name in the summary
        return {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
                "started_unix": t0, "seconds": time.time() - t0}
    return {"status": "trained", "started_unix": t0, "seconds": time.time() - t0, "device": result.get("device"),
            "resumes": result.get("resumes", 0), "dev_mean": result.get("dev", {}).get("mean")}


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def train_only(profile_name: str, only: list[str] | None = None, overrides: dict | None = None,
               out_root: str | Path | None = None, jobs: int = 1, shard: tuple[int, int] = (0, 1),
               list_only: bool = False) -> dict:
    """Train every run the profile's notebooks make (plans.STAGES), `jobs` at a time in spawned processes,
    without papermill; finished runs are reused, interrupted ones resume from their checkpoint.

    With shard (K, N), this process takes runs K, K+N, K+2N, ... of each stage's list. A stage whose earlier
    runs are not all here (another shard trained them) is left for a later call, after the run files are
    collected. Returns the summary, also written to {results}/executed/train-only[-shardKofN].json."""
    from mtbert_utils import plans
    from mtbert_utils.data import ENV_VAR

    if jobs < 1:
        raise ReproduceError(f"--jobs must be >= 1, got {jobs}")
    profile, results_dir, _, plan = resolve(profile_name, only, overrides, out_root)
    params = training_notebooks(plan)
    earlier: dict[str, list | None] = {nb: [] for nb in params}
    threads = max(1, usable_cores() // jobs)
    records, blocked, t_start = [], [], time.time()
    minilm_dir = os.environ.get("MTBERT_MINILM_DIR")
    # the workers' $MTBERT_DATA_DIR, resolved here against the caller's directory (as the notebooks get it)
    env = {ENV_VAR: absolute_path(os.environ[ENV_VAR])} if os.environ.get(ENV_VAR) else {}
    pool = contextlib.nullcontext() if list_only else RunPool(jobs, threads, env)
    suffix = f"-shard{shard[0]}of{shard[1]}" if shard[1] > 1 else ""

    def save(unfinished, complete: bool = False) -> dict:
        """The summary so far, written after every finished run too: a call stopped midway (a GPU slot's time
        budget) keeps what its finished runs took and when they started; `unfinished` names the runs submitted
        and not ended (training, or waiting for a slot) and `complete` is false."""
        summary = summarize(records, t_start, unfinished, complete, profile=profile["_name"],
                            shard=f"{shard[0]}/{shard[1]}", jobs=jobs, threads_per_job=threads,
                            not_listed=blocked, overrides=overrides or {},
                            minilm_dir=minilm_dir and repo_relative(minilm_dir))
        path = results_dir / "executed" / f"train-only{suffix}.json"
        # a call that only found finished runs keeps the summary of the call that trained them (its device,
        # minutes and jobs: the committed GPU record) instead of replacing it with a record of nothing
        nothing_new = not summary["trained"] and not summary["failed"] and not summary["unfinished"]
        if not list_only and not (nothing_new and path.exists()):
            write_json(path, summary)
        return summary

    with pool:
        for stage in range(max((len(plans.STAGES[nb]) for nb in params), default=0)):
            wave = stage_wave(params, earlier, stage, results_dir / "runs", blocked)
            todo = sort_out(wave[shard[0]::shard[1]], records, list_only)
            if todo:
                train_wave(pool, todo, records, f"{profile['_name']} stage {stage + 1}", on_change=save)
            advance(params, earlier, stage, results_dir / "runs")
    return save(unfinished=(), complete=True)


def summarize(records: list[dict], t_start: float, unfinished, complete: bool, **head) -> dict:
    """A train-only summary of `records` (one per run) at this moment: counts, expected examples, each run's
    start in seconds from `t_start` (for packing timelines), the runs submitted and not ended (`unfinished`)."""
    runs = [{k: v for k, v in r.items() if k != "started_unix"}
            | ({"start_s": round(r["started_unix"] - t_start, 1)} if "started_unix" in r else {}) for r in records]
    count = {s: sum(r["status"] == s for r in runs) for s in ("trained", "reused", "failed", "to train")}
    examples = {k: sum(r["examples"][k] for r in runs) for k in ("full", "heads_only")}
    return {**{k: head[k] for k in ("profile", "shard", "jobs", "threads_per_job")},
            "minutes": round((time.time() - t_start) / 60, 2), **count, "expected_examples": examples,
            "complete": complete, "unfinished": sorted(unfinished),
            **{k: head[k] for k in ("not_listed", "overrides", "minilm_dir")}, "runs": runs}


def stage_wave(params: dict, earlier: dict, stage: int, out_dir: Path, blocked: list) -> list[tuple]:
    """[(notebook, key, config)] of one stage over the profile's notebooks, each run once; a notebook whose
    earlier stages are not all here is named in `blocked` instead."""
    from mtbert_utils import plans
    wave, seen = [], set()
    for nb, p in params.items():
        if stage >= len(plans.STAGES[nb]):
            continue
        if earlier[nb] is None:
            blocked.append(f"{nb} stage {stage + 1}")
            continue
        for key, cfg in stage_runs(nb, p, stage, earlier[nb], out_dir):
            if cfg.run_name not in seen:
                seen.add(cfg.run_name)
                wave.append((nb, key, cfg, stage))
    return wave


def sort_out(wave: list, records: list, list_only: bool) -> list[tuple[dict, object]]:
    """Record the runs that are done (or, listing, still to train); return [(record, config)] to train."""
    todo = []
    for nb, key, cfg, stage in wave:
        rec = {"notebook": nb, "stage": stage + 1, "run_name": cfg.run_name, "examples": expected_examples(cfg)}
        if finished_run(cfg) is not None:
            records.append({**rec, "status": "reused"})
        elif list_only:
            records.append({**rec, "status": "to train"})
        else:
            todo.append((rec, cfg))
        if list_only:
            ex = rec["examples"]
            print(f"stage {stage + 1}  {nb:20s} {cfg.run_name:55s} {records[-1]['status']:8s} "
                  f"{ex['full']:>10,} + {ex['heads_only']:>9,} heads-only examples")
    return todo


def train_wave(pool, todo: list, records: list, desc: str, on_change=None) -> None:
    """Train the runs of one stage in the pool, longest first, with a bar over runs and a line per run;
    `on_change(names not ended)` is called once they are all submitted and after every run that ends."""
    from concurrent.futures import FIRST_COMPLETED, wait
    from mtbert_utils import progress
    todo = sorted(todo, key=lambda rc: -relative_cost(rc[0]["examples"]))  # longest first: they finish closer
    bar = progress.bar(total=len(todo), desc=desc, unit="run")

    def submit(rec: dict, cfg) -> None:
        pending[pool.submit(dataclasses.replace(cfg, progress=False).to_dict())] = (rec, cfg)
    pending: dict = {}
    for rec, cfg in todo:
        submit(rec, cfg)
    if on_change:
        on_change([r["run_name"] for r, _ in pending.values()])
    while pending:
        for fut in wait(pending, return_when=FIRST_COMPLETED)[0]:
            rec, cfg = pending.pop(fut)
            try:
                out = fut.result()
            except Exception as e:  # noqa: BLE001 - the run could not be sent to a worker (RunPool reports deaths)
                out = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
            if retry_eagerly(cfg, out):
                progress.write(f"[retry] {rec['run_name']}: {out['error']}; again without cuda_graphs, "
                               f"from its last checkpoint")
                submit({**rec, "eager_retry": {"error": out["error"], "seconds": round(out["seconds"], 1)}},
                       dataclasses.replace(cfg, cuda_graphs=False))
                continue
            records.append({**rec, **out})
            bar.update()
            progress.write(f"[{out['status']}] {rec['run_name']}"
                           + (f" in {out['seconds']:.0f}s" if "seconds" in out else "")
                           + (" (without cuda_graphs, after failing with them)" if "eager_retry" in rec else "")
                           + (f": {out['error']}" if out["status"] == "failed" else ""))
            if on_change:
                on_change([r["run_name"] for r, _ in pending.values()])
    bar.close()


def retry_eagerly(cfg, out: dict) -> bool:
    """Whether a failed run is trained again, once, without cuda_graphs: its worker process died (not a Python
    error) while it trained with them, as torch's autograd thread segfaulted with CUDA graphs in packed runs on an
    H200 (docs/speed.md), or it ran out of GPU memory with them (graphs keep their memory pools, and runs sharing
    an 80 GB H100 with graphs are unmeasured). The switch is execution-only: the run keeps its name and resumes
    from its last epoch's checkpoint, which loads into the eager model. Other Python errors are not retried."""
    return (out["status"] == "failed" and cfg.cuda_graphs
            and ("exitcode" in out or out.get("error", "").startswith("OutOfMemoryError")))


def advance(params: dict, earlier: dict, stage: int, out_dir: Path) -> None:
    """The next stage of each notebook sees this stage's finished runs, or waits (None) while any is missing."""
    from mtbert_utils import plans
    for nb in params:
        if earlier[nb] is None or stage >= len(plans.STAGES[nb]) - 1:
            continue
        runs = {}
        for key, cfg in stage_runs(nb, params[nb], stage, earlier[nb], out_dir):
            runs.setdefault(key, []).append(finished_run(cfg))
        earlier[nb] = None if any(r is None for rs in runs.values() for r in rs) else earlier[nb] + [runs]


def print_summary(summary: dict) -> None:
    print(f"profile {summary['profile']} (shard {summary['shard']}, {summary['jobs']} jobs x "
          f"{summary['threads_per_job']} threads): {summary['trained']} trained, {summary['reused']} reused, "
          f"{summary['failed']} failed" + (f", {summary['to train']} to train" if summary["to train"] else "")
          + f" in {summary['minutes']:.1f} min")
    ex = summary["expected_examples"]
    print(f"  training examples of these runs, expected: {ex['full']:,} with the encoder training, "
          f"{ex['heads_only']:,} heads-only ({relative_cost(ex):,.0f} full-step equivalents)")
    for r in summary["runs"]:
        if r["status"] == "failed":
            print(f"  FAILED {r['notebook']} {r['run_name']}: {r['error']}")
        if "eager_retry" in r:
            print(f"  without cuda_graphs after failing with them ({r['eager_retry']['error']}): {r['notebook']} "
                  f"{r['run_name']}, {r['status']}")
    if summary["not_listed"]:
        print(f"  not listed: {', '.join(summary['not_listed'])} (they need earlier runs that are not all here: "
              f"failed, or trained by another shard; collect the run files and call again)")
