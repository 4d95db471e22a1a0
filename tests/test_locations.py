"""Where the data is found and where executed notebooks go, as a new user meets them:
a relative data folder typed in a terminal, a notebook opened from notebooks/, a failed re-run."""
import importlib.machinery
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mtbert_utils import data, reproduce


def test_default_data_dir_is_found_from_the_repository_root_and_from_notebooks(tmp_path, monkeypatch):
    monkeypatch.delenv("MTBERT_DATA_DIR", raising=False)
    repo = tmp_path / "clone"
    (repo / "notebooks").mkdir(parents=True)
    (repo / "data").mkdir()
    for where in (repo, repo / "notebooks"):  # a terminal at the root; JupyterLab or Colab in notebooks/
        monkeypatch.chdir(where)
        assert data.resolve_data_dir() == (repo / "data").resolve()
    # a folder that is not inside a clone keeps the plain ./data default (and its clear error)
    monkeypatch.chdir(tmp_path)
    assert data.resolve_data_dir() == (tmp_path / "data").resolve()
    # reproduce asks from where its kernels run, whatever the caller's directory
    assert data.resolve_data_dir(start=repo / "notebooks") == (repo / "data").resolve()


def test_notebook_run_from_notebooks_folder_finds_the_repository_data(data_dir, tmp_path, monkeypatch):
    """papermill run by hand in notebooks/, data/ at the root, no $MTBERT_DATA_DIR (issue #13, item 7)."""
    import papermill as pm
    repo = tmp_path / "clone"
    (repo / "notebooks").mkdir(parents=True)
    (repo / "data").symlink_to(data_dir, target_is_directory=True)
    shutil.copy(reproduce.notebook_path("00_data"), repo / "notebooks")
    monkeypatch.delenv("MTBERT_DATA_DIR", raising=False)
    monkeypatch.chdir(repo / "notebooks")
    pm.execute_notebook("00_data.ipynb", "out.ipynb", parameters={"encoder": "tiny", "progress": False,
                        "results_dir": str(tmp_path / "results"), "figures_dir": str(tmp_path / "figures")},
                        cwd=str(repo / "notebooks"), progress_bar=False)
    summary = (tmp_path / "results" / "data_summary.csv").read_text()
    assert "ids-sst-train.csv" in summary


def _relative_to_cwd(target: Path) -> str:
    rel = os.path.relpath(target, Path.cwd())
    assert not Path(rel).is_absolute()
    return rel


def test_reproduce_resolves_a_relative_data_dir_against_the_callers_directory(data_dir, tmp_path, monkeypatch):
    """The README's command sets MTBERT_DATA_DIR=../shared/data/cs224n relative to the clone; the notebooks
    run in notebooks/, so reproduce must resolve it where the user typed it (issue #13, item 1)."""
    caller = tmp_path / "caller"
    caller.mkdir()
    monkeypatch.chdir(caller)
    monkeypatch.setenv("MTBERT_DATA_DIR", _relative_to_cwd(data_dir))
    records = reproduce.run("smoke", only=["00_data"], out_root=tmp_path / "out")
    assert records[0]["status"] == "ran"
    assert os.environ["MTBERT_DATA_DIR"] == _relative_to_cwd(data_dir)  # the caller's environment is untouched
    # the same for a relative data_dir parameter; the manifest records it as the user gave it
    records = reproduce.run("smoke", only=["00_data"], out_root=tmp_path / "out2",
                            overrides={"data_dir": _relative_to_cwd(data_dir)})
    manifest = json.loads(reproduce.manifest_path(tmp_path / "out2" / "results" / "smoke", "00_data").read_text())
    assert manifest["params"]["data_dir"] == _relative_to_cwd(data_dir)


def test_failed_rerun_keeps_the_last_good_executed_notebook(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MTBERT_DATA_DIR", str(data_dir))
    reproduce.run("smoke", only=["00_data"], out_root=tmp_path)
    executed = tmp_path / "results" / "smoke" / "executed"
    good = (executed / "00_data.ipynb").read_bytes()
    with pytest.raises(reproduce.ReproduceError) as err:
        reproduce.run("smoke", only=["00_data"], out_root=tmp_path, force=True,
                      overrides={"data_dir": str(tmp_path / "no-such-folder")})
    failed = executed / "00_data.failed.ipynb"
    assert str(failed) in str(err.value) and "FileNotFoundError" in str(err.value)
    assert (executed / "00_data.ipynb").read_bytes() == good  # the last good copy is untouched
    assert "no-such-folder" in failed.read_text()  # the failed copy holds the traceback
    assert not list(executed.glob(".*running*"))
    reproduce.run("smoke", only=["00_data"], out_root=tmp_path, force=True)  # a good run clears the failure
    assert not failed.exists()


def test_a_notebook_made_from_other_data_files_runs_again(small_data_dir, tmp_path, monkeypatch):
    """The manifest records the data files' digests: the same folder with a changed or an added file (a
    user who later puts the full quora-train.csv in data/) is not "already complete"."""
    folder = tmp_path / "data"
    shutil.copytree(small_data_dir, folder)
    monkeypatch.setenv("MTBERT_DATA_DIR", str(folder))
    status = lambda: reproduce.run("smoke", only=["00_data"], out_root=tmp_path)[0]["status"]  # noqa: E731
    assert status() == "ran" and status() == "skipped"
    with open(folder / "sts-dev.csv", "a", encoding="utf-8") as f:
        f.write("9999\tnew-id\tA man sings.\tA man is singing.\t4.5\n")
    assert status() == "ran" and status() == "skipped"
    shutil.copy(folder / "quora-dev.csv", folder / "quora-train.csv")
    assert status() == "ran"
    manifest = json.loads(reproduce.manifest_path(tmp_path / "results" / "smoke", "00_data").read_text())
    assert manifest["data_sha256"] == data.file_digests(folder) and "quora-train.csv" in manifest["data_sha256"]


def test_runs_load_the_data_quietly_and_notebooks_state_the_source_in_one_line(data_dir, monkeypatch):
    """Skipped rows are warned about where a person reads the data (notebook 00, read_task_file by hand), not
    every time a run loads it; the one-line source names the folder relative to where the notebook runs."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        tasks = data.load_tasks(data_dir, tasks=("para",), warn=False)
    assert sum(tasks["para"].reports["quora-dev.csv"]["skipped"].values()) == 2  # still reported
    with pytest.warns(UserWarning, match="skipped 2 bad rows"):
        data.load_tasks(data_dir, tasks=("para",))
    monkeypatch.chdir(data_dir.parent)
    line = data.source_line(data_dir)
    assert "\n" not in line and f"in {data_dir.name};" in line and not Path(line.split()[4]).is_absolute()


ABSOLUTE = re.compile(r"(?<![\w.~-])/(?:home|root|work|tmp|Users|mnt|opt|usr|var|srv|scratch|private)/|"
                      r"\b[A-Za-z]:\\\\")


def test_committed_results_name_no_machine_paths():
    """Result, manifest, index and executed-notebook files travel: paths in them are relative to the repository
    (or the data folder as the user gave it), never the folders of the machine that made them (issue #15)."""
    files = subprocess.run(["git", "ls-files", "results"], cwd=reproduce.REPO_ROOT, capture_output=True,
                           text=True).stdout.split() or \
        [str(p.relative_to(reproduce.REPO_ROOT)) for p in (reproduce.REPO_ROOT / "results").rglob("*") if p.is_file()]
    texts = [f for f in files if f.endswith((".json", ".csv", ".md", ".ipynb", ".txt"))]
    assert texts, "no committed result files found"
    bad = {f: m.group(0) for f in texts
           if (m := ABSOLUTE.search((reproduce.REPO_ROOT / f).read_text(encoding="utf-8", errors="replace")))}
    assert not bad, f"{len(bad)} files name absolute paths, e.g. {dict(list(bad.items())[:5])}"


STUB = """#!/bin/sh
echo "$(basename "$0") $PWD $*" >> "$STUB_LOG"
if [ "$(basename "$0")" = git ] && [ "$1" = clone ]; then  # a clone: the repository's notebooks/ and package
  for last; do :; done
  mkdir -p "$last" && cp -r "$STUB_REPO/notebooks" "$STUB_REPO/mtbert_utils" "$last"
fi
"""


def _colab_cell() -> str:
    cells = {"".join(next(c for c in json.loads(p.read_text())["cells"] if c["cell_type"] == "code")["source"])
             for p in sorted((reproduce.REPO_ROOT / "notebooks").glob("*.ipynb"))}
    assert len(cells) == 1, "every notebook opens with the same Colab cell"
    return cells.pop()


def test_the_colab_cell_installs_imports_and_fetches_the_data_where_notebooks_look(tmp_path, monkeypatch):
    """Each notebook's first cell, run as Colab runs it: IPython turns `!` and `%cd` into calls, the shell
    commands run in a real shell with git, pip and python stood in for (they log, and git's clone copies the
    repository). After it the kernel imports the clone's package (a kernel does not see a `pip install -e` made
    after it started), works in the clone's notebooks/, and has the data downloaded where notebooks look."""
    from IPython.core.inputtransformer2 import TransformerManager
    content = tmp_path / "content"
    code = TransformerManager().transform_cell(_colab_cell().replace("/content", str(content)))
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name in ("git", "pip", "python"):
        (stubs / name).write_text(STUB)
        (stubs / name).chmod(0o755)
    log = tmp_path / "log"
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "STUB_LOG": str(log),
           "STUB_REPO": str(reproduce.REPO_ROOT)}

    class Shell:  # the two calls IPython's transformed cell makes
        def system(self, command):
            subprocess.run(command, shell=True, check=True, env=env, cwd=os.getcwd())

        def run_line_magic(self, name, arg):
            assert name == "cd"
            os.chdir(arg)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    exec(code, {"get_ipython": Shell})  # elsewhere: nothing at all
    assert not log.exists() and Path.cwd() == tmp_path
    monkeypatch.setitem(sys.modules, "google.colab", object())
    exec(code, {"get_ipython": Shell})

    clone = content / "mtbert"
    calls = [line.split(maxsplit=2) for line in log.read_text().splitlines()]
    assert [c[0] for c in calls] == ["git", "pip", "python"]
    assert calls[0][2].split()[-1] == str(clone) and calls[1][2] == f"install -q -e {clone}"
    assert Path.cwd() == clone / "notebooks"
    spec = importlib.machinery.PathFinder.find_spec("mtbert_utils", sys.path)
    assert Path(spec.origin) == clone / "mtbert_utils" / "__init__.py"
    where, args = Path(calls[2][1]), calls[2][2].split()
    assert args[:3] == ["-m", "mtbert_utils.data", "download"]
    (where / args[3]).mkdir()  # what the download makes
    monkeypatch.delenv("MTBERT_DATA_DIR", raising=False)
    assert data.resolve_data_dir() == (where / args[3]).resolve() == (clone / "data").resolve()

    log.unlink()  # run again (a second notebook, or the cell re-run): no second clone over the first
    exec(code, {"get_ipython": Shell})
    assert [line.split()[0] for line in log.read_text().splitlines()] == ["pip", "python"]
