"""results.py: atomic writes (a failed write leaves the old file and no scratch file), what JSON can hold, run
metadata, reading finished runs back, paths that travel and the notebooks' run indexes.

Fast and self-contained: results.py's own mutation-test selection (pyproject.toml's
[tool.mtbert.mutation-selection], docs/testing.md). The kill tests of tests/test_faults.py interrupt real writes.
"""

import json
import math
import os
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from mtbert_utils import results
from mtbert_utils.results import (REPO_ROOT, atomic_path, current_umask, environment, git_commit, load_index,
                                  load_runs, relativize, repo_relative, save_figure, save_torch, write_index,
                                  write_json, write_text)


def scratch(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_path_publishes_only_a_finished_write(tmp_path):
    target = tmp_path / "deep" / "er" / "out.txt"  # missing folders are made
    with atomic_path(target, suffix=".txt") as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".out.txt.") and tmp.name.endswith(".txt.tmp")
        assert not target.exists()
        tmp.write_text("new")
    assert target.read_text() == "new" and scratch(target.parent) == []
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "new" and scratch(target.parent) == []  # the old file stands, no scratch left


def test_atomic_path_gives_the_mode_open_would(tmp_path):
    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027 and current_umask() == 0o027  # reading it leaves it as it was
        path = write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # 0o666 less the mask, not mkstemp's 0o600


def test_atomic_path_syncs_before_it_renames(tmp_path, monkeypatch):
    order = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(results.os, "fsync", lambda fd: order.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(results.os, "replace", lambda a, b: order.append("replace") or real_replace(a, b))
    write_text(tmp_path / "a.txt", "x")
    assert order == ["fsync", "replace"]


def test_write_json_holds_numpy_tuples_sets_and_paths_and_names_what_it_cannot(tmp_path):
    obj = {"a": np.float64(0.5), "b": np.arange(3), "c": (1, 2), "d": {3}, "e": Path("x/y"), "f": np.int64(4),
           "g": torch.tensor([1.5, 2.0])}
    path = write_json(tmp_path / "r.json", obj)
    assert path == tmp_path / "r.json" and isinstance(path, Path)
    text = path.read_text()
    assert text.endswith("}\n") and text.startswith('{\n  "a": 0.5,')  # two-space indent, the keys' own order
    assert json.loads(text) == {"a": 0.5, "b": [0, 1, 2], "c": [1, 2], "d": [3], "e": "x/y", "f": 4,
                                "g": [1.5, 2.0]}
    assert list(json.loads(write_json(tmp_path / "o.json", {"z": 1, "a": 2}).read_text())) == ["z", "a"]
    with pytest.raises(TypeError) as e:
        write_json(tmp_path / "bad.json", {"f": object()})
    assert str(e.value) == "not JSON serialisable: object"
    assert not (tmp_path / "bad.json").exists() and scratch(tmp_path) == []


def test_write_json_puts_each_list_of_plain_values_on_one_line(tmp_path):
    """A run file's per-step traces (examples seen, gradient cosines) go one list a line, objects one key a line,
    lists of objects one object a line: a committed gpu-minilm run takes under half the bytes it took at one value
    a line (indent=2), and every file reads back equal."""
    run = {"history": [{"epoch": 1, "seen_trace": [[5, 320, 330], [10, 640, 660]],
                        "grad_cosines": {"sst|para": {"mean": 0.1, "values": [0.2, -0.1, float("nan")]}}}],
           "dev": {"sst": 0.5}, "no_list": [], "no_dict": {}, "names": ["a", "b"]}
    text = write_json(tmp_path / "run.json", run).read_text()
    assert text == ('{\n  "history": [\n    {\n      "epoch": 1,\n      "seen_trace": [[5, 320, 330], [10, 640, 660]],\n'
                    '      "grad_cosines": {\n        "sst|para": {\n          "mean": 0.1,\n'
                    '          "values": [0.2, -0.1, NaN]\n        }\n      }\n    }\n  ],\n'
                    '  "dev": {\n    "sst": 0.5\n  },\n  "no_list": [],\n  "no_dict": {},\n  "names": ["a", "b"]\n}\n')
    back = json.loads(text)
    assert math.isnan(back["history"][0]["grad_cosines"]["sst|para"]["values"][2])
    committed = REPO_ROOT / "results" / "gpu-minilm" / "runs" / "rr_over-tuned-linear-ba73b4f3-seed0.json"
    obj = json.loads(committed.read_text())
    assert committed.read_text() == results.json_text(obj) + "\n"  # committed files are in this layout
    assert len(results.json_text(obj)) < 0.5 * len(json.dumps(obj, indent=2))
    assert json.loads(results.json_text(obj)) == obj
    # executed notebooks keep one value a line (reproduce writes them with lists_inline=False): a cell's source
    # lines stay one a line in the committed copies
    assert write_json(tmp_path / "nb.json", run, lists_inline=False).read_text() == json.dumps(run, indent=2) + "\n"
    executed = REPO_ROOT / "results" / "executed" / "07_error_analysis.ipynb"
    assert executed.read_text() == json.dumps(json.loads(executed.read_text()), indent=2) + "\n"
    # numpy values and paths are turned in both layouts (a notebook's outputs may hold any of them)
    odd = {"x": np.float64(0.5), "n": np.int64(3), "p": Path("results/a.json"), "t": (1, 2)}
    for inline in (True, False):
        assert json.loads(write_json(tmp_path / "odd.json", odd, lists_inline=inline).read_text()) == {
            "x": 0.5, "n": 3, "p": "results/a.json", "t": [1, 2]}


def test_write_text_save_torch_and_save_figure_return_their_path(tmp_path):
    assert write_text(tmp_path / "t.md", "# hi\n") == tmp_path / "t.md"
    assert (tmp_path / "t.md").read_text() == "# hi\n"
    p = save_torch(str(tmp_path / "m.pt"), {"w": torch.ones(2)})
    assert p == tmp_path / "m.pt" and torch.equal(torch.load(p, weights_only=True)["w"], torch.ones(2))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1])
    png, svg = save_figure(fig, str(tmp_path / "f.png")), save_figure(fig, tmp_path / "f.svg", dpi=50)
    plt.close(fig)
    assert png == tmp_path / "f.png" and png.read_bytes()[:4] == b"\x89PNG"
    assert svg.read_text().lstrip().startswith("<?xml") and scratch(tmp_path) == []


def test_git_commit_asks_git_for_the_checkouts_commit_and_its_dirty_flag(monkeypatch):
    calls = []

    def run(args, **kw):
        calls.append((args, kw["cwd"]))
        assert 0 < kw["timeout"] <= 60  # a hung git cannot hold up a run for long
        out = {"rev-parse": "abc123\n", "status": " M mtbert_utils/x.py\n" if dirty else ""}[args[1]]
        return subprocess.CompletedProcess(args, 0, stdout=out, stderr="")
    monkeypatch.setattr(results.subprocess, "run", run)
    dirty = False
    assert git_commit() == "abc123" and calls[0] == (["git", "rev-parse", "HEAD"], REPO_ROOT)
    # the package's own files, in its own checkout, whatever the working folder
    assert calls[1] == (["git", "status", "--porcelain", "--untracked-files=no", "--", "mtbert_utils"], REPO_ROOT)
    dirty = True
    assert git_commit(short=True) == "abc123+dirty" and calls[2][0] == ["git", "rev-parse", "--short", "HEAD"]
    monkeypatch.setattr(results.subprocess, "run", lambda args, **kw: subprocess.CompletedProcess(args, 128, "", ""))
    assert git_commit() is None  # not a repository

    def fail(args, **kw):
        raise FileNotFoundError("git")
    monkeypatch.setattr(results.subprocess, "run", fail)
    assert git_commit() is None  # no git at all


def test_environment_records_versions_and_machine():
    import platform

    import transformers

    import mtbert_utils
    env = environment()
    assert {k: env[k] for k in ("mtbert_utils", "python", "torch", "transformers", "cpu_count", "torch_threads")} \
        == {"mtbert_utils": mtbert_utils.__version__, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    assert env["platform"] == platform.platform() and "git_commit" in env
    assert ("cuda_device" in env) == torch.cuda.is_available()


def test_load_runs_reads_finished_runs_only_in_path_order(tmp_path):
    write_json(tmp_path / "b" / "two.json", {"status": "finished", "n": 2})
    write_json(tmp_path / "a.json", {"status": "finished", "n": 1})
    write_json(tmp_path / "c.json", {"status": "running", "n": 3})
    write_json(tmp_path / "d.json", [1, 2])
    (tmp_path / "0.json").write_text("{half")  # a file cut short (read first): skipped, the rest still read
    write_json(tmp_path / "f.txt", {"status": "finished", "n": 4})
    runs = load_runs(tmp_path)
    assert [r["n"] for r in runs] == [1, 2] and runs[1]["_path"] == str(tmp_path / "b" / "two.json")
    assert [r["n"] for r in load_runs(str(tmp_path), "*.txt")] == [4]


def test_paths_are_recorded_relative_to_the_repository():
    assert repo_relative(REPO_ROOT / "results" / "runs") == "results/runs"
    assert repo_relative(REPO_ROOT) == "."
    assert repo_relative("/somewhere/else") == "/somewhere/else"  # outside the clone: as given
    assert repo_relative(Path("/somewhere/else")) == "/somewhere/else"
    root = "/old/machine/repo"
    obj = {"a": "/old/machine/repo/results/x.json", "b": ["/old/machine/repo/r", 3, "other"],
           "c": {"d": "see /old/machine/repo/notebooks"}, "e": None, "f": "/old/machine/repository"}
    assert relativize(obj, root) == {"a": "results/x.json", "b": ["r", 3, "other"], "c": {"d": "see notebooks"},
                                     "e": None, "f": "/old/machine/repository"}
    assert relativize(str(REPO_ROOT / "results")) == "results"  # the default root: this checkout
    assert relativize("/data/my repo /results", "/data/my repo ") == "results"  # a folder name may end in a space
    assert relativize("/data/repoX/results", "/data/repoX") == "results"  # a root ending in any letter
    # only at a path's start: another folder whose path contains the root's, or a URL, stays whole
    assert relativize("/x/data/repo/results '/data/repo/r'", "/data/repo") == "/x/data/repo/results 'r'"
    assert relativize(["file:///data/repo/a", "=/data/repo/b"], "/data/repo") == ["file:///data/repo/a", "=b"]
    # a repository at the file system's root: nothing changes (every path and every ` / ` would lose a slash)
    code = {"source": ["y = x / 2\n", "open('/etc/hosts')\n"]}
    assert relativize(code, "/") == code


def test_run_indexes_round_trip_and_name_a_missing_notebook(tmp_path):
    runs = []
    for seed in (0, 1):
        path = tmp_path / "runs" / "01_x" / f"r-seed{seed}.json"
        write_json(path, {"seed": seed, "result_path": str(path)})
        runs.append({"result_path": str(path)})
    index_path = write_index(tmp_path, "01_x", {"row": runs})
    assert index_path == tmp_path / "runs" / "01_x" / "index.json"
    assert json.loads(index_path.read_text()) == {"notebook": "01_x", "runs": {
        "row": ["runs/01_x/r-seed0.json", "runs/01_x/r-seed1.json"]}}
    assert [r["seed"] for r in load_index(str(tmp_path), "01_x")["row"]] == [0, 1]
    with pytest.raises(FileNotFoundError) as e:
        load_index(tmp_path, "02_y")
    assert str(e.value) == f"{tmp_path / 'runs' / '02_y' / 'index.json'} is missing: run notebooks/02_y.ipynb first"


def test_git_commit_is_this_checkouts_wherever_it_is_called_from(tmp_path, monkeypatch):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    short = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout (a copy of the files): git_commit records None there")
    monkeypatch.chdir(tmp_path)  # a notebook run from another folder still records the package's commit
    full, brief = git_commit(), git_commit(short=True)
    assert isinstance(full, str) and full.split("+")[0] == head.stdout.strip()
    assert brief.split("+")[0] == short.stdout.strip() and full.endswith("+dirty") == brief.endswith("+dirty")


def test_environment_names_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"GPU number {i}")
    assert environment()["cuda_device"] == "GPU number 0"


def test_save_figure_crops_to_the_drawing_and_passes_its_options(tmp_path):
    import struct

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def png_size(path):
        return struct.unpack(">II", path.read_bytes()[16:24])  # the IHDR chunk: width, height
    fig = plt.figure(figsize=(4, 4), dpi=100)
    fig.text(0.5, 0.5, "x", fontsize=10)  # a small drawing in a large empty figure
    low, high = save_figure(fig, tmp_path / "low.png", dpi=50), save_figure(fig, tmp_path / "high", dpi=100)
    plt.close(fig)
    assert high.read_bytes()[:4] == b"\x89PNG"  # no suffix: PNG
    (w, h), (w2, h2) = png_size(low), png_size(high)
    assert w < 100 and h < 100  # cropped to the text, not the 200 x 200 pixel page at 50 dpi
    assert 1.5 < w2 / w < 2.5 and 1.5 < h2 / h < 2.5  # the dpi asked for reaches savefig
