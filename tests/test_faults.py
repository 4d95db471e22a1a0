"""Fault injection: SIGKILL mid-epoch and mid-write, NaN losses, and every kind of bad input a user can point at.

The kill tests start real subprocesses and kill them at random points; the seed of those
points is printed on failure (set MTBERT_FAULT_SEED to replay one).
"""

import json
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

from mtbert_utils import training
from mtbert_utils.data import load_tasks
from mtbert_utils.results import load_runs
from mtbert_utils.checkpoint import load_checkpoint
from mtbert_utils.training import NonFiniteLossError, TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

FAULT_SEED = int(os.environ.get("MTBERT_FAULT_SEED") or time.time_ns() % 100_000)


def ckpt_path(config):
    return Path(config.out_dir) / "checkpoints" / config.run_name / "last.pt"


def result_files(folder):
    return sorted(p.name for p in Path(folder).glob("*.json"))


def assert_same_params(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference(tiny_config, tmp_path_factory, one_thread):
    """An uninterrupted run: what every interrupted or failed-then-resumed run must end with, bit for bit."""
    config = tiny_config(tmp_path_factory.mktemp("reference"))
    result = train(config)
    return config, result, torch.load(ckpt_path(config), weights_only=False)["model"]


# ---------------------------------------------------------------------------
# subprocesses that get killed


class Child:
    """A Python subprocess whose stdout lines arrive on a queue, so the test can kill it at a chosen event."""

    def __init__(self, script: Path, args: list, env: dict | None = None, log: Path | None = None):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
               **(env or {})}
        self.stderr = open(log or os.devnull, "ab")
        self.proc = subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE,
                                     stderr=self.stderr, env=env, text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)  # EOF

    def wait_for(self, predicate, timeout=120.0) -> str | None:
        """Read lines until one satisfies predicate; None if the process ended first."""
        deadline = time.time() + timeout
        while True:
            line = self.lines.get(timeout=max(0.1, deadline - time.time()))
            if line is None or predicate(line):
                return line

    def kill(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        self.stderr.close()

    def finish(self, timeout=120.0) -> int:
        rc = self.proc.wait(timeout=timeout)
        self.stderr.close()
        return rc


TRAIN_DRIVER = textwrap.dedent('''
    """Train with resume=True, printing 'step', 'ckpt-begin E' and 'ckpt-saved E' so the parent can aim its kills."""
    import io, json, os, sys, time
    import torch
    torch.set_num_threads(1)
    from mtbert_utils import checkpoint, training

    def say(msg):
        print(msg, flush=True)

    real_step, real_save, real_save_torch = training.training_step, torch.save, checkpoint.save_torch

    def step(*args, **kw):
        out = real_step(*args, **kw)
        say("step")
        return out

    def slow_save(obj, f, *args, **kw):
        # the real bytes, written in 1 MB pieces with a pause: a wide window to be killed in
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kw)
        data = buf.getvalue()
        say(f"ckpt-begin {obj['epoch']}")
        with open(f, "wb") as fh:
            for i in range(0, len(data), 1 << 20):
                fh.write(data[i:i + (1 << 20)])
                fh.flush()
                time.sleep(float(os.environ["SLOW_SAVE_S"]))

    def save_torch(path, obj):
        out = real_save_torch(path, obj)
        say(f"ckpt-saved {obj['epoch']}")
        return out

    training.training_step, torch.save, checkpoint.save_torch = step, slow_save, save_torch
    config = training.TrainConfig.from_dict(json.loads(sys.argv[1]))
    result = training.train(config, resume=True)
    say("done " + json.dumps(result["dev"]))
''')


@pytest.fixture
def children():
    """Subprocesses started by a test; any still running when it ends (a failed wait) are killed."""
    started = []
    yield started
    for child in started:
        child.kill()


def test_sigkill_mid_epoch_and_mid_checkpoint_then_resume_is_exact(reference, tiny_config, tmp_path, children):
    ref_config, ref_result, ref_params = reference
    config = tiny_config(tmp_path / "runs")
    ckpt = ckpt_path(config)
    script = tmp_path / "train_driver.py"
    script.write_text(TRAIN_DRIVER)
    rng = random.Random(FAULT_SEED)
    where = f"(MTBERT_FAULT_SEED={FAULT_SEED})"
    # 4 steps per epoch, 3 epochs; a checkpoint (~25 MB) is written in 1 MB pieces, 20 ms apart
    write_s = 0.02 * ckpt_path(ref_config).stat().st_size / 2**20

    def spawn():
        children.append(Child(script, [json.dumps(config.to_dict())], {"SLOW_SAVE_S": "0.02"},
                              tmp_path / "stderr.log"))
        return children[-1]

    # 1. mid-epoch 2, at a random step after the epoch-1 checkpoint exists
    child = spawn()
    assert child.wait_for(lambda s: s == "ckpt-saved 0") == "ckpt-saved 0", where
    for _ in range(rng.randint(1, 3)):
        assert child.wait_for(lambda s: s == "step") == "step", where
    time.sleep(rng.uniform(0, 0.05))
    child.kill()
    assert load_checkpoint(ckpt, config)["epoch"] == 0, where
    assert result_files(config.out_dir) == [], where

    # 2. a fresh process resumes and is killed while writing the epoch-2 checkpoint:
    #    the epoch-1 checkpoint survives whole, the half-written one is only a .tmp
    child = spawn()
    assert child.wait_for(lambda s: s == "ckpt-begin 1") == "ckpt-begin 1", where
    time.sleep(rng.uniform(0, 0.8 * write_s))
    child.kill()
    assert load_checkpoint(ckpt, config)["epoch"] == 0, where
    leftovers = [p.name for p in ckpt.parent.iterdir() if p.name != "last.pt"]
    assert leftovers and all(n.startswith(".last.pt.") and n.endswith(".tmp") for n in leftovers), leftovers
    assert result_files(config.out_dir) == [], where

    # 3. a fresh process resumes and finishes: exactly the uninterrupted run
    child = spawn()
    done = child.wait_for(lambda s: s.startswith("done"))
    assert child.finish() == 0 and done, (tmp_path / "stderr.log").read_text()[-3000:]
    assert json.loads(done[len("done "):]) == ref_result["dev"], where
    saved = json.loads((Path(config.out_dir) / f"{config.run_name}.json").read_text())
    assert saved["status"] == "finished" and saved["dev"] == ref_result["dev"]
    assert [r["dev"] for r in saved["history"]] == [r["dev"] for r in ref_result["history"]], where
    assert [r["examples_seen"] for r in saved["history"]] == [r["examples_seen"] for r in ref_result["history"]]
    assert_same_params(torch.load(ckpt, weights_only=False)["model"], ref_params)
    assert [r["run_name"] for r in load_runs(config.out_dir)] == [config.run_name]


WRITE_LOOP = textwrap.dedent('''
    """Overwrite one path with ever newer versions of a big object, forever; print each finished version."""
    import sys
    from mtbert_utils.results import save_torch, write_json
    import os, time
    kind, path = sys.argv[1], sys.argv[2]
    stall_at = int(sys.argv[3]) if len(sys.argv) > 3 else 0  # on this version, stop inside the write (temp written,
    if stall_at:                                              # not yet renamed) and wait to be killed
        real_replace = os.replace
        def replace(src, dst):
            if i == stall_at:
                print("stalled", flush=True)
                time.sleep(600)
            real_replace(src, dst)
        os.replace = replace
    i = 0
    while True:
        i += 1
        if kind == "json":
            write_json(path, {"status": "finished", "run_name": "big", "version": i, "blob": [i] * 200_000, "end": i})
        else:
            import torch
            save_torch(path, {"version": i, "blob": torch.full((3_000_000,), float(i)), "end": i})
        print(i, flush=True)
''')


@pytest.mark.parametrize("kind", ["json", "torch"])
def test_sigkill_mid_write_never_leaves_a_partial_file(tmp_path, kind, children):
    script = tmp_path / "write_loop.py"
    script.write_text(WRITE_LOOP)
    folder = tmp_path / "out"
    target = folder / ("result.json" if kind == "json" else "last.pt")
    rng = random.Random(FAULT_SEED + (kind == "torch"))
    interrupted_writes = 0
    attempts = 3 if kind == "json" else 2
    for attempt in range(attempts):
        # the last attempt stalls inside its third write, so at least one kill surely lands mid-write;
        # the others are killed at a random moment (seeded by MTBERT_FAULT_SEED, printed on failure)
        stall = attempt == attempts - 1
        child = Child(script, [kind, target, 3 if stall else 0])
        children.append(child)
        done_before = int(child.wait_for(lambda s: True))  # at least one version is complete
        if stall:
            while (line := child.wait_for(lambda s: True)) != "stalled":
                done_before = int(line)
        else:
            time.sleep(rng.uniform(0.0, 0.4))
        child.kill()
        for line in iter(lambda: child.lines.get(timeout=30), None):  # what it reported before dying
            done_before = int(line)
        if stall:
            assert done_before == 2
        # the target is whole: the last version reported finished, or (killed between rename and print) the next
        if kind == "json":
            obj = json.loads(target.read_text())
            assert obj["blob"] == [obj["version"]] * 200_000
        else:
            obj = torch.load(target, weights_only=False)
            assert torch.equal(obj["blob"], torch.full((3_000_000,), float(obj["version"])))
        assert obj["end"] == obj["version"] and obj["version"] in (done_before, done_before + 1), (attempt, FAULT_SEED)
        others = [p.name for p in folder.iterdir() if p != target]
        assert all(n.startswith(f".{target.name}.") and n.endswith(".tmp") for n in others), others
        interrupted_writes += bool(others)
        for p in folder.glob(".*.tmp"):  # start the next attempt clean, so each one's leftovers are its own
            p.unlink()
        if kind == "json":  # a leftover .tmp (here: maybe a complete-looking one) is never read as a result
            (folder / f".{target.name}.stray.tmp").write_text(target.read_text())
            assert [r["_path"] for r in load_runs(folder)] == [str(target)]
            (folder / f".{target.name}.stray.tmp").unlink()
    assert interrupted_writes >= 1, f"no kill landed inside a write (MTBERT_FAULT_SEED={FAULT_SEED})"


# ---------------------------------------------------------------------------
# numerical faults


@pytest.mark.parametrize("bad, at", [(float("nan"), "step 2"), (float("inf"), "step 2"), (float("nan"), "last step")])
def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(reference, tiny_config, tmp_path,
                                                                           monkeypatch, bad, at):
    """The loop reads a step's losses once the next step is queued (training.PendingLosses), or after the epoch's
    last step: either way the error names the poisoned step, and no checkpoint or result holds its update."""
    ref_config, ref_result, ref_params = reference
    config = tiny_config(tmp_path)
    ckpt = ckpt_path(config)
    real_loss, calls = training.task_loss, []
    hist = ref_result["history"]
    step = 2 if at == "step 2" else hist[1]["steps"] - hist[0]["steps"]  # the epoch's last: no step after it
    assert step > 2 or at == "step 2"

    def poisoned(task, *args, **kw):
        loss = real_loss(task, *args, **kw)
        if ckpt.exists():  # epoch 2: one batch of every task per step, sst then para then sts
            calls.append(task)
            if len(calls) == 3 * step:  # the sts batch of that step
                return loss * bad
        return loss

    monkeypatch.setattr(training, "task_loss", poisoned)
    with pytest.raises(NonFiniteLossError) as e:
        train(config)
    msg = str(e.value)
    assert "task 'sts'" in msg and f"epoch 2, step {step} (global step {hist[0]['steps'] + step})" in msg
    assert str(ckpt) in msg
    assert ("nan" if bad != bad else "inf") in msg
    sts_ids = {ex.id for ex in load_tasks(config.data_dir, ("sts",), max_train=32, seed=0)["sts"].train}
    named = msg.split("batch ids start ")[1].split("]")[0]
    assert any(i in named for i in sts_ids)
    # the epoch-1 checkpoint is intact, and nothing looks like a finished result
    kept = load_checkpoint(ckpt, config)
    assert kept["epoch"] == 0 and kept["history"][0]["dev"] == ref_result["history"][0]["dev"]
    assert result_files(config.out_dir) == [] and load_runs(config.out_dir) == []
    if bad != bad:  # once the cause is gone, resuming from the kept checkpoint gives the uninterrupted run
        monkeypatch.setattr(training, "task_loss", real_loss)
        resumed = train(config, resume=True)
        assert resumed["dev"] == ref_result["dev"]
        assert_same_params(torch.load(ckpt, weights_only=False)["model"], ref_params)


# ---------------------------------------------------------------------------
# bad input: configs


@pytest.mark.parametrize("field,value,expect", [
    ("batch_size", 0, "batch_size"), ("batch_size", -8, "batch_size"), ("batch_size", 2.5, "batch_size"),
    ("eval_batch_size", 0, "eval_batch_size"), ("max_length", -1, "max_length"),
    ("lr", {"encoder": -1e-5, "shared": 1e-4, "sst": 1e-4, "para": 1e-4, "sts": 1e-4}, "lr['encoder']"),
    ("lr", {"encoder": 1e-5, "shared": 0.0, "sst": 1e-4, "para": 1e-4, "sts": 1e-4}, "lr['shared']"),
    ("lr", {"encoder": 1e-5, "shared": 1e-4, "sst": float("nan"), "para": 1e-4, "sts": 1e-4}, "lr['sst']"),
    ("lr", {"encoder": 1e-5}, "lr needs exactly the keys"),
    ("max_train", 0, "max_train"), ("precision", "fp8", "precision"), ("sts_loss", "hinge", "sts_loss"),
    ("task_weights", {"sst": 1.0, "para": -1.0, "sts": 1.0}, "task_weights['para']"),
    ("phases", [], "phases"), ("lr_decay", 0.0, "lr_decay"), ("dropout", 1.0, "dropout"),
    # as a JSON --set or a profile could give them: a string "false" switched a boolean on, a typo'd sts_head failed
    # only once the data was read, lr=1e-4 failed with "argument of type 'float' is not iterable"
    ("pcgrad", "false", "pcgrad"), ("progress", 0, "progress"), ("compile", "no", "compile"),
    ("pooling", "max", "pooling"), ("para_input", "both", "para_input"), ("sts_head", "cosin", "sts_head"),
    ("sts_loss", ["mse"], "sts_loss"), ("sts_threshold", "2.5", "sts_threshold"), ("sts_margin", float("nan"),
    "sts_margin"), ("attn_implementation", 1, "attn_implementation"), ("dropout", "0.1", "dropout"),
    ("lr", 1e-4, "lr needs exactly the keys"), ("lr_decay", True, "lr_decay"), ("lr_decay_epochs", 5,
    "lr_decay_epochs"), ("weight_decay", -0.1, "weight_decay"), ("max_grad_norm", 0, "max_grad_norm"),
    ("seed", 1.5, "seed"), ("schedule", ["rr_over"], "schedule"), ("schedule_params", [2], "schedule_params"),
    ("train_tasks", "sst", "train_tasks"), ("task_weights", 1.0, "task_weights"), ("phases", [[5, "no"]], "phases"),
    ("max_train", True, "max_train"), ("max_dev", {"quora": 5}, "max_dev"), ("eval_batch_size", 0.5,
    "eval_batch_size"), ("max_length", 12.5, "max_length"), ("name", "", "name"), ("out_dir", None, "out_dir"),
    ("device", "gpu", "device"), ("encoder", None, "encoder"),
])
def test_bad_config_values_name_the_field(field, value, expect):
    with pytest.raises(ValueError) as e:
        TrainConfig(**{field: value})
    assert expect in str(e.value)


@pytest.mark.parametrize("value", ["x", -1, 1.5, [1], {"k": 1}, None, True, float("nan")])
def test_any_value_of_any_field_is_taken_or_refused_with_a_value_error(value):
    """Never a TypeError or another error from deep inside validation: the CLIs turn ValueErrors into messages."""
    import dataclasses
    for f in dataclasses.fields(TrainConfig):
        try:
            TrainConfig(**{f.name: value})
        except ValueError:
            pass


def test_unknown_schedule_lists_the_valid_names():
    from mtbert_utils.schedules import SCHEDULES
    with pytest.raises(ValueError) as e:
        TrainConfig(schedule="round_robin")
    assert "'round_robin'" in str(e.value) and all(name in str(e.value) for name in SCHEDULES)


def test_unknown_config_key_is_named():
    with pytest.raises(ValueError) as e:
        TrainConfig.from_dict({"encoder": "tiny", "batchsize": 8})
    assert "batchsize" in str(e.value) and "batch_size" in str(e.value)  # the valid keys are listed


def test_unknown_encoder_fails_before_training_and_lists_the_valid_names(tiny_config, tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network retries in CI
    with pytest.raises(ValueError) as e:
        train(tiny_config(tmp_path, encoder="minlm"))
    assert "'minlm'" in str(e.value) and "'minilm'" in str(e.value) and "'tiny'" in str(e.value)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------
# bad input: checkpoints


@pytest.fixture(scope="module")
def cosine_checkpoint(tiny_config, tmp_path_factory, one_thread):
    config = tiny_config(tmp_path_factory.mktemp("cosine"), sts_head="cosine", phases=[[2, True]])
    train(config, max_epochs=1)
    return ckpt_path(config)


def plant(checkpoint: Path, config) -> Path:
    """Put a checkpoint where `config`'s run would look for it."""
    dest = ckpt_path(config)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(checkpoint, dest)
    return dest


@pytest.mark.parametrize("change,expect", [
    ({"sts_head": "linear"}, "sts_head: checkpoint has 'cosine', config wants 'linear'"),
    ({"para_input": "separate"}, "para_input: checkpoint has 'joint', config wants 'separate'"),
    ({"pooling": "mean"}, "pooling: checkpoint has 'cls', config wants 'mean'"),
    ({"sts_head": "linear", "para_input": "separate"},  # every difference, in the signature's order
     "para_input: checkpoint has 'joint', config wants 'separate', "
     "sts_head: checkpoint has 'cosine', config wants 'linear'"),
])
def test_checkpoint_with_other_heads_is_refused(cosine_checkpoint, tiny_config, tmp_path, change, expect):
    config = tiny_config(tmp_path, phases=[[2, True]], **change)
    dest = plant(cosine_checkpoint, config)
    with pytest.raises(ValueError) as e:
        load_checkpoint(dest, config)
    assert expect in str(e.value) and str(dest) in str(e.value)
    with pytest.raises(ValueError, match=expect):
        train(config, resume=True)
    assert result_files(tmp_path) == []


def test_checkpoint_from_another_encoder_is_refused(cosine_checkpoint, tiny_config, tmp_path):
    config = tiny_config(tmp_path, phases=[[2, True]])
    dest = plant(cosine_checkpoint, config)
    ckpt = torch.load(dest, weights_only=False)
    ckpt["signature"]["encoder"] = "minilm"  # what a MiniLM run's checkpoint says about itself
    torch.save(ckpt, dest)
    with pytest.raises(ValueError, match="encoder: checkpoint has 'minilm', config wants 'tiny'"):
        train(config, resume=True)


def test_checkpoint_with_wrong_shapes_or_junk_is_refused(cosine_checkpoint, tiny_config, tmp_path):
    config = tiny_config(tmp_path, phases=[[2, True]])
    dest = plant(cosine_checkpoint, config)
    ckpt = torch.load(dest, weights_only=False)
    ckpt["model"]["sst_head.weight"] = torch.zeros(3, 64)  # a 3-class head
    torch.save(ckpt, dest)
    with pytest.raises(ValueError, match=r"sst_head.weight: checkpoint \(3, 64\) vs model \(5, 64\)") as e:
        train(config, resume=True)
    assert str(e.value) == (f"checkpoint {dest} does not fit this model: "
                            "sst_head.weight: checkpoint (3, 64) vs model (5, 64)")
    # six tensors of the wrong shape: the first five named, in the checkpoint's order
    wrong = [k for k, v in ckpt["model"].items() if v.ndim == 2][:6]
    for k in wrong:
        ckpt["model"][k] = torch.zeros(1, 1)
    torch.save(ckpt, dest)
    with pytest.raises(ValueError) as e:
        train(config, resume=True)
    original = torch.load(cosine_checkpoint, weights_only=False)["model"]
    assert str(e.value) == f"checkpoint {dest} does not fit this model: " + "; ".join(
        f"{k}: checkpoint (1, 1) vs model {tuple(original[k].shape)}" for k in wrong[:5])
    # tensors the model has and the checkpoint lacks: named, the first five in order
    gone = sorted(k for k in original if k.startswith("encoder."))[:7]
    ckpt["model"] = {k: v for k, v in original.items() if k not in gone}
    torch.save(ckpt, dest)
    with pytest.raises(ValueError) as e:
        train(config, resume=True)
    assert str(e.value) == f"checkpoint {dest} does not fit this model: missing: {', '.join(gone[:5])}"
    dest.write_bytes(dest.read_bytes()[:1000])  # truncated (as by a non-atomic copy)
    with pytest.raises(ValueError, match=rf"^checkpoint {re.escape(str(dest))} cannot be read \(\w+Error: "):
        load_checkpoint(dest, config)
    for junk in ({"weights": torch.zeros(2)}, {"model": {}}, {"signature": {}}, [torch.zeros(2)]):
        torch.save(junk, dest)
        with pytest.raises(ValueError, match=rf"^{re.escape(str(dest))} is not an mtbert checkpoint \(no model "
                                             r"state or signature\)$"):
            load_checkpoint(dest, config)



class _Planted:
    """An object whose unpickling runs code: it writes the file its reduce names."""
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_checkpoint_holding_code_is_refused_unrun(cosine_checkpoint, tiny_config, tmp_path):
    """A checkpoint is read weights-only: one whose pickle would call a function (a file downloaded or shared
    as a checkpoint) is refused with a reason, and the function never runs; resuming from it stops too."""
    config = tiny_config(tmp_path, phases=[[2, True]])
    dest = plant(cosine_checkpoint, config)
    ckpt, marker = torch.load(dest, weights_only=True), tmp_path / "ran.txt"
    ckpt["history"] = _Planted(marker)
    torch.save(ckpt, dest)
    with pytest.raises(ValueError, match=rf"^checkpoint {re.escape(str(dest))} holds objects other than tensors, "
                                         r"numbers, strings and containers, .* could run code \("):
        load_checkpoint(dest, config)
    with pytest.raises(ValueError, match="could run code"):
        train(config, resume=True)
    assert not marker.exists() and result_files(tmp_path) == []
    ckpt["history"] = []  # the same checkpoint without the object loads
    torch.save(ckpt, dest)
    assert load_checkpoint(dest, config)["history"] == []


# ---------------------------------------------------------------------------
# bad input: data files


def data_dir_with(small_data_dir: Path, tmp_path: Path, name: str, content: bytes) -> Path:
    """The small data set with one file replaced."""
    folder = tmp_path / "data"
    folder.mkdir()
    for src in small_data_dir.iterdir():
        (folder / src.name).symlink_to(src)
    (folder / name).unlink()
    (folder / name).write_bytes(content)
    return folder


def sts_lines(small_data_dir, n=40):
    return (small_data_dir / "sts-train.csv").read_text(encoding="utf-8").splitlines(keepends=True)[:n]


def with_label(line: str, label: str) -> str:
    return "\t".join(line.rstrip("\n").split("\t")[:-1] + [label]) + "\n"


BAD_FILES = {
    "wrong columns": lambda lines: ("\tid\tfirst\tsecond\tscore\n" + "".join(lines[1:])).encode(),
    "no label column": lambda lines: "".join("\t".join(l.rstrip("\n").split("\t")[:-1]) + "\n" for l in lines).encode(),
    "empty": lambda lines: b"",
    "only blank lines": lambda lines: b"\n\n  \n",
    "latin-1": lambda lines: "".join(lines[:5] + [lines[5].replace(" ", " café ", 1)] + lines[6:]).encode("latin-1"),
    "every label out of range": lambda lines: "".join(lines[:1] + [with_label(l, "7") for l in lines[1:]]).encode(),
}
EXPECT = {"wrong columns": r"header is missing columns .*'sentence1', 'sentence2'.*found",
          "no label column": "no 'similarity' column", "empty": "is empty", "only blank lines": "is empty",
          "latin-1": r"is not UTF-8 \(byte 0xe9 at line 6\)",
          "every label out of range": r"no usable sts train rows.*label_out_of_range.*\[2, 3, 4, 5, 6\]"}


@pytest.mark.parametrize("fault", list(BAD_FILES))
def test_bad_data_file_fails_naming_the_file(small_data_dir, tiny_config, tmp_path, fault):
    folder = data_dir_with(small_data_dir, tmp_path, "sts-train.csv", BAD_FILES[fault](sts_lines(small_data_dir)))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=EXPECT[fault]) as e:
            train(tiny_config(tmp_path / "runs", data_dir=str(folder)))
    assert str(folder / "sts-train.csv") in str(e.value)
    # a run loads its data quietly: the error itself says why and where (reasons, first lines), once
    assert not any("skipped" in str(w.message) for w in record)
    assert result_files(tmp_path / "runs") == []


def test_wrong_columns_in_a_dev_file_names_that_file(small_data_dir, tiny_config, tmp_path):
    lines = (small_data_dir / "ids-sst-dev.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    folder = data_dir_with(small_data_dir, tmp_path, "ids-sst-dev.csv",
                           ("\tid\ttext\tsentiment\n" + "".join(lines[1:])).encode())
    with pytest.raises(ValueError, match=r"ids-sst-dev.csv: header is missing columns for task 'sst'"):
        train(tiny_config(tmp_path / "runs", data_dir=str(folder)))


def test_labels_out_of_range_are_skipped_with_a_warning_naming_the_lines(small_data_dir, tiny_config, tmp_path):
    lines = sts_lines(small_data_dir)
    lines[1], lines[3], lines[10] = with_label(lines[1], "7.5"), with_label(lines[3], "-1"), with_label(lines[10], "x")
    folder = data_dir_with(small_data_dir, tmp_path, "sts-train.csv", "".join(lines).encode())
    with pytest.warns(UserWarning) as record:
        data = load_tasks(folder, ("sts",))
    msgs = [str(w.message) for w in record if "sts-train.csv" in str(w.message)]
    assert len(msgs) == 1
    assert str(folder / "sts-train.csv") in msgs[0]
    assert "label_out_of_range: 2 (lines [2, 4])" in msgs[0] and "non_numeric_label: 1 (lines [11])" in msgs[0]
    assert len(data["sts"].train) == len(lines) - 1 - 3
    assert data["sts"].reports["sts-train.csv"]["skipped"] == {"label_out_of_range": 2, "non_numeric_label": 1}


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_atomic_writes_get_the_permissions_open_would_give(tmp_path, mask):
    """mkstemp creates owner-only files; a result published by rename must be as readable as a plain open()."""
    from mtbert_utils.results import write_json, write_text
    before = os.umask(mask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        write_text(tmp_path / "b.txt", "x")
        with open(tmp_path / "c.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(before)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"a.json": 0o666 & ~mask, "b.txt": 0o666 & ~mask, "c.txt": 0o666 & ~mask}
    assert os.umask(before) == before  # reading the mask left it as it was


@pytest.mark.parametrize("val_fraction", [0.0, 0.5])
def test_train_command_prints_its_summary_line_with_or_without_validation(val_fraction, tiny_config, tmp_path,
                                                                         capsys):
    """The command's last line, for an interrupted run and then the finished one: with a validation split an
    epoch records val scores, not dev ones (the summary once read history[-1]["dev"] and raised KeyError after
    the run had trained)."""
    from mtbert_utils import train as train_cli
    config = tiny_config(tmp_path, phases=[[2, True]], lr_decay_epochs=[], val_fraction=val_fraction)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(config.to_dict()))
    first = train_cli.main(["--config", str(cfg), "--max-epochs", "1"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    split = "val" if val_fraction else "dev"
    assert line["status"] == "interrupted" and line["checkpoint"] == first["checkpoint"]
    assert line[split] == first["history"][-1][split] and ("val" in line) == bool(val_fraction)
    assert line["dev"] is None if val_fraction else line["dev"] == first["history"][-1]["dev"]
    done = train_cli.main(["--config", str(cfg), "--resume"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["status"] == "finished" and line["result_path"] == done["result_path"] and line["dev"] == done["dev"]
    assert set(line["dev"]) >= {"sst", "para", "sts"} and ("val" in line) == bool(val_fraction)


@pytest.mark.parametrize("setting,expect", [
    ("data_dir={tmp}/no_such_folder", "is missing 5 file(s)"),
    ("encoder={tmp}/no_such_model", "cannot load encoder"),
])
def test_train_command_names_a_wrong_path_or_encoder_without_a_traceback(setting, expect, data_dir, tmp_path):
    """`python -m mtbert_utils.train` reads the data files and the encoder's tokenizer before it trains: a wrong
    data folder or encoder ends it with argparse's one message (exit 2), not a traceback from inside train()."""
    sets = [f"data_dir={data_dir}", "max_train=8", "max_dev=8", f"out_dir={tmp_path}", setting.format(tmp=tmp_path)]
    proc = subprocess.run([sys.executable, "-m", "mtbert_utils.train", *(a for s in sets for a in ("--set", s))],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "python -m mtbert_utils.train: error: " in proc.stderr and expect in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing trained or written
