"""benchmarks/mutation_summary.py: a mutation run over part of the scope (MUTATION_MODULES) is scored on that
part alone, so the modules it did not run neither count as 'not run' nor make their equivalents look stale."""

import json

import pytest

from benchmarks import mutation_summary as ms

# what collect() reads from ./mutants after `MUTATION_MODULES="optim budget" bash benchmarks/mutation.sh`:
# the other modules' mutants were generated but not run
ROWS = [
    {"mutant": "mtbert_utils.optim.x_lr_multiplier__mutmut_1", "function": "optim.lr_multiplier", "status": "killed"},
    {"mutant": "mtbert_utils.optim.x_lr_multiplier__mutmut_2", "function": "optim.lr_multiplier", "status": "killed"},
    {"mutant": "mtbert_utils.optim.x_param_groups__mutmut_9", "function": "optim.param_groups", "status": "survived",
     "line": "if not ps and False:", "diff": "+        if not ps and False:"},
    {"mutant": "mtbert_utils.budget.x_relative_cost__mutmut_3", "function": "budget.relative_cost",
     "status": "timeout"},
    {"mutant": "mtbert_utils.pcgrad.x__orders__mutmut_5", "function": "pcgrad._orders", "status": "not checked"},
    {"mutant": "mtbert_utils.stats.x_mean_ci__mutmut_1", "function": "stats.mean_ci", "status": "not checked"},
]


def summarize_modules(monkeypatch, tmp_path, *args):
    monkeypatch.setattr(ms, "collect", lambda diffs=True: [dict(r) for r in ROWS])
    assert ms.main([*args, "--out", str(tmp_path)]) == 0
    return json.loads((tmp_path / "mutants.json").read_text())["summary"], (tmp_path / "summary.md").read_text()


def test_a_run_of_some_modules_is_scored_on_them_alone(monkeypatch, tmp_path):
    summary, md = summarize_modules(monkeypatch, tmp_path, "--modules", "optim", "budget")
    assert summary["modules"] == ["optim", "budget"] and list(summary["by_module"]) == ["optim", "budget"]
    assert summary["counts"] == {"killed": 2, "survived": 1, "timeout": 1}  # no "not checked": pcgrad, stats not run
    assert summary["non_equivalent"] == 4 and summary["killed_or_timeout"] == 3 and summary["kill_rate"] == 0.75
    # the equivalents listed for the modules not run are not reported as stale (those of optim are: this fake
    # run has none of optim's listed survivors)
    assert summary["stale_equivalents"] and all(e.startswith("optim.") for e in summary["stale_equivalents"])
    assert all(p.split(".")[1] in ("optim", "budget") for p in summary["scope"])
    assert md.startswith("# Mutation testing of the core modules: optim, budget\n")
    assert "3 of 4 non-equivalent mutants killed (75.0%)" in md and "`if not ps and False:`" in md


def test_the_whole_scope_counts_what_was_not_run(monkeypatch, tmp_path):
    summary, md = summarize_modules(monkeypatch, tmp_path)
    assert summary["counts"]["not checked"] == 2 and summary["kill_rate"] == 0.75
    # the whole scope is the modules that share [tool.mutmut]'s selection: those with tests of their own run alone
    assert set(summary["by_module"]) == set(ms.SHARED) == set(ms.MODULES) - set(ms.OWN_SELECTION)
    assert set(ms.OWN_SELECTION) == {"config", "tables", "readings", "results", "gradients", "presets", "plans",
                                     "model", "training"}
    assert md.startswith("# Mutation testing of the core modules\n") and "2 were not run" in md
    # the pcgrad equivalents are stale here (this fake run has no pcgrad survivors): the check still works
    assert any(s.startswith("pcgrad.") for s in summary["stale_equivalents"])


def test_scope_and_unsettled_follow_the_modules(monkeypatch, capsys):
    assert ms.main(["--scope", "--modules", "optim"]) == 0
    assert capsys.readouterr().out.split() == ["mtbert_utils.optim.*"]
    monkeypatch.setattr(ms, "collect", lambda diffs=True: [dict(r) for r in ROWS])
    assert ms.main(["--unsettled", "--modules", "optim", "budget"]) == 0
    assert capsys.readouterr().out.split() == ["mtbert_utils.optim.x_param_groups__mutmut_9"]


def test_a_module_with_its_own_selection_gets_a_pyproject_naming_it(capsys):
    import tomllib
    mine = tomllib.loads(ms.PYPROJECT.read_text())
    assert ms.main(["--pyproject", "--modules", "config"]) == 0
    theirs = tomllib.loads(capsys.readouterr().out)
    mutmut = theirs["tool"].pop("mutmut")
    assert mutmut["only_mutate"] == ["mtbert_utils/config.py"]
    assert mutmut["pytest_add_cli_args_test_selection"] == mine["tool"]["mtbert"]["mutation-selection"]["config"]
    # the rest of [tool.mutmut] and every other section are as they were
    def rest(section):
        return {k: v for k, v in section.items() if k not in ("only_mutate", "pytest_add_cli_args_test_selection")}
    assert rest(mutmut) == rest(mine["tool"]["mutmut"]) and rest(mutmut)
    mine["tool"].pop("mutmut")
    assert theirs == mine
    # the shared modules run here, with pyproject.toml as it is; a module of its own does not run with others
    assert ms.main(["--pyproject", "--modules", "optim", "stats"]) == 0
    assert capsys.readouterr().out == ms.PYPROJECT.read_text()
    with pytest.raises(SystemExit):
        ms.main(["--pyproject", "--modules", "config", "optim"])
    assert "config has a test selection of its own: run it alone" in capsys.readouterr().err
    assert ms.main(["--scope", "--modules", "config"]) == 0
    assert capsys.readouterr().out.split() == ["mtbert_utils.config.*"]
    assert ms.main(["--scope"]) == 0 and "mtbert_utils.config.*" not in capsys.readouterr().out.split()


def test_the_bugs_planted_in_the_training_loop_still_match_it_and_their_summary_is_of_them():
    """benchmarks/planted_bugs.py: each plant's line is in training.py once (a changed loop makes a plant stale
    here, not minutes into a run), and the committed summary ran these very plants."""
    from benchmarks import planted_bugs as pb
    source = (pb.ROOT / pb.SOURCE).read_text()
    for plant in pb.PLANTS:
        assert pb.planted(source, plant) != source, plant.name
    with pytest.raises(ValueError, match="occurs 0 times"):
        pb.planted(source, pb.Plant("gone", "f", "no such line", "", ""))
    summary = json.loads((pb.OUT / "summary.json").read_text())
    assert [(r["name"], r["old"], r["new"]) for r in summary["plants"]] == [(p.name, p.old, p.new) for p in pb.PLANTS]
    assert summary["killed"] == sum(r["status"] == "killed" for r in summary["plants"])
