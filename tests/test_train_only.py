"""reproduce --train-only: a profile's runs trained N at a time without papermill; the notebooks then train nothing."""

import json
import os
import signal
import time

import pytest

from mtbert_utils import packing, reproduce


def run_files(results_dir):
    """Every file training writes (result JSONs, checkpoints, predictions) -> (mtime, bytes); not the notebooks'
    index files, nor notebook 04's zero-shot row (evaluated each time, not trained)."""
    runs = results_dir / "runs"
    return {str(p.relative_to(runs)): (p.stat().st_mtime_ns, p.read_bytes()) for p in runs.rglob("*")
            if p.is_file() and p.name != "index.json" and not p.name.startswith("zero-shot")}


@pytest.mark.slow
def test_train_only_two_jobs_then_notebooks_train_nothing(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MTBERT_DATA_DIR", str(data_dir))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert reproduce.main(["--profile", "smoke", "--train-only", "--jobs", "2", "--out", str(tmp_path)]) == 0
    results = tmp_path / "results" / "smoke"
    log = json.loads((results / "executed" / "train-only.json").read_text())
    assert (log["trained"], log["reused"], log["failed"], log["jobs"]) == (12, 0, 0, 2)
    trained = run_files(results)
    assert sorted(p for p in trained if "/" not in p) == sorted(f"{r['run_name']}.json" for r in log["runs"])
    # when each run started (for packing timelines): two at once from the start, every other one later
    starts = sorted(r["start_s"] for r in log["runs"])
    assert len(starts) == 12 and 0 <= starts[0] <= starts[1] < starts[2] <= log["minutes"] * 60

    again = packing.train_only("smoke", out_root=tmp_path, jobs=2)  # everything is there: nothing to train
    assert (again["trained"], again["reused"]) == (0, 12)
    # ... and the summary of the call that trained them stays (a committed GPU record is not replaced)
    assert json.loads((results / "executed" / "train-only.json").read_text()) == log

    reproduce.run("smoke", out_root=tmp_path)  # the notebooks, with papermill: they find every run
    assert run_files(results) == trained  # no result, checkpoint or prediction file added or rewritten
    assert (results / "table1.csv").exists()


CRASHY = """
import os, signal, time

def work(item):
    if item.get("started"):
        open(item["started"], "w").close()
    if item.get("sleep"):
        time.sleep(item["sleep"])
    if item["crash"]:
        os.kill(os.getpid(), signal.SIGSEGV)  # as torch's autograd thread did with CUDA graphs on an H200
    return {"status": "trained", "pid": os.getpid(), "name": item["name"]}


def trained_at_once(config):  # a training worker's stand-in that trains nothing
    return {"status": "trained", "started_unix": time.time(), "seconds": 0.01}


def graphs_crash(item):  # a training worker's stand-in: dies with cuda_graphs, or always if named so
    if item["cuda_graphs"] or item["name"] == "always":
        os.kill(os.getpid(), signal.SIGSEGV)
    return {"status": "trained", "seconds": 0.5, "cuda_graphs": item["cuda_graphs"]}
"""


@pytest.fixture
def crashy(tmp_path, monkeypatch):
    """The CRASHY module, importable by name in this process and in RunPool's spawned workers."""
    (tmp_path / "crashy.py").write_text(CRASHY)
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers get the parent's sys.path
    import crashy
    return crashy


def test_a_worker_that_crashes_fails_only_its_run(crashy):
    """A segfault used to break the whole ProcessPoolExecutor: all 18 runs of a GPU job failed with
    BrokenProcessPool and no word of which run crashed. Now only that run fails, saying how, and a new worker
    takes the next one."""
    items = [{"name": n, "seed": 0, "crash": n == "b"} for n in "abc"]
    with packing.RunPool(1, threads=1, env={}, target=crashy.work) as pool:
        assert pool.workers == []  # started as runs come: none for a call that reuses every run
        a, b, c = (f.result(timeout=120) for f in [pool.submit(i) for i in items])
        assert len(pool.workers) == 1 and pool.workers[0][0].is_alive()
    assert (a["status"], a["name"], c["status"], c["name"]) == ("trained", "a", "trained", "c")
    assert (b["status"], b["error"]) == ("failed", "its worker process died: killed by SIGSEGV (exit -11)")
    assert 0 <= b["seconds"] < 120 and b["started_unix"] > 0  # when it crashed, for packing timelines
    assert a["pid"] != c["pid"]  # the crashed worker was replaced
    assert not any(proc.is_alive() for proc, _ in pool.workers)  # ended with the pool
    assert packing.died(1) == "exit 1"

    t0 = time.monotonic()  # interrupted (Ctrl-C, an error) while a run trains: its worker is stopped, not awaited
    with pytest.raises(KeyboardInterrupt), packing.RunPool(1, threads=1, env={}, target=crashy.work) as pool:
        busy = pool.submit({"name": "slow", "seed": 0, "crash": False, "sleep": 300})
        while not pool.workers:
            time.sleep(0.05)
        proc = pool.workers[0][0]
        raise KeyboardInterrupt
    assert time.monotonic() - t0 < 60 and not proc.is_alive()
    assert busy.result(timeout=10)["status"] == "failed"


def test_a_run_whose_worker_dies_with_cuda_graphs_is_trained_again_without(crashy, capsys):
    """The segfault came with CUDA graphs: such a run is trained again once, eagerly (it resumes from its last
    checkpoint under the same name), and its record says so. A run that dies without them stays failed, and a
    Python error is not retried (cuda_graphs on a CPU fails at once, saying why)."""
    from mtbert_utils.config import TrainConfig
    cfgs = [TrainConfig(name="graphed", encoder="tiny", pad_to_multiple=16, cuda_graphs=True),
            TrainConfig(name="always", encoder="tiny", pad_to_multiple=16, cuda_graphs=True),
            TrainConfig(name="eager", encoder="tiny")]
    todo = [({"notebook": "nb", "run_name": c.run_name, "examples": {"full": 1, "heads_only": 0}}, c) for c in cfgs]
    records = []
    with packing.RunPool(1, threads=1, env={}, target=crashy.graphs_crash) as pool:
        packing.train_wave(pool, todo, records, "stage 1")
    runs = {r["run_name"].split("-")[0]: r for r in records}
    assert sorted(runs) == ["always", "eager", "graphed"] and len(records) == 3
    sigsegv = "its worker process died: killed by SIGSEGV (exit -11)"
    assert (runs["graphed"]["status"], runs["graphed"]["cuda_graphs"]) == ("trained", False)
    assert runs["graphed"]["eager_retry"]["error"] == sigsegv
    assert (runs["always"]["status"], runs["always"]["error"]) == ("failed", sigsegv)  # retried once, no more
    assert runs["always"]["eager_retry"]["error"] == sigsegv
    assert (runs["eager"]["status"], runs["eager"]["cuda_graphs"]) == ("trained", False)
    assert "eager_retry" not in runs["eager"]
    assert not packing.retry_eagerly(cfgs[0], {"status": "failed", "error": "ValueError: cuda_graphs=True needs CUDA"})
    oom = {"status": "failed", "error": "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB"}
    assert packing.retry_eagerly(cfgs[0], oom)  # torch.OutOfMemoryError, as a worker reports it
    assert not packing.retry_eagerly(cfgs[2], oom)  # already eager: nothing to drop
    assert not packing.retry_eagerly(cfgs[0], {**oom, "status": "trained"})
    packing.print_summary({"profile": "p", "shard": "0/1", "jobs": 1, "threads_per_job": 1, "trained": 2,
                           "reused": 0, "failed": 1, "to train": 0, "minutes": 0.1, "not_listed": [],
                           "expected_examples": {"full": 3, "heads_only": 0}, "runs": records})
    out = capsys.readouterr()
    assert f"[retry] {runs['graphed']['run_name']}: {sigsegv}; again without cuda_graphs" in out.out + out.err
    assert f"without cuda_graphs after failing with them ({sigsegv}): nb {runs['graphed']['run_name']}, trained" \
        in out.out


REAL_RUN_POOL = packing.RunPool  # the next test stands a pool of it in for train_only's


def test_the_summary_is_written_after_every_run_so_a_stopped_call_keeps_it(crashy, data_dir, tmp_path,
                                                                         monkeypatch):
    """A GPU slot's budget stops the train-only call with SIGTERM. The summary used to be written at the end only,
    so GPU session 3 lost every run's start time (packing timelines need them). Now it is rewritten (atomically)
    once the stage's runs are submitted and after each run ends, naming the runs not ended (training, or waiting for a slot)."""
    monkeypatch.setenv("MTBERT_DATA_DIR", str(data_dir))
    monkeypatch.setattr(packing, "RunPool", lambda jobs, threads, env: REAL_RUN_POOL(jobs, threads, env,
                                                                                   target=crashy.trained_at_once))
    writes = []
    monkeypatch.setattr(packing, "write_json", lambda path, obj: writes.append((path, json.loads(json.dumps(obj)))))
    final = packing.train_only("smoke", out_root=tmp_path, jobs=1)
    paths = {path for path, _ in writes}
    assert paths == {tmp_path / "results" / "smoke" / "executed" / "train-only.json"}
    summaries = [obj for _, obj in writes]
    assert summaries[-1] == final and final["complete"] and final["unfinished"] == []
    first_stage = [r["run_name"] for r in final["runs"] if r["stage"] == 1]
    n = len(first_stage)
    assert n >= 2 and final["trained"] == n  # later stages need real run files: not listed
    # submitted, then one write per run ended, then the final one
    assert [(s["complete"], s["trained"], len(s["unfinished"])) for s in summaries] == \
        [(False, k, n - k) for k in range(n + 1)] + [(True, n, 0)]
    for k, s in enumerate(summaries[:-1]):
        assert sorted(s["unfinished"] + [r["run_name"] for r in s["runs"]]) == sorted(first_stage)
        assert s["unfinished"] == sorted(s["unfinished"])
        # minutes are rounded to 0.01 (0.3 s either way), start_s to 0.1 s (0.05 s)
        assert all(0 <= r["start_s"] <= s["minutes"] * 60 + 0.3 + 0.05 and "started_unix" not in r for r in s["runs"])
        assert s["expected_examples"]["full"] == sum(r["examples"]["full"] for r in s["runs"])
        assert (s["profile"], s["shard"], s["jobs"], s["threads_per_job"]) == ("smoke", "0/1", 1, packing.usable_cores())


def test_a_ctrl_c_is_for_the_parent_alone(crashy, tmp_path):
    """A Ctrl-C reaches every process of the terminal's group. A worker ignores it (no traceback per worker, no
    run lost to it): the parent's KeyboardInterrupt stops the workers (above)."""
    started = tmp_path / "started"
    with packing.RunPool(1, threads=1, env={}, target=crashy.work) as pool:
        busy = pool.submit({"name": "a", "seed": 0, "crash": False, "sleep": 2, "started": str(started)})
        deadline = time.monotonic() + 120
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(pool.workers[0][0].pid, signal.SIGINT)
        out = busy.result(timeout=120)
    assert (out["status"], out["name"]) == ("trained", "a"), out


def test_shard_arithmetic():
    assert packing.parse_shard("0/8") == (0, 8)
    assert packing.parse_shard("7/8") == (7, 8)
    for bad in ("8/8", "-1/8", "1/0", "3", "a/b"):
        with pytest.raises(reproduce.ReproduceError, match="--shard"):
            packing.parse_shard(bad)
    runs = list(range(18))
    shards = [runs[k::8] for k in range(8)]  # what train_only takes of each stage's list
    assert sorted(r for s in shards for r in s) == runs  # every run once, in exactly one shard
    assert shards[3] == [3, 11]


@pytest.mark.parametrize("args", [["--train-only", "--shard", "5/2"], ["--list-runs", "--set", "no_such_parameter=1"]])
def test_train_only_errors_are_a_message_from_the_command_line(args, tmp_path):
    """`python -m mtbert_utils.reproduce` with a bad --shard or --set: one line naming the problem and exit 1, not a
    traceback (the module run as __main__ is a second copy of reproduce; packing raises the package's error class)."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "mtbert_utils.reproduce", "--profile", "smoke", "--out", str(tmp_path),
                           *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("reproduce: error: ") and ("--shard '5/2'" in proc.stderr
                                                            or "no_such_parameter" in proc.stderr), proc.stderr


def test_list_runs_shards_partition_the_profile(data_dir, monkeypatch, tmp_path, capsys):
    """The shards' lists, together, are the whole list, each run in exactly one shard (nothing trains here)."""
    monkeypatch.setenv("MTBERT_DATA_DIR", str(data_dir))
    whole = packing.train_only("smoke", out_root=tmp_path, list_only=True)
    parts = [packing.train_only("smoke", out_root=tmp_path, list_only=True, shard=(k, 5)) for k in range(5)]
    names = [r["run_name"] for p in parts for r in p["runs"]]
    assert sorted(names) == sorted(r["run_name"] for r in whole["runs"]) and len(set(names)) == len(names) == 12
    assert not (tmp_path / "results").exists()  # listing writes nothing
    # each run's expected training examples, and the profile's total, as listed and printed
    for kind in ("full", "heads_only"):
        assert whole["expected_examples"][kind] == sum(r["examples"][kind] for r in whole["runs"])
        assert whole["expected_examples"][kind] == sum(p["expected_examples"][kind] for p in parts)
    assert all(r["examples"]["full"] > 0 for r in whole["runs"])
    packing.print_summary(whole)
    assert f"{whole['expected_examples']['full']:,} with the encoder training" in capsys.readouterr().out


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA: several runs share one GPU")
def test_train_only_runs_share_one_gpu(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MTBERT_DATA_DIR", str(data_dir))
    summary = packing.train_only("smoke", overrides={"seeds": [0]}, out_root=tmp_path, jobs=3)
    assert summary["failed"] == 0 and summary["trained"] == 6
    import torch
    assert {r["device"] for r in summary["runs"]} == {torch.cuda.get_device_name(0)}  # a run records the GPU's name

