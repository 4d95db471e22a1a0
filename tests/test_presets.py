"""presets.py and plans.py: the named sets of TrainConfig fields and what each profile's notebooks train, by
value. tests/test_plans.py checks the plans' run names against the committed runs; this file checks what the
names cannot (the functions' own arguments and refusals).

Fast: with tests/test_plans.py, presets.py's and plans.py's own mutation-test selection (pyproject.toml's
[tool.mtbert.mutation-selection], docs/testing.md).
"""

import pytest

from mtbert_utils.config import TrainConfig
from mtbert_utils.presets import BASELINE, BEST, best_config, make_config


def test_make_config_defaults_are_the_tuned_setup_on_all_the_data():
    assert make_config() == TrainConfig(encoder="minilm", data_dir=None, max_train=None, max_dev=None,
                                        batch_size=64, progress=True)
    assert make_config() == TrainConfig()  # every TrainConfig default is the study's tuned setup


def test_make_config_passes_each_notebook_parameter_on():
    caps = {"sst": 5}
    c = make_config("baseline", encoder="tiny", data_dir="d", max_train=caps, max_dev=7, batch_size=8,
                    progress=False, seed=3)
    assert c == TrainConfig(**{**BASELINE, "encoder": "tiny", "data_dir": "d", "max_train": {"sst": 5},
                               "max_dev": 7, "batch_size": 8, "progress": False, "seed": 3})
    caps["sst"] = 1
    assert c.max_train == {"sst": 5}  # a copy: the notebook's dict changed later does not change the run
    # notebook conventions: "" = $MTBERT_DATA_DIR or ./data, {} = every example, 0 = the whole dev set
    assert (make_config(data_dir="", max_train={}, max_dev=0).data_dir, make_config(max_train={}).max_train,
            make_config(max_dev=0).max_dev) == (None, None, None)
    assert make_config(max_train=100).max_train == 100 and make_config(max_train=0).max_train is None  # an int
    with pytest.raises(ValueError) as e:
        make_config("plain")
    assert str(e.value) == "unknown preset 'plain'; choose 'baseline' or 'tuned'"


def test_best_config_defaults_and_arguments():
    assert best_config() == TrainConfig(**{**BEST, "encoder": "minilm", "data_dir": None, "phases": [[5, True]],
                                          "progress": True})
    c = best_config(encoder="tiny", data_dir="d", epochs=1, progress=False, seed=2)  # one epoch is enough
    assert (c.encoder, c.data_dir, c.phases, c.progress, c.seed) == ("tiny", "d", [[1, True]], False, 2)
    for bad in (0, 2.0, True, "5"):
        with pytest.raises(ValueError) as e:
            best_config(epochs=bad)
        assert str(e.value) == f"epochs must be a positive int, got {bad!r}"


# --- plans.py: each notebook's runs, with arguments unlike any profile's --------------------------------------

from dataclasses import replace  # noqa: E402

from mtbert_utils import plans  # noqa: E402

COMMON = dict(encoder="tiny", data_dir="some/data", max_train={"sst": 40, "para": 50, "sts": 30}, max_dev=7,
              batch_size=8, progress=False)
REFERENCE = {"sst": 0.4, "para": 0.7, "sts": 0.5}


def assert_common(configs):
    """Every run gets the notebook's encoder, data, caps, batch size and progress switch."""
    assert configs
    for c in configs:
        assert (c.encoder, c.data_dir, c.max_train, c.max_dev, c.batch_size, c.progress) == \
            ("tiny", "some/data", COMMON["max_train"], 7, 8, False), c.name


def test_table1_plans_by_value():
    baseline = make_config("baseline", **COMMON)
    seq = plans.sequential(**COMMON, epochs=3, order=["sts", "sst", "para"], speed={"tf32": True})
    assert list(seq) == ["sequential-baseline"]
    assert seq["sequential-baseline"] == replace(baseline, schedule="sequential", phases=[[3, True]], tf32=True,
                                                 schedule_params={"order": ["sts", "sst", "para"]},
                                                 name="sequential-baseline")
    under, over = plans.rr_undersampling(**COMMON, epochs=2), plans.rr_oversampling(**COMMON, epochs=2)
    assert under == {"rr_under-baseline": replace(baseline, schedule="rr_under", phases=[[2, True]],
                                                  name="rr_under-baseline")}
    assert over == {"rr_over-baseline": replace(baseline, schedule="rr_over", phases=[[2, True]],
                                                name="rr_over-baseline")}
    phases = [[1, False], [2, True]]
    cos = plans.cosine_sts(**COMMON, phases=phases, lr_decay_epochs=[1], speed={"pad_to_multiple": 8})
    tuned = replace(make_config("tuned", **COMMON), phases=phases, lr_decay_epochs=[1], record_grad_cosines=True,
                    write_predictions=True, name="rr_over-tuned-cosine", pad_to_multiple=8)
    assert cos == {"rr_over-tuned-cosine": tuned,  # the cosine head, its predictions written for notebook 07
                   "rr_over-tuned-linear": replace(tuned, sts_head="linear", write_predictions=False,
                                                   name="rr_over-tuned-linear")}
    assert (tuned.schedule, tuned.sts_head, cos["rr_over-tuned-linear"].resolved_sts_loss()) == \
        ("rr_over", "cosine", "mse")
    ablation = plans.pcgrad_ablation(**COMMON, phases=phases, lr_decay_epochs=[1], pcgrad_reduction="sum",
                                     speed={"pad_to_multiple": 8})
    assert ablation == {"rr_over-tuned-cosine": tuned,  # the same runs as 04's row
                        "rr_over-tuned-cosine-pcgrad": replace(tuned, pcgrad=True, pcgrad_reduction="sum",
                                                               write_predictions=False,
                                                               name="rr_over-tuned-cosine-pcgrad")}
    assert_common([*seq.values(), *under.values(), *over.values(), *cos.values(), *ablation.values()])


def test_best_plan_by_value():
    best = plans.best_model(encoder="tiny", data_dir="some/data", epochs=2, max_train={"sst": 40}, max_dev=7,
                            progress=False)
    assert best == {"best": best_config(encoder="tiny", data_dir="some/data", epochs=2, progress=False,
                                        max_train={"sst": 40}, max_dev=7)}
    every = plans.best_model(encoder="tiny", data_dir="", epochs=2, max_train={}, max_dev=0, progress=True)["best"]
    assert (every.max_train, every.max_dev, every.data_dir) == (None, None, None)  # all the data


def test_sampler_plans_by_value():
    single = plans.samplers_single(**COMMON, epochs=2)
    base = make_config("baseline", **COMMON, phases=[[2, True]])
    assert single == {t: replace(base, schedule="rr_over", train_tasks=[t], name=f"single-{t}")
                      for t in ("sst", "para", "sts")}
    samplers = ["sequential", "temperature", "annealed", "adaptive"]
    epochs = plans.samplers_epochs(REFERENCE, **COMMON, epochs=2, samplers=samplers, temperature=3.0,
                                   adaptive_power=0.5)
    assert list(epochs) == samplers and {c.name for c in epochs.values()} == {f"{s}-epochs" for s in samplers}
    assert [epochs[s].schedule_params for s in samplers] == [{}, {"T": 3.0}, {"epochs": 2},
                                                              {"reference": REFERENCE, "power": 0.5}]
    assert all(c.schedule == s and c.phases == [[2, True]] for s, c in epochs.items())
    assert_common([*single.values(), *epochs.values()])


def test_equal_budget_plan_reuses_runs_that_saw_the_budget(data_dir):
    common = {**COMMON, "data_dir": str(data_dir)}
    samplers = ["sequential", "rr_under", "annealed"]
    plan = plans.samplers_budget({s: [] for s in samplers}, REFERENCE, **common, epochs=2, samplers=samplers,
                                 temperature=2.0, adaptive_power=1.0, budget_examples=None)
    assert plan.sizes == {"sst": 40, "para": 50, "sts": 30} and plan.num_batches == {"sst": 5, "para": 7, "sts": 4}
    assert plan.budget == 2 * 120  # sequential's examples over the epochs: every example once an epoch
    assert set(plan.schedules) == set(samplers) == set(plan.budget_epochs) and plan.reused == samplers  # no runs
    seen = [{"examples_seen": {"sst": 80, "para": 100, "sts": 60}}]  # sequential saw exactly the budget
    plan = plans.samplers_budget({"sequential": seen, "rr_under": [{"examples_seen": {"sst": 1}}], "annealed": seen},
                                 REFERENCE, **common, epochs=2, samplers=samplers, temperature=2.0,
                                 adaptive_power=1.0, budget_examples=None)
    assert plan.reused == ["sequential", "annealed"] and list(plan.configs) == ["rr_under"]
    c = plan.configs["rr_under"]
    assert (c.name, c.schedule, c.examples_budget, c.phases) == \
        ("rr_under-budget", "rr_under", 240, [[plan.budget_epochs["rr_under"], True]])
    plan = plans.samplers_budget({"annealed": seen}, REFERENCE, **common, epochs=2, samplers=["annealed"],
                                 temperature=2.0, adaptive_power=1.0, budget_examples=90)
    assert plan.budget == 90 and plan.configs["annealed"].examples_budget == 90
    # an annealed run under a budget anneals over the epochs the budget runs
    from mtbert_utils import experiments
    expect = experiments.budget_epochs(plan.schedules["annealed"], plan.num_batches, plan.sizes, 90)
    assert plan.configs["annealed"].schedule_params == {"epochs": expect}
    assert all(c.data_dir == str(data_dir) for c in plan.configs.values())
    assert_common([replace(c, data_dir="some/data") for c in plan.configs.values()])


def test_sigma_and_order_plan(data_dir):
    common = {**COMMON, "data_dir": str(data_dir)}
    plan = plans.sigma_and_order(**common, epochs=2, sigmas=[3, "max", 7], orders=[["sts", "sst", "para"]])
    assert plan.num_batches == {"sst": 5, "para": 7, "sts": 4} and plan.sigma_values == [3, 7]  # distinct counts
    assert plan.order_list == [["sts", "sst", "para"]] and list(plan.order) == ["sts-sst-para"]
    assert plan.sigma[7] == replace(make_config("baseline", **common, phases=[[2, True]]), schedule="rr_over",
                                    schedule_params={"sigma": 7}, name="rr_over-sigma7")
    o = plan.order["sts-sst-para"]
    assert (o.schedule, o.schedule_params, o.name) == ("sequential", {"order": ["sts", "sst", "para"]},
                                                       "sequential-sts-sst-para")
    every = plans.sigma_and_order(**common, epochs=2, sigmas=[3], orders=None)
    assert len(every.order_list) == 6 and "para-sts-sst" in every.order  # no orders: all six
    stage = plans.STAGES["10_sigma_and_order"][0]({**common, "epochs": 2, "sigmas": [3], "orders": None}, [])
    assert set(stage) == {("sigma", 3), *(("order", k) for k in every.order)}


def test_pcgrad_weights_plan():
    plan = plans.pcgrad_weights(**COMMON, phases=[[2, True]], lr_decay_epochs=[], pcgrad_reduction="sum",
                                weightings=[{"sst": 1, "para": 1, "sts": 1}, {"sst": 3, "para": 1, "sts": 0.5}])
    assert list(plan) == [("equal", "plain"), ("equal", "pcgrad"), ("sst:3 para:1 sts:0.5", "plain"),
                          ("sst:3 para:1 sts:0.5", "pcgrad")]
    plain, surgery = plan[("sst:3 para:1 sts:0.5", "plain")], plan[("sst:3 para:1 sts:0.5", "pcgrad")]
    assert plain == replace(make_config("tuned", **COMMON), phases=[[2, True]], lr_decay_epochs=[],
                            record_grad_cosines=True, task_weights={"sst": 3.0, "para": 1.0, "sts": 0.5},
                            name="rr_over-tuned-cosine-w-sst3-para1-sts0.5")
    assert surgery == replace(plain, pcgrad=True, pcgrad_reduction="sum",
                              name="rr_over-tuned-cosine-pcgrad-w-sst3-para1-sts0.5")
    assert_common(plan.values())


def test_call_passes_the_parameters_a_plan_names():
    params = {**COMMON, "epochs": 2, "seeds": [0, 1], "results_dir": "r"}  # others are left out
    assert plans.call(plans.rr_oversampling, params) == plans.rr_oversampling(**COMMON, epochs=2)  # speed: default
    assert plans.call(plans.rr_oversampling, {**params, "speed": {"tf32": True}})["rr_over-baseline"].tf32
    with pytest.raises(TypeError) as e:
        plans.call(plans.sequential, params)
    assert str(e.value) == "sequential needs the notebook parameters ['order']"
    stage = plans.STAGES["03_rr_oversampling"][0]
    assert stage.__name__ == "rr_oversampling" and stage(params, []) == plans.rr_oversampling(**COMMON, epochs=2)


def test_equal_budget_schedules_and_configs_take_the_samplers_parameters(data_dir):
    """The schedules that size the budget (one epoch's draw) and the configs that train it get the notebook's
    temperature, adaptive power and reference, as the equal-epochs runs do."""
    from mtbert_utils.schedules import get_schedule, schedule_params_for
    common = {**COMMON, "data_dir": str(data_dir)}
    samplers = ["temperature", "adaptive", "annealed"]
    plan = plans.samplers_budget({s: [] for s in samplers}, REFERENCE, **common, epochs=2, samplers=samplers,
                                 temperature=3.0, adaptive_power=0.5, budget_examples=None)
    for s in samplers:
        want = get_schedule(s, **schedule_params_for(s, 1, T=3.0, reference=REFERENCE, power=0.5))
        assert vars(plan.schedules[s]) == vars(want), s
    plan = plans.samplers_budget({s: [{"examples_seen": {"sst": 1}}] for s in samplers}, REFERENCE, **common,
                                 epochs=2, samplers=samplers, temperature=3.0, adaptive_power=0.5,
                                 budget_examples=None)
    assert plan.configs["temperature"].schedule_params == {"T": 3.0}
    assert plan.configs["adaptive"].schedule_params == {"reference": REFERENCE, "power": 0.5}


def test_a_stage_of_one_plan_passes_the_notebook_parameters():
    stage = plans._one(plans.rr_undersampling)
    params = {**COMMON, "epochs": 2, "seeds": [0]}
    assert stage.__name__ == "rr_undersampling" and stage(params, []) == plans.rr_undersampling(**COMMON, epochs=2)
