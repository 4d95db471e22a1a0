"""Data-parallel training: 2 processes (torchrun, gloo, CPU) against one process on the concatenated batch.

The 2-process runs go through the real entry points: `train()` (this file is also the
torchrun worker, see `worker`) and `python -m mtbert_utils.train` for the kill-and-resume test.
Per process batch 4 against one process with batch 8: the same global batches, so the
parameters must agree to float tolerance. The task sizes are chosen so that the last
global batch splits unevenly (sst: 29 -> chunks 3 + 2) or leaves rank 1 empty (para: 25
-> 1 + 0), which exercises the chunk-size weighting and the stand-in example.
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

import mtbert_utils.model
import mtbert_utils.training
from mtbert_utils.training import TrainConfig, train

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

REPO = Path(__file__).resolve().parents[1]
ATOL, RTOL = 1e-6, 1e-5  # float32 arithmetic in another order (rtol: some weights grow to ~10)
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
}
# the kill-and-resume runs keep the real encoder dropout, AdamW and learning rates
RESUME = dict(BASE, schedule="rr_over", dropout=0.1, lr={k: 1e-3 for k in BASE["lr"]})


# Two test-only changes to the model, applied alike to both sides of every comparison:
def tiny_config_without_dropout():
    """Dropout masks differ with the batch split; without dropout only the arithmetic differs."""
    c = _tiny_config()
    c.hidden_dropout_prob = c.attention_probs_dropout_prob = 0.0
    return c


def sgd_optimizer(model, config, device):
    """SGD instead of AdamW: the update is then linear in the gradient, which is what data
    parallelism must get right. (AdamW's first step is about lr * sign(g): it turns float
    noise in gradients that are zero in theory, such as attention key biases, into +-lr.)"""
    groups = [{"params": ps, "lr": config.lr[name], "base_lr": config.lr[name], "name": name}
              for name, ps in model.module_groups().items() if ps]
    return torch.optim.SGD(groups)



def config_for(run: dict, data_dir, out_dir, **overrides) -> TrainConfig:
    return TrainConfig.from_dict({**run, "data_dir": str(data_dir), "out_dir": str(out_dir), **overrides})


def worker(data_dir: str, out_root: str) -> None:
    """Runs inside each of the 2 processes that torchrun starts."""
    from mtbert_utils import distributed
    torch.set_num_threads(1)
    mtbert_utils.model.tiny_config = tiny_config_without_dropout
    mtbert_utils.training.build_optimizer = sgd_optimizer
    for name, run in RUNS.items():
        train(config_for(run, data_dir, Path(out_root) / name))
    mtbert_utils.model.tiny_config = _tiny_config
    mtbert_utils.training.build_optimizer = _build_optimizer
    train(config_for(RESUME, data_dir, Path(out_root) / "uninterrupted"))
    distributed.cleanup()



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), *map(str, args)]


def run_env() -> dict:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}


def checkpoint(out_dir: Path, config: TrainConfig, world: int = 2) -> dict:
    name = config.run_name + (f"-ddp{world}" if world > 1 else "")
    return torch.load(out_dir / "checkpoints" / name / "last.pt", map_location="cpu", weights_only=False)


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def ddp_runs(data_dir, tmp_path_factory):
    """One torchrun launch for the plain, PCGrad and uninterrupted-resume reference runs."""
    out = tmp_path_factory.mktemp("ddp")
    proc = subprocess.run(torchrun(__file__, "--worker", data_dir, out), cwd=REPO, env=run_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_match_one_process_on_the_concatenated_batch(name, ddp_runs, data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(mtbert_utils.model, "tiny_config", tiny_config_without_dropout)
    monkeypatch.setattr(mtbert_utils.training, "build_optimizer", sgd_optimizer)
    single_cfg = config_for(RUNS[name], data_dir, tmp_path, batch_size=8)
    single = train(single_cfg)
    ddp_cfg = config_for(RUNS[name], data_dir, ddp_runs / name)
    ddp = json.loads((ddp_runs / name / f"{ddp_cfg.run_name}-ddp2.json").read_text())

    a, b = checkpoint(tmp_path, single_cfg, world=1), checkpoint(ddp_runs / name, ddp_cfg)
    initial = mtbert_utils.training.build_model(single_cfg).state_dict()
    assert max_abs_diff(a["model"], initial) > 1e-2  # the runs did move the weights ...
    bad = [k for k in a["model"] if not torch.allclose(a["model"][k], b["model"][k], rtol=RTOL, atol=ATOL)]
    assert not bad, f"differ: {bad[:5]}"  # ... and both moved them alike
    # the same schedule and the same examples, counted globally
    assert (single["steps"], single["examples_seen"], single["num_batches"]) == \
           (ddp["steps"], ddp["examples_seen"], ddp["num_batches"])
    assert ddp["distributed"] == {"world_size": 2, "backend": "gloo", "batch_size_per_process": 4,
                                  "global_batch_size": 8}
    for h1, h2 in zip(single["history"], ddp["history"]):
        for t in h1["train_loss"]:  # each step's loss over the global batch, not rank 0's part
            assert h1["train_loss"][t] == pytest.approx(h2["train_loss"][t], rel=1e-6, abs=1e-6)
        # (not STS: the tiny random encoder's dev cosines all lie within 1e-5 of 1, and a Pearson r of
        # such values is decided by float rounding; the parameters above are the real check)
        assert (h1["dev"]["sst"], h1["dev"]["para"]) == (h2["dev"]["sst"], h2["dev"]["para"])
    if name == "pcgrad":  # the surgery ran on the global task gradients: same cosines, real conflicts
        c1, c2 = single["history"][-1]["grad_cosines"], ddp["history"][-1]["grad_cosines"]
        for pair in c1:
            assert c1[pair]["values"] == pytest.approx(c2[pair]["values"], abs=2e-5)
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


if __name__ == "__main__":  # torchrun tests/test_distributed.py --worker DATA_DIR OUT_DIR
    assert sys.argv[1] == "--worker"
    worker(sys.argv[2], sys.argv[3])
