"""mtbert_utils.plans builds exactly the runs the notebooks made: its run names (a hash of each config) equal
the run names in the committed index files, so committed results are found and reused, never retrained."""

import json

import pytest

from mtbert_utils import packing, plans, reproduce
from mtbert_utils.results import REPO_ROOT


def committed_run_names(results_dir, notebook) -> set[str]:
    index = json.loads((results_dir / "runs" / notebook / "index.json").read_text())
    return {p.split("/")[-1].removesuffix(".json") for rows in index["runs"].values() for p in rows
            if not p.split("/")[-1].startswith("zero-shot")}  # 04's zero-shot row evaluates, it does not train


def planned_run_names(results_dir, notebook, params) -> set[str]:
    return set(planned_configs(results_dir, notebook, params))


def planned_configs(results_dir, notebook, params) -> dict:
    """Every stage's runs by name; a later stage gets the earlier stages' committed runs, as the driver does."""
    configs, earlier = {}, []
    for stage in range(len(plans.STAGES[notebook])):
        runs = packing.stage_runs(notebook, params, stage, earlier, results_dir / "runs")
        configs.update({cfg.run_name: cfg for _, cfg in runs})
        done = {}
        for key, cfg in runs:
            done.setdefault(key, []).append(packing.finished_run(cfg))
        assert all(r is not None for rs in done.values() for r in rs), f"{notebook} stage {stage + 1}: runs missing"
        earlier.append(done)
    return configs


@pytest.mark.parametrize("profile", ["cpu", "cpu-extended", "best"])
def test_plan_run_names_equal_committed_index(profile, data_dir, monkeypatch):
    monkeypatch.setenv("MTBERT_DATA_DIR", str(data_dir))  # 09 and 10 read the training-set sizes
    _, results_dir, _, plan = reproduce.resolve(profile, None, None, REPO_ROOT)
    checked = 0
    for notebook, params in packing.training_notebooks(plan).items():
        assert planned_run_names(results_dir, notebook, params) == committed_run_names(results_dir, notebook)
        checked += 1
    assert checked == {"cpu": 5, "cpu-extended": 3, "best": 1}[profile]


@pytest.mark.parametrize("profile", ["cpu", "cpu-extended", "best"])
def test_plan_configs_equal_the_committed_runs_configs(profile, data_dir, monkeypatch):
    """Field by field, those the run name leaves out too (write_predictions, name): a field a committed run
    predates must be at the value the run had, its default."""
    from dataclasses import fields

    from mtbert_utils.config import TrainConfig
    monkeypatch.setenv("MTBERT_DATA_DIR", str(data_dir))
    _, results_dir, _, plan = reproduce.resolve(profile, None, None, REPO_ROOT)
    defaults = {f.name: getattr(TrainConfig(), f.name) for f in fields(TrainConfig)}
    for notebook, params in packing.training_notebooks(plan).items():
        index = json.loads((results_dir / "runs" / notebook / "index.json").read_text())
        committed = {r["run_name"]: r["config"] for r in
                     (json.loads((results_dir / p).read_text()) for rows in index["runs"].values() for p in rows)
                     if not r["run_name"].startswith("zero-shot")}
        planned = planned_configs(results_dir, notebook, params)
        assert set(planned) == set(committed)
        for name, cfg in planned.items():
            mine = json.loads(json.dumps(cfg.to_dict()))  # tuples as the JSON file has them: lists
            # where the run was written and whether it showed progress bars are the machine's business
            want = {**defaults, **committed[name], "out_dir": mine["out_dir"], "progress": mine["progress"]}
            assert set(want) == set(mine), name  # no field the code no longer has
            assert {k: (mine[k], want[k]) for k in mine if mine[k] != want[k]} == {}, name


def test_every_training_notebook_has_a_plan():
    """A notebook that trains (calls run_seeds/run_grid) and has no plan would be missed by --train-only."""
    trains = {p.stem for p in (REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")
              if "run_seeds(" in p.read_text() or "run_grid(" in p.read_text()}
    assert trains == set(plans.STAGES)


def test_parameters_cell_read_without_papermill():
    declared = reproduce.declared_parameters(reproduce.notebook_path("09_samplers"))
    assert declared["temperature"] == {"name": "temperature", "inferred_type_name": "float", "default": 2.0,
                                       "help": "T of the temperature sampler; 1 is proportional, large T is uniform"}
    assert declared["max_train"]["default"] == {"sst": 1200, "para": 2400, "sts": 900}


@pytest.mark.parametrize("profile", ["gpu-minilm", "paper-minilm", "gpu", "paper"])
def test_speed_switches_reach_the_configs_and_leave_the_run_names(profile):
    """The GPU profiles' `speed` parameter sets execution-only switches: the same run names as without it,
    so a run trained on a GPU with them is found by a CPU render of the notebooks, and vice versa."""
    _, _, _, plan = reproduce.resolve(profile, None, None, REPO_ROOT)
    checked = 0
    for notebook, params in packing.training_notebooks(plan).items():
        assert params["speed"], f"{profile} sets no speed switches for {notebook}"
        fast = plans.STAGES[notebook][0](params, [])
        plain = plans.STAGES[notebook][0]({**params, "speed": {}}, [])
        assert {k: c.run_name for k, c in fast.items()} == {k: c.run_name for k, c in plain.items()}
        assert all(getattr(c, k) == v for c in fast.values() for k, v in params["speed"].items())
        checked += 1
    assert checked == 5


def test_speed_refuses_switches_that_change_the_numbers():
    with pytest.raises(ValueError, match="execution-only"):
        plans.execution({"cache_frozen_encoder": True})
