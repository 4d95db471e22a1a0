"""Data-parallel training: 2 and 3 processes (torchrun, gloo, CPU) against one process on the concatenated batch.

The 2-process runs go through the real entry points: `train()` (this file is also the
torchrun worker, see `worker`) and `python -m mtbert_utils.train` for the kill-and-resume test.
Per process batch 4 against one process with batch 8: the same global batches, so the
parameters must agree to float tolerance. The task sizes are chosen so that the last
global batch splits unevenly (sst: 29 -> chunks 3 + 2) or leaves rank 1 empty (para: 25
-> 1 + 0), which exercises the chunk-size weighting and the stand-in example. With 3 processes
(global batch 12): sst 2 + 2 + 1, para 1 + 0 + 0 (two stand-ins), sts 3 + 3 + 2.
A non-finite loss on one process must stop every process at that step, with the error.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import float32_tol
import mtbert_utils.model
import mtbert_utils.training
from mtbert_utils.training import TrainConfig, train

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

REPO = Path(__file__).resolve().parents[1]


def roundings_per_step(global_batch: int) -> int:
    """The 1- and N-process runs sum the same float32 terms in another order. Per step, the longest chain
    of roundings: the tiny encoder's widest dot product (intermediate size 128) plus the examples of the
    global batch; the differences add up over the steps (conftest.float_tol). A data-parallel bug (one
    rank's part of the batch, a sum for a mean) moves the weights by lr * |grad|, far above this."""
    return 128 + global_batch
_tiny_config, _build_optimizer = mtbert_utils.model.tiny_config, mtbert_utils.training.build_optimizer

BASE = dict(encoder="tiny", dropout=0.0, phases=[[1, False], [1, True]], batch_size=4, max_dev=8,
            max_train={"sst": 29, "para": 25, "sts": 32}, progress=False,
            lr={"encoder": 0.1, "shared": 0.1, "sst": 0.1, "para": 0.1, "sts": 0.1})
RUNS = {
    # one task per step: heads unused on most steps, and sts-only steps of the frozen epoch
    # (cosine head) have no loss at all
    "plain": dict(BASE, schedule="proportional"),
    # all three tasks every step: the surgery has something to project. Linear STS head: the
    # gradient of cos(u, v) at u ~ v (a tiny random encoder) is too ill-conditioned to compare
    "pcgrad": dict(BASE, schedule="rr_over", pcgrad=True, sts_head="linear", sts_loss="mse",
                   lr={**BASE["lr"], "sts": 0.01}),  # MSE on 0-5 scores diverges at 0.1
    # the cosine STS head under PCGrad, on an encoder initialised wider (see tiny_config_for)
    "pcgrad_cosine": dict(BASE, schedule="rr_over", pcgrad=True, sts_head="cosine"),
    # the three tasks through one encoder call (fuse_tasks), inside the DDP wrapper
    "fused": dict(BASE, schedule="rr_over", fuse_tasks=True, sts_head="linear", sts_loss="mse",
                  lr={**BASE["lr"], "sts": 0.01}),
}
RUNS_3 = ("plain", "pcgrad")  # the DDP path and the per-task averaging path, with 3 processes
# the kill-and-resume runs keep the real encoder dropout, AdamW and learning rates
RESUME = dict(BASE, schedule="rr_over", dropout=0.1, lr={k: 1e-3 for k in BASE["lr"]})


# Two test-only changes to the model, applied alike to both sides of every comparison:
def tiny_config_without_dropout():
    """Dropout masks differ with the batch split; without dropout only the arithmetic differs."""
    c = _tiny_config()
    c.hidden_dropout_prob = c.attention_probs_dropout_prob = 0.0
    return c


def tiny_config_for(name: str):
    """The cosine run also starts from weights drawn 10x wider: at the default init (0.02) every
    sentence embeds alike, all cosines lie within 1e-5 of 1, and the gradient of cos(u, v) at u ~ v
    turns float32 rounding into differences of percents. At 0.2 the dev cosines spread over 0.68-0.87."""
    if name != "pcgrad_cosine":
        return tiny_config_without_dropout

    def wide():
        c = tiny_config_without_dropout()
        c.initializer_range = 0.2
        return c
    return wide


def sgd_optimizer(model, config, device):
    """SGD instead of AdamW: the update is then linear in the gradient, which is what data
    parallelism must get right. (AdamW's first step is about lr * sign(g): it turns float
    noise in gradients that are zero in theory, such as attention key biases, into +-lr.)"""
    groups = [{"params": ps, "lr": config.lr[name], "base_lr": config.lr[name], "name": name}
              for name, ps in model.module_groups().items() if ps]
    return torch.optim.SGD(groups)



def config_for(run: dict, data_dir, out_dir, **overrides) -> TrainConfig:
    return TrainConfig.from_dict({**run, "data_dir": str(data_dir), "out_dir": str(out_dir), **overrides})


def worker(mode: str, data_dir: str, out_root: str) -> None:
    """Runs inside each process that torchrun starts. mode: "2" (every run of RUNS and the resume
    reference), "3" (RUNS_3) or "nan" (the pcgrad run, with a NaN loss on process 1 at step 2)."""
    from mtbert_utils import distributed
    torch.set_num_threads(1)
    mtbert_utils.training.build_optimizer = sgd_optimizer
    if mode == "nan":
        real_loss, calls = mtbert_utils.training.task_loss, []

        def poisoned(task, *args, **kw):
            loss = real_loss(task, *args, **kw)
            calls.append(task)
            # rr_over: one batch of each of the 3 tasks per step; process 1's para loss of step 2
            return loss * float("nan") if distributed.rank() == 1 and len(calls) == 5 else loss
        mtbert_utils.model.tiny_config = tiny_config_without_dropout
        mtbert_utils.training.task_loss = poisoned
        train(config_for(RUNS["pcgrad"], data_dir, Path(out_root)))
        return
    for name in RUNS if mode == "2" else RUNS_3:
        mtbert_utils.model.tiny_config = tiny_config_for(name)
        train(config_for(RUNS[name], data_dir, Path(out_root) / name))
    mtbert_utils.model.tiny_config = _tiny_config
    mtbert_utils.training.build_optimizer = _build_optimizer
    if mode == "2":
        train(config_for(RESUME, data_dir, Path(out_root) / "uninterrupted"))
    distributed.cleanup()



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), *map(str, args)]


def run_env() -> dict:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}


def checkpoint(out_dir: Path, config: TrainConfig, world: int = 2) -> dict:
    name = config.run_name + (f"-ddp{world}" if world > 1 else "")
    return torch.load(out_dir / "checkpoints" / name / "last.pt", map_location="cpu", weights_only=False)


def differing_tensors(a: dict, b: dict, initial: dict, tol: float) -> list[str]:
    """Names of the tensors where |a - b| > tol * (|a| + the largest update to any weight), elementwise.

    The rounding bound is relative to the size of the terms summed, not of the result: weights whose
    gradient is zero in theory (attention key biases) receive pure rounding noise from sums of
    update-sized terms, so the largest update in the model is the absolute scale.
    """
    assert a.keys() == b.keys() == initial.keys()
    scale = max_abs_diff(a, initial)
    return [k for k in a if ((a[k].double() - b[k].double()).abs() > tol * (a[k].double().abs() + scale)).any()]


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def launch(mode: str, nproc: int, data_dir, out: Path, timeout: int = 300) -> tuple[int, str]:
    """Run the worker under torchrun; (exit code, output). On a timeout, kill torchrun and its workers."""
    proc = subprocess.Popen(torchrun(__file__, "--worker", mode, data_dir, out, nproc=nproc), cwd=REPO,
                            env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun ({mode}) still running after {timeout} s:\n{output[-5000:]}")
    return proc.returncode, output


@pytest.fixture(scope="module")
def ddp_runs(data_dir, tmp_path_factory):
    """One torchrun launch of 2 processes for every run of RUNS and the uninterrupted-resume reference."""
    out = tmp_path_factory.mktemp("ddp")
    code, output = launch("2", 2, data_dir, out)
    assert code == 0, output[-8000:]
    return out


@pytest.fixture(scope="module")
def ddp3_runs(data_dir, tmp_path_factory):
    """One torchrun launch of 3 processes for RUNS_3."""
    out = tmp_path_factory.mktemp("ddp3")
    code, output = launch("3", 3, data_dir, out)
    assert code == 0, output[-8000:]
    return out


@pytest.mark.parametrize("world,name", [*((2, n) for n in RUNS), *((3, n) for n in RUNS_3)])
def test_n_processes_match_one_process_on_the_concatenated_batch(world, name, data_dir, tmp_path, monkeypatch,
                                                                 request):
    runs = request.getfixturevalue("ddp_runs" if world == 2 else "ddp3_runs")
    monkeypatch.setattr(mtbert_utils.model, "tiny_config", tiny_config_for(name))
    monkeypatch.setattr(mtbert_utils.training, "build_optimizer", sgd_optimizer)
    single_cfg = config_for(RUNS[name], data_dir, tmp_path, batch_size=4 * world)
    single = train(single_cfg)
    ddp_cfg = config_for(RUNS[name], data_dir, runs / name)
    ddp = json.loads((runs / name / f"{ddp_cfg.run_name}-ddp{world}.json").read_text())

    a, b = checkpoint(tmp_path, single_cfg, world=1), checkpoint(runs / name, ddp_cfg, world)
    initial = mtbert_utils.training.build_model(single_cfg).state_dict()
    assert max_abs_diff(a["model"], initial) > 1e-2  # the runs did move the weights ...
    tol = float32_tol(single["steps"] * roundings_per_step(4 * world))
    bad = differing_tensors(a["model"], b["model"], initial, tol)
    assert not bad, f"differ: {bad[:5]}"  # ... and both moved them alike
    # the same schedule and the same examples, counted globally
    assert (single["steps"], single["examples_seen"], single["num_batches"]) == \
           (ddp["steps"], ddp["examples_seen"], ddp["num_batches"])
    assert ddp["distributed"] == {"world_size": world, "backend": "gloo", "batch_size_per_process": 4,
                                  "global_batch_size": 4 * world}
    for h1, h2 in zip(single["history"], ddp["history"]):
        for t in h1["train_loss"]:  # each step's loss over the global batch, not rank 0's part
            assert h1["train_loss"][t] == pytest.approx(h2["train_loss"][t], rel=tol, abs=0)
        # (not STS: the tiny random encoder's dev cosines all lie within 1e-5 of 1, and a Pearson r of
        # such values is decided by float rounding; the parameters above are the real check)
        assert (h1["dev"]["sst"], h1["dev"]["para"]) == (h2["dev"]["sst"], h2["dev"]["para"])
    if RUNS[name].get("pcgrad"):  # the surgery ran on the global task gradients: same cosines, real conflicts
        c1, c2 = single["history"][-1]["grad_cosines"], ddp["history"][-1]["grad_cosines"]
        for pair in c1:
            assert c1[pair]["values"] == pytest.approx(c2[pair]["values"], abs=tol)  # |cos| <= 1
        assert any(c["conflict_rate"] > 0 for c in c1.values())


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker processes through /proc")
def test_killed_and_resumed_run_finishes_like_an_uninterrupted_one(ddp_runs, data_dir, tmp_path):
    out = tmp_path / "killed"
    cfg = config_for(RESUME, data_dir, out)
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    ckpt = out / "checkpoints" / f"{cfg.run_name}-ddp2" / "last.pt"
    result_path = out / f"{cfg.run_name}-ddp2.json"
    cli = ["-m", "mtbert_utils.train", "--config", cfg_path]

    # SIGKILL torchrun and both workers as soon as the first epoch's checkpoint is on disk
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(torchrun(*cli), cwd=REPO, env=run_env(), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    for pid in [*_children(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    log.close()
    assert ckpt.exists(), (tmp_path / "killed.log").read_text()[-5000:]
    assert not result_path.exists(), "the run finished before it could be killed"
    assert torch.load(ckpt, weights_only=False)["epoch"] == 0

    resumed = subprocess.run(torchrun(*cli, "--resume"), cwd=REPO, env=run_env(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["status"] == "finished"

    ref_cfg = config_for(RESUME, data_dir, ddp_runs / "uninterrupted")
    ref = json.loads((ddp_runs / "uninterrupted" / f"{ref_cfg.run_name}-ddp2.json").read_text())
    got = json.loads(result_path.read_text())
    assert max_abs_diff(checkpoint(out, cfg)["model"], checkpoint(ddp_runs / "uninterrupted", ref_cfg)["model"]) == 0
    assert got["dev"] == ref["dev"] and summary["dev"] == ref["dev"]
    assert [h["train_loss"] for h in got["history"]] == [h["train_loss"] for h in ref["history"]]
    assert (got["steps"], got["examples_seen"]) == (ref["steps"], ref["examples_seen"])


def test_a_non_finite_loss_on_one_process_stops_every_process_with_the_error(data_dir, tmp_path):
    start = time.time()
    code, output = launch("nan", 2, data_dir, tmp_path, timeout=240)  # a hang fails here, not at 60 min
    assert code != 0, output[-5000:]
    # process 1 names the loss, process 0 stops at the same step instead of waiting in a collective
    assert "non-finite loss (nan) for task 'para' on process 1" in output, output[-5000:]
    assert "a non-finite loss on another process; process 0 stops too" in output, output[-5000:]
    assert output.count("at epoch 1, step 2 (global step 2)") >= 2, output[-5000:]  # both tracebacks
    assert not list(tmp_path.glob("*.json")), "no result may be written"
    assert time.time() - start < 240


if __name__ == "__main__":  # torchrun tests/test_distributed.py --worker MODE DATA_DIR OUT_DIR
    assert sys.argv[1] == "--worker"
    worker(sys.argv[2], sys.argv[3], sys.argv[4])
