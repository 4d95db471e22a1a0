"""Does inductor's on-disk cache carry a compiled encoder from one run's process to the next? (gpu_run.py's
--warm-compile counts on it: tiny runs compile first, then the real runs load what they compiled.)

    python benchmarks/compile_cache.py --out results/bench/compile_cache_cpu.json

Three runs of one small training (MiniLM, 64 training examples a task, one full epoch, 32 dev examples), each
in a new process, one after the other:
  1. eager (compile=False);
  2. compile=True with an empty inductor cache (its own folder, $TORCHINDUCTOR_CACHE_DIR);
  3. compile=True again, another seed (other examples, so nothing resumes), with the cache the second left.
`compile` is torch.compile(dynamic=True) of the encoder: on CUDA, `cuda_graphs` compiles the same way with
mode="reduce-overhead" on top, through the same dynamo, AOTAutograd and FX graph caches. On CPU inductor writes
C++ instead of Triton kernels, so the seconds here are not a GPU's; what carries over is the question.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETS = ['encoder="minilm"', 'max_train={"sst": 64, "para": 64, "sts": 64}', "max_dev=32", "phases=[[1, true]]",
        "progress=false"]
RUNS = [("eager", False, 0), ("compiled, empty cache", True, 0), ("compiled, cache of the run before", True, 1)]


def train(label: str, compile_: bool, seed: int, out_dir: Path, env: dict) -> dict:
    sets = SETS + [f"compile={json.dumps(compile_)}", f"seed={seed}", f"out_dir={json.dumps(str(out_dir))}"]
    cmd = [sys.executable, "-m", "mtbert_utils.train", "--preset", "baseline"] + [a for s in sets for a in ("--set", s)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{label}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    result = json.loads(next(out_dir.glob("*.json")).read_text())
    return {"run": label, "compile": compile_, "seed": seed, "process_s": round(wall, 1),
            "train_time_s": round(result["train_time_s"], 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    args = ap.parse_args(argv)
    import torch
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor"), "HF_HUB_OFFLINE": "1"}
        runs = []
        for i, (label, compile_, seed) in enumerate(RUNS):
            runs.append(train(label, compile_, seed, Path(tmp) / f"run{i}", env))
            print(json.dumps(runs[-1]), flush=True)
        cache = [f for f in (Path(tmp) / "inductor").rglob("*") if f.is_file()]
        eager = runs[0]["train_time_s"]
        out = {"what": "one small MiniLM training (64 examples a task, 1 full epoch) in a new process each: eager, "
                       "compiled with an empty inductor cache, compiled again with the cache the run before left",
               "device": "cpu", "cpu_count": os.cpu_count(), "torch": torch.__version__,
               "python": platform.python_version(),
               "runs": runs,
               "compiling_s": {"empty_cache": round(runs[1]["train_time_s"] - eager, 1),
                               "cache_of_the_run_before": round(runs[2]["train_time_s"] - eager, 1)},
               "cache": {"files": len(cache), "mib": round(sum(f.stat().st_size for f in cache) / 2**20, 1)},
               "command": "python benchmarks/compile_cache.py --out results/bench/compile_cache_cpu.json"}
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
