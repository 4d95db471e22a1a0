"""TrainConfig (mtbert_utils/config.py): the study's defaults, the values derived from the fields, the run name's
fingerprint, and the checks that refuse a bad value, each at its boundary and with its whole message.

Nothing here loads a model or reads data: these tests are config.py's own mutation-test selection
(pyproject.toml's [tool.mtbert.mutation-selection], docs/testing.md).
"""

import math
import re
from pathlib import Path

import pytest

from mtbert_utils import config as cfg
from mtbert_utils.config import TrainConfig, check_keys


def refused(message: str, **fields) -> None:
    """TrainConfig(**fields) raises a ValueError whose message is exactly `message`."""
    with pytest.raises(ValueError) as e:
        TrainConfig(**fields)
    assert str(e.value) == message


def test_defaults_are_the_studys_tuned_setup():
    c = TrainConfig()
    assert c.lr == {"encoder": 2e-5, "shared": 1e-4, "sst": 9.5e-4, "para": 1e-4, "sts": 4e-5}
    assert (c.lr_decay, c.lr_decay_epochs, c.layer_lr_decay) == (0.7, [5, 25], 1.0)
    assert c.phases == [[5, False], [20, True], [5, False]] and c.epochs == 30
    assert (c.batch_size, c.eval_batch_size, c.max_length, c.dropout) == (64, 128, 128, 0.3)
    assert (c.schedule, c.schedule_params, c.train_tasks) == ("rr_over", {}, ["sst", "para", "sts"])
    assert c.task_weights == {"sst": 1.0, "para": 1.0, "sts": 1.0}
    assert (c.sts_head, c.sts_loss, c.sts_threshold, c.sts_margin, c.para_input) == \
        ("cosine", None, 2.5, 0.0, "joint")
    assert (c.weight_decay, c.max_grad_norm, c.pcgrad, c.pcgrad_reduction, c.grad_method) == \
        (0.0, None, False, "mean", "sum")
    assert (c.encoder, c.pooling, c.encoder_dropout, c.attn_implementation, c.class_weights) == \
        ("minilm", None, None, "sdpa", False)
    assert (c.val_fraction, c.group_by_length, c.pad_to_multiple, c.examples_budget) == (0.0, True, None, None)
    assert (c.precision, c.optimizer, c.device, c.seed, c.name, c.out_dir, c.data_dir) == \
        ("auto", "auto", "auto", 0, None, "results/runs", None)
    off = ("compile", "cache_frozen_encoder", "para_swap", "record_grad_cosines", "tf32", "cuda_graphs",
           "fuse_tasks", "freeze_word_embeddings", "write_predictions")
    assert all(getattr(c, f) is False for f in off) and c.progress is True and c.snapshot_ensemble == 0
    # every default of a field added after results were committed is what ADDED_LATER keeps out of the hash
    assert all(getattr(c, k) == v for k, v in cfg.ADDED_LATER.items())


def test_each_default_list_and_dict_is_a_fresh_copy():
    a, b = TrainConfig(), TrainConfig()
    a.lr["sst"], a.phases[0][0] = 1.0, 9
    a.train_tasks.append("x"), a.lr_decay_epochs.append(7), a.schedule_params.update(k=1)
    a.task_weights["sst"] = 2.0
    assert b == TrainConfig() and b.lr["sst"] == 9.5e-4 and b.phases[0][0] == 5


@pytest.mark.parametrize("phases,trainable", [
    ([[5, False], [20, True], [5, False]], [False] * 5 + [True] * 20 + [False] * 5 + [False, False]),
    ([[0, False], [2, True], [1, False]], [True, True, False, False]),  # a phase of 0 epochs is skipped
    ([[1, True], [1, False], [1, True]], [True, False, True, True]),  # after the last phase: as the last phase
    ([[3, True]], [True, True, True, True]),
])
def test_encoder_trainable_follows_the_phases_and_epochs_is_their_sum(phases, trainable):
    c = TrainConfig(phases=phases)
    assert c.epochs == sum(n for n, _ in phases)
    assert [c.encoder_trainable(e) for e in range(len(trainable))] == trainable


def test_grad_method_and_the_resolved_sts_loss():
    assert TrainConfig(pcgrad=True).grad_method == "pcgrad" and TrainConfig().grad_method == "sum"
    assert TrainConfig(sts_head="linear").resolved_sts_loss() == "mse"
    assert TrainConfig().resolved_sts_loss() == "cosine_embedding"
    assert TrainConfig(sts_loss="sbert_mse").resolved_sts_loss() == "sbert_mse"
    assert TrainConfig(sts_head="linear", sts_loss="mse").resolved_sts_loss() == "mse"


def test_the_run_name_is_prefix_fingerprint_seed():
    c = TrainConfig(seed=3)
    assert re.fullmatch(r"rr_over-[0-9a-f]{8}-seed3", c.run_name)
    assert TrainConfig(name="tuned", seed=3).run_name == f"tuned-{c.fingerprint()}-seed3"
    assert c.named("zero-shot") == f"zero-shot-{c.fingerprint()}-seed3"
    assert TrainConfig(schedule="sequential").run_name.startswith("sequential-")
    assert TrainConfig().to_dict() == {f: getattr(TrainConfig(), f) for f in TrainConfig.__dataclass_fields__}


def test_the_fingerprint_is_a_hash_of_the_fields_that_change_the_numbers():
    base = TrainConfig().fingerprint()
    # pinned: a change to how the hash is made renames every run and orphans every committed result (their names
    # are checked against the plans in tests/test_plans.py, with the data; this needs none)
    assert base == "f7314be9" and TrainConfig.baseline().fingerprint() == "4a2cfbc0"
    assert base == TrainConfig(seed=7, name="x", out_dir="elsewhere", progress=False, data_dir="d",
                               write_predictions=True, pad_to_multiple=16, tf32=True, fuse_tasks=True).fingerprint()
    assert TrainConfig(cuda_graphs=True, pad_to_multiple=8).fingerprint() == base
    changed = [dict(dropout=0.1), dict(batch_size=32), dict(schedule="sequential"), dict(pcgrad=True),
               dict(lr_decay=0.5), dict(max_train=100), dict(sts_head="linear"), dict(encoder="tiny"),
               # added later: out of the hash at their default, in it otherwise
               dict(val_fraction=0.1), dict(optimizer="fused"), dict(encoder_dropout=0.0), dict(para_swap=True),
               dict(layer_lr_decay=0.9), dict(cache_frozen_encoder=True), dict(snapshot_ensemble=2, val_fraction=0.1)]
    prints = [TrainConfig(**kw).fingerprint() for kw in changed]
    assert base not in prints and len(set(prints)) == len(prints)


def test_a_value_json_cannot_write_still_gets_a_run_name():
    """A notebook may compute a schedule parameter with numpy (an np.int64 is not a JSON number): the fingerprint
    writes such a value as its text rather than fail."""
    import numpy as np
    c = TrainConfig(schedule_params={"sigma": np.int64(300)})
    assert re.fullmatch(r"rr_over-[0-9a-f]{8}-seed0", c.run_name) and c.fingerprint() != TrainConfig().fingerprint()


def test_unknown_keys_are_named_with_the_valid_ones():
    check_keys({"seed": 1, "encoder": "tiny"})
    with pytest.raises(ValueError) as e:
        TrainConfig.from_dict({"seed": 1, "batchsize": 8, "lrs": {}})
    names = sorted(TrainConfig.__dataclass_fields__)
    assert str(e.value) == f"unknown config keys ['batchsize', 'lrs']; valid keys: {names}"
    assert TrainConfig.from_dict({"seed": 2, "encoder": "tiny"}) == TrainConfig(seed=2, encoder="tiny")


def test_baseline_is_the_plain_setup_with_overrides():
    from mtbert_utils.presets import BASELINE
    b = TrainConfig.baseline(seed=4)
    assert b == TrainConfig(**{**BASELINE, "seed": 4}) and b != TrainConfig(seed=4)


# values at the edge of what each check takes
@pytest.mark.parametrize("fields", [
    dict(dropout=0.0), dict(dropout=0), dict(encoder_dropout=0.0), dict(encoder_dropout=0.99),
    dict(pooling="cls"), dict(pooling=None), dict(sts_loss="mse"), dict(sts_head="linear", sts_loss="mse"),
    dict(sts_threshold=-1), dict(sts_margin=0.5), dict(attn_implementation="eager"), dict(encoder="some/hf-id"),
    dict(batch_size=1), dict(eval_batch_size=1), dict(max_length=1), dict(max_train=1), dict(max_dev=None),
    dict(max_train={"sst": 1, "para": None}), dict(max_dev={}), dict(val_fraction=0.0), dict(val_fraction=0.5),
    dict(pad_to_multiple=1), dict(pad_to_multiple=None), dict(schedule_params={"sigma": 3}),
    dict(train_tasks=("sts",)), dict(train_tasks=["sts", "sst"]), dict(task_weights={"sst": 0, "para": 0.5, "sts": 2}),
    dict(phases=[[0, False], [1, True]]), dict(phases=((1, True),)), dict(examples_budget=1),
    dict(examples_budget=None),
    dict(lr={"encoder": 1, "shared": 1e-9, "sst": 2, "para": 3, "sts": 4}), dict(lr_decay=1.0), dict(lr_decay=1e-9),
    dict(layer_lr_decay=1), dict(lr_decay_epochs=[]), dict(lr_decay_epochs=(0, 3)), dict(weight_decay=0),
    dict(max_grad_norm=None), dict(max_grad_norm=1e-9), dict(pcgrad_reduction="sum"), dict(precision="bf16"),
    dict(optimizer="forloop"), dict(cuda_graphs=True, pad_to_multiple=16), dict(device="cuda"),
    dict(cuda_graphs=True, pad_to_multiple=8, device="auto"), dict(seed=0), dict(name="x"), dict(out_dir=Path("o")),
    dict(data_dir=Path("d")), dict(data_dir="d"), dict(snapshot_ensemble=0),
    dict(snapshot_ensemble=1, val_fraction=0.1),
    dict(schedule="sequential", train_tasks=["sts", "sst"], schedule_params={"order": ["sts", "sst"]}),
    dict(schedule="annealed", schedule_params={"epochs": 1}), dict(schedule="temperature", schedule_params={"T": 1e-9}),
    dict(schedule="adaptive", schedule_params={"reference": {"sst": 0.5, "para": 0.8, "sts": 0.7}}),
    dict(precision="fp16", device="cuda"), dict(precision="fp16", device="auto"),
])
def test_values_at_the_edge_are_taken(fields):
    c = TrainConfig(**fields)
    assert all(getattr(c, k) == v for k, v in fields.items())


# a value just past each edge, and the whole message it gets: the field, what it must be, and the value
@pytest.mark.parametrize("fields,message", [
    (dict(encoder=""), "encoder must be one of ('minilm', 'tiny'), a HF id or a path, got ''"),
    (dict(dropout=1.0), "dropout must be in [0, 1), got 1.0"),
    (dict(dropout=-0.1), "dropout must be in [0, 1), got -0.1"),
    (dict(encoder_dropout=1), "encoder_dropout must be None or in [0, 1), got 1"),
    (dict(pooling="max"), "unknown pooling 'max'; choose one of ['cls', 'mean', 'pooler'] or None"),
    (dict(para_input=None), "unknown para_input None; choose one of ['joint', 'sbert', 'separate']"),
    (dict(sts_head="Cosine"), "unknown sts_head 'Cosine'; choose one of ['cosine', 'linear']"),
    (dict(sts_loss="hinge"),
     "unknown sts_loss 'hinge'; choose one of ['cosine_embedding', 'mse', 'sbert_mse'] or None"),
    (dict(sts_threshold=math.inf), "sts_threshold must be a number, got inf"),
    (dict(sts_margin=True), "sts_margin must be a number, got True"),
    (dict(attn_implementation=None), "attn_implementation must be a name such as 'sdpa' or 'eager', got None"),
    (dict(sts_head="linear", sts_loss="cosine_embedding"), "the linear STS head is trained with sts_loss='mse'"),
    (dict(batch_size=0), "batch_size must be an int >= 1, got 0"),
    (dict(eval_batch_size=True), "eval_batch_size must be an int >= 1, got True"),
    (dict(max_length=64.0), "max_length must be an int >= 1, got 64.0"),
    (dict(max_train=0), "max_train must be None, a positive int, or a dict task -> positive int; got 0"),
    (dict(max_dev={"quora": 5}),
     "max_dev must be None, a positive int, or a dict task -> positive int; got {'quora': 5}"),
    (dict(max_dev={"sst": 0}), "max_dev must be None, a positive int, or a dict task -> positive int; got {'sst': 0}"),
    (dict(val_fraction=1), "val_fraction must be in [0, 1), got 1"),
    (dict(pad_to_multiple=0), "pad_to_multiple must be None or an int >= 1, got 0"),
    (dict(schedule="rr"), "unknown schedule 'rr'; choose one of " + str(sorted(cfg.SCHEDULES))),
    (dict(schedule_params=None), "schedule_params must be a dict of the schedule's parameters, got None"),
    (dict(train_tasks=[]),
     "train_tasks must be a non-empty list of distinct tasks from ('sst', 'para', 'sts'), got []"),
    (dict(train_tasks=["sst", "sst"]),
     "train_tasks must be a non-empty list of distinct tasks from ('sst', 'para', 'sts'), got ['sst', 'sst']"),
    (dict(train_tasks=["quora"]),
     "train_tasks must be a non-empty list of distinct tasks from ('sst', 'para', 'sts'), got ['quora']"),
    (dict(task_weights={"sst": 1, "para": 1}),
     "task_weights needs a dict with the keys ('sst', 'para', 'sts'), got {'sst': 1, 'para': 1}"),
    (dict(task_weights={"sst": 1, "para": -0.5, "sts": 1}), "task_weights['para'] must be a number >= 0, got -0.5"),
    (dict(phases=[[0, True]]), "phases must be a list of [epochs, encoder_trainable] with >= 1 epoch in all, "
                               "got [[0, True]]"),
    (dict(phases=[[2, True, 1]]), "phases must be a list of [epochs, encoder_trainable] with >= 1 epoch in all, "
                                  "got [[2, True, 1]]"),
    (dict(phases=[[-1, True], [3, True]]), "phases must be a list of [epochs, encoder_trainable] with >= 1 epoch "
                                           "in all, got [[-1, True], [3, True]]"),
    (dict(phases=[[2, 1]]),
     "phases must be a list of [epochs, encoder_trainable] with >= 1 epoch in all, got [[2, 1]]"),
    (dict(examples_budget=0), "examples_budget must be None or an int >= 1, got 0"),
    (dict(lr={"encoder": 1e-5, "shared": 1e-4, "sst": 1e-4, "para": 1e-4}),
     "lr needs exactly the keys ('encoder', 'shared', 'sst', 'para', 'sts') (a dict of learning rates), "
     "got {'encoder': 1e-05, 'shared': 0.0001, 'sst': 0.0001, 'para': 0.0001}"),
    (dict(lr={"encoder": 1e-5, "shared": 1e-4, "sst": 1e-4, "para": 1e-4, "sts": math.inf}),
     "lr['sts'] must be a positive number, got inf"),
    (dict(lr={"encoder": 0, "shared": 1e-4, "sst": 1e-4, "para": 1e-4, "sts": 1e-4}),
     "lr['encoder'] must be a positive number, got 0"),
    (dict(lr_decay=0), "lr_decay must be in (0, 1], got 0"),
    (dict(lr_decay=1.5), "lr_decay must be in (0, 1], got 1.5"),
    (dict(layer_lr_decay=1.01), "layer_lr_decay must be in (0, 1], got 1.01"),
    (dict(layer_lr_decay=True), "layer_lr_decay must be in (0, 1], got True"),
    (dict(lr_decay_epochs=[5, -1]), "lr_decay_epochs must be a list of epoch numbers (ints >= 0), got [5, -1]"),
    (dict(lr_decay_epochs="5"), "lr_decay_epochs must be a list of epoch numbers (ints >= 0), got '5'"),
    (dict(weight_decay=-1e-9), "weight_decay must be a number >= 0, got -1e-09"),
    (dict(max_grad_norm=-1.0), "max_grad_norm must be a positive number, got -1.0"),
    (dict(pcgrad_reduction="max"), "unknown pcgrad_reduction 'max'; choose one of ['mean', 'sum']"),
    (dict(precision="fp64"), "unknown precision 'fp64'; choose one of ['auto', 'bf16', 'fp16', 'fp32']"),
    (dict(optimizer="sgd"), "unknown optimizer 'sgd'; choose one of ['auto', 'foreach', 'forloop', 'fused']"),
    (dict(cuda_graphs=True), "cuda_graphs records one graph per batch shape: set pad_to_multiple (e.g. 16) too, "
                             "else every new padded length compiles a new graph"),
    (dict(cuda_graphs=True, pad_to_multiple=16, device="cpu"),
     "cuda_graphs=True needs CUDA; device='cpu' was asked for"),
    (dict(class_weights=1), "class_weights must be True or False, got 1"),
    (dict(progress="yes"), "progress must be True or False, got 'yes'"),
    (dict(seed=-1), "seed must be an int >= 0, got -1"),
    (dict(name=""), "name must be None or a non-empty string, got ''"),
    (dict(name=3), "name must be None or a non-empty string, got 3"),
    (dict(out_dir=None), "out_dir must be a folder path, got None"),
    (dict(data_dir=1), "data_dir must be a folder path, got 1"),
    (dict(snapshot_ensemble=-1), "snapshot_ensemble must be an int >= 0, got -1"),
    (dict(snapshot_ensemble=3), "snapshot_ensemble chooses its members on validation: set val_fraction > 0"),
    (dict(device="mps"), "unknown device 'mps'; choose one of ['auto', 'cpu', 'cuda']"),
    # the schedule's own checks, before any data is read (they once failed inside train(), after loading)
    (dict(schedule="annealed"), "schedule 'annealed' with schedule_params={} and train_tasks=['sst', 'para', 'sts']: "
     "bad params for schedule 'annealed' {}: Annealed.__init__() missing 1 required positional argument: 'epochs'"),
    (dict(schedule="temperature", schedule_params={"T": 0}), "schedule 'temperature' with schedule_params={'T': 0} "
     "and train_tasks=['sst', 'para', 'sts']: T must be a positive number, got 0"),
    (dict(schedule="temperature", schedule_params={"foo": 1}), "schedule 'temperature' with schedule_params="
     "{'foo': 1} and train_tasks=['sst', 'para', 'sts']: bad params for schedule 'temperature' {'foo': 1}: "
     "Temperature.__init__() got an unexpected keyword argument 'foo'"),
    (dict(schedule="rr_over", schedule_params={"sigma": "2max"}), "schedule 'rr_over' with schedule_params="
     "{'sigma': '2max'} and train_tasks=['sst', 'para', 'sts']: sigma must be a positive int or None, got '2max'"),
    (dict(schedule="sequential", train_tasks=["sst"]), "schedule 'sequential' with schedule_params={} and "
     "train_tasks=['sst']: order ('sst', 'para', 'sts') must be a permutation of the tasks ('sst',)"),
    (dict(precision="fp16", device="cpu"),
     "precision='fp16' needs CUDA; device='cpu' was asked for (use 'bf16' or 'fp32' on CPU)"),
])
def test_values_past_the_edge_are_refused_with_their_whole_message(fields, message):
    refused(message, **fields)


def test_every_switch_is_checked_as_a_bool():
    import dataclasses
    bools = {f.name for f in dataclasses.fields(TrainConfig) if f.type == "bool"}
    assert set(cfg.BOOL_FIELDS) == bools
    for name in cfg.BOOL_FIELDS:
        refused(f"{name} must be True or False, got 0", **{name: 0})


def test_the_checks_run_again_on_validate():
    c = TrainConfig()
    c.batch_size = 0  # a field changed after construction is checked when validate() is called
    with pytest.raises(ValueError, match="^batch_size must be an int >= 1, got 0$"):
        c.validate()


@pytest.mark.parametrize("v,number,count1", [
    (1, True, True), (0, True, False), (2.5, True, False), (True, False, False), (False, False, False),
    (None, False, False), ("1", False, False), (math.nan, True, False),
])
def test_number_and_count_helpers(v, number, count1):
    assert cfg._is_number(v) is number and cfg._is_count(v, 1) is count1
    assert cfg._is_count(0, 0) and not cfg._is_count(-1, 0)
