"""The whole notebook suite under the smoke profile, and the reproduce CLI's contract."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from mtbert_utils import reproduce
from mtbert_utils.experiments import TABLE1_ROWS

NOTEBOOKS = ["00_data", "01_sequential", "02_rr_undersampling", "03_rr_oversampling", "04_cosine_sts",
             "05_pcgrad_ablation", "06_results", "07_error_analysis"]
EXPECTED_RESULTS = ["data_summary.csv", "data_files.csv", "data_skipped_rows.csv", "data_padding.csv", "table1.csv", "table1.md",
                    "table1_paired.csv", "table1_meta.json", "04_cosine_sts_cosine_vs_linear.csv",
                    "05_pcgrad_ablation_conflicts.csv", "07_sst_confusion.csv", "07_para_confident_wrong.csv",
                    "07_sts_worst.csv"] + [f"runs/{nb}/index.json" for nb in NOTEBOOKS[1:6]]
EXPECTED_FIGURES = ["00_data_label_distributions.png", "00_data_token_lengths.png", "table1_bars.png",
                    "table1_learning_curves.png", "schedules_examples_seen.png", "pcgrad_grad_cosines.png",
                    "05_pcgrad_ablation_grad_cosines.png", "07_sst_confusion.png", "07_sts_scatter.png"] + \
                   [f"{nb}_{kind}.png" for nb in NOTEBOOKS[1:4] for kind in ("learning_curves", "examples_seen")]


@pytest.fixture(scope="module")
def smoke_run(run_profile, data_dir):
    results, _, records = run_profile("smoke")  # shared with tests/test_pipeline_numbers.py
    os.environ["MTBERT_DATA_DIR"] = str(data_dir)  # the re-runs below read the data too
    return results.parent.parent, records


def test_smoke_profile_writes_every_result_and_figure(smoke_run):
    out, records = smoke_run
    assert [r["notebook"] for r in records] == NOTEBOOKS
    results, figures = out / "results" / "smoke", out / "figures" / "smoke"
    missing = [p for p in EXPECTED_RESULTS if not (results / p).is_file()]
    missing += [p for p in EXPECTED_FIGURES if not (figures / p).is_file()]
    assert not missing, f"not written: {missing}"
    for nb in NOTEBOOKS:
        executed = json.loads((results / "executed" / f"{nb}.ipynb").read_text())
        assert executed["cells"], nb
    for fig in EXPECTED_FIGURES:
        assert (figures / fig).stat().st_size > 5_000, fig  # a real plot, not an empty canvas


def stream_lines(notebook: dict) -> list[str]:
    return [line for cell in notebook["cells"] for out in cell.get("outputs", []) if out["output_type"] == "stream"
            for line in "".join(out["text"]).splitlines()]


def test_executed_copies_are_concise_and_travel(smoke_run):
    """An executed copy is a document: one line per training epoch, no progress-bar frames, no repeated
    data warnings, no path of the machine that ran it (the smoke profile shows progress, as a person would)."""
    out, _ = smoke_run
    results = out / "results" / "smoke"
    for nb in NOTEBOOKS:
        text = (results / "executed" / f"{nb}.ipynb").read_text()
        executed = json.loads(text)
        index = results / "runs" / nb / "index.json"
        runs = [json.loads((results / p).read_text()) for rs in json.loads(index.read_text())["runs"].values()
                for p in rs] if index.exists() else []
        epochs = sum(len(r.get("history", [])) for r in runs)
        lines = stream_lines(executed)
        assert len(lines) <= epochs + 10, (nb, len(lines), epochs, lines[:20])
        assert not any("it/s]" in line or "\r" in line for line in lines), nb  # no bar frames
        assert "IProgress not found" not in text and "skipped 2 bad rows" not in text or nb == "00_data", nb
        assert str(reproduce.REPO_ROOT) not in text, nb
        assert executed["metadata"]["papermill"]["input_path"] == f"notebooks/{nb}.ipynb"


def test_table1_has_every_row(smoke_run):
    out, _ = smoke_run
    table = pd.read_csv(out / "results" / "smoke" / "table1.csv")
    assert list(table["row"]) == [label for label, _, _ in TABLE1_ROWS]
    trained = table[table["row"] != TABLE1_ROWS[0][0]]
    assert (trained["seeds"] == 2).all()  # the smoke profile trains 2 seeds per row
    for task in ("sst", "para", "sts"):
        assert table[f"{task}_mean"].notna().all()
    md = (out / "results" / "smoke" / "table1.md").read_text()
    assert all(label in md for label, _, _ in TABLE1_ROWS)


def test_rerun_skips_complete_notebooks(smoke_run):
    out, _ = smoke_run
    log = out / "results" / "smoke" / "executed" / "reproduce-log.json"
    before = log.read_text()
    records = reproduce.run("smoke", out_root=out, only=["01_sequential", "06_results"])
    assert [r["status"] for r in records] == ["skipped", "skipped"]
    assert log.read_text() == before  # a call that ran nothing keeps the log of the call that ran them


def test_figures_are_redrawn_from_files_alone(smoke_run):
    out, _ = smoke_run
    fig = out / "figures" / "smoke" / "table1_bars.png"
    fig.unlink()
    records = reproduce.run("smoke", out_root=out, only=["06_results"], force=True)
    assert records[0]["status"] == "ran" and fig.is_file()


def test_failure_names_notebook_and_error(smoke_run, tmp_path):
    out, _ = smoke_run
    with pytest.raises(reproduce.ReproduceError, match=r"07_error_analysis failed in cell \d+ .*FileNotFoundError"):
        # an empty results folder: the error analysis has no predictions to read
        reproduce.run("smoke", out_root=tmp_path, only=["07_error_analysis"])


def test_bad_profiles_and_overrides(tmp_path):
    with pytest.raises(reproduce.ReproduceError, match="unknown profile 'nope'.*smoke"):
        reproduce.load_profile("nope")
    bad = tmp_path / "bad.json"
    bad.write_text('{"notebooks": ["00_data"], "paramz": {}}')
    with pytest.raises(reproduce.ReproduceError, match=r"bad.json: unknown keys \['paramz'\]"):
        reproduce.load_profile(str(bad))
    bad.write_text('{"notebooks": ["99_nope"]}')
    with pytest.raises(reproduce.ReproduceError, match="no notebook '99_nope'"):
        reproduce.load_profile(str(bad))
    bad.write_text("{not json")
    with pytest.raises(reproduce.ReproduceError, match="not valid UTF-8 JSON"):
        reproduce.load_profile(str(bad))
    with pytest.raises(reproduce.ReproduceError, match="not parameters of any notebook"):
        reproduce.run("smoke", out_root=tmp_path, overrides={"no_such_param": 1})
    with pytest.raises(reproduce.ReproduceError, match="'seeds' must be list"):
        reproduce.run("smoke", out_root=tmp_path, overrides={"seeds": 3}, only=["01_sequential"])
    assert reproduce.parse_override("seeds=[0,1]") == ("seeds", [0, 1])
    assert reproduce.parse_override("encoder=tiny") == ("encoder", "tiny")


def test_cli_list_and_error_exit(capsys):
    assert reproduce.main(["--list"]) == 0
    assert "smoke" in capsys.readouterr().out
    assert reproduce.main(["--profile", "nope"]) == 1
    assert "unknown profile" in capsys.readouterr().err


def test_the_usage_examples_in_help_are_valid_calls():
    """Every example in `--help` parses, and its profile, notebooks and overrides resolve (nothing runs): one
    once passed max_dev to 06_results, which has no such parameter, and failed as a user copied it."""
    examples = [line.split("#")[0].split()[3:] for line in reproduce.__doc__.splitlines()
                if line.strip().startswith("python -m mtbert_utils.reproduce")]
    assert len(examples) >= 6
    for argv in examples:
        args = reproduce.build_parser().parse_args(argv)
        reproduce.resolve(args.profile, *reproduce.selection(args), args.out)
    with pytest.raises(reproduce.ReproduceError, match=r"overrides \['max_dev'\] are not parameters"):
        reproduce.resolve("cpu", ["06_results"], {"max_dev": 200}, None)


def test_code_version_covers_the_code_notebooks_run_and_nothing_else():
    """A notebook re-runs when code it runs changes, not when the benchmark does: the hashed modules are the
    import closure of the notebook, lazy imports inside functions included."""
    nb = reproduce.NOTEBOOK_DIR / "01_sequential.ipynb"
    names = {p.stem for p in reproduce.notebook_modules(nb)}
    # 01 imports experiments; experiments runs training (imported inside run_seeds), which uses the rest
    assert {"experiments", "training", "config", "checkpoint", "gradients", "pcgrad", "schedules", "data",
            "model"} <= names
    assert "bench" not in names and "reproduce" not in names
    data_only = {p.stem for p in reproduce.notebook_modules(reproduce.NOTEBOOK_DIR / "00_data.ipynb")}
    assert "training" not in data_only and "data" in data_only


def test_pipeline_tests_are_marked_slow():
    """`pytest -m "not slow"` leaves out the tests that run a whole profile (conftest marks every test using
    run_profile), and keeps the rest of this module."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "slow", __file__],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
    slow = {line.split("::")[1] for line in proc.stdout.splitlines() if "::" in line}
    assert "test_rerun_skips_complete_notebooks" in slow and "test_figures_are_redrawn_from_files_alone" in slow
    assert "test_cli_list_and_error_exit" not in slow and "test_pipeline_tests_are_marked_slow" not in slow
