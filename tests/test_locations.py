"""Where the data is found and where executed notebooks go, as a new user meets them:
a relative data folder typed in a terminal, a notebook opened from notebooks/, a failed re-run."""
import json
import os
import shutil
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
