"""gradients.py: the gradient-combination registry (which method a step uses, when it takes each task's gradient
on its own) and the task-gradient cosines a run logs. PCGrad's projection itself: tests/test_pcgrad.py.

Fast: gradients.py's own mutation-test selection, with tests/test_pcgrad.py (pyproject.toml's
[tool.mtbert.mutation-selection], docs/testing.md).
"""

import math
import warnings

import pytest
import torch
from torch import nn

from mtbert_utils import gradients
from mtbert_utils.config import TrainConfig
from mtbert_utils.gradients import GRAD_METHODS, backs_summed_loss, per_task_needed, run_cosines, summarize_cosines


def test_register_adds_a_method_once(monkeypatch):
    monkeypatch.setattr(gradients, "GRAD_METHODS", dict(GRAD_METHODS))  # the real registry is left as it was

    def mine(losses, shared, **kw):
        return None
    assert gradients.register("mine")(mine) is mine and gradients.GRAD_METHODS["mine"] is mine
    with pytest.raises(ValueError) as e:
        gradients.register("sum")(mine)
    assert str(e.value) == "gradient method 'sum' registered twice"
    assert gradients.GRAD_METHODS["sum"] is GRAD_METHODS["sum"]
    assert set(GRAD_METHODS) == {"sum", "pcgrad"}


def test_when_a_step_takes_each_tasks_gradient_on_its_own():
    assert not per_task_needed({"sst": 1}, None)  # one task: nothing to compare or project
    assert per_task_needed({"sst": 1}, lambda g: g)  # data parallel: per-task averaging over processes
    assert per_task_needed({"sst": 1, "sts": 2}, None)
    assert backs_summed_loss(TrainConfig())
    assert not backs_summed_loss(TrainConfig(pcgrad=True))
    assert not backs_summed_loss(TrainConfig(record_grad_cosines=True))  # cosines need each task's gradient


@pytest.mark.parametrize("method", ["sum", "pcgrad"])
def test_one_task_is_a_plain_backward_of_its_loss_function_scaled(method):
    """A task's loss may be a function to call just before its backward; the loss scaler's scale multiplies it."""
    w = nn.Parameter(torch.zeros(2))
    config = TrainConfig(pcgrad=method == "pcgrad", record_grad_cosines=True)
    out = GRAD_METHODS[method]({"sts": lambda: w @ torch.tensor([1.0, -2.0])}, [w], config=config,
                               scaler=torch.amp.GradScaler("cpu", init_scale=8.0))
    assert out is None and torch.equal(w.grad, torch.tensor([8.0, -16.0]))  # exact: small powers of two


def test_cosine_summary_by_hand():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice" for a pair with no finite step
        out = summarize_cosines([{"sst|para": 0.0, "para|sts": math.nan}, {"sst|para": -0.1234567},
                                 {"sst|para": 0.5}])
    assert list(out) == ["para|sts", "sst|para"]  # pairs sorted
    assert out["sst|para"]["values"] == [0.0, -0.12346, 0.5]  # five decimals
    assert out["sst|para"]["conflict_rate"] == pytest.approx(1 / 3)  # a 0 cosine is no conflict
    assert out["para|sts"] == {"mean": None, "conflict_rate": None, "values": [], "non_finite_steps": 1}


def test_run_cosines_joins_every_epochs_steps_in_order():
    run = {"history": [{"grad_cosines": {"a|b": {"values": [0.1, 0.2]}}}, {"loss": 1.0},
                       {"grad_cosines": {"a|b": {"values": [0.3]}, "a|c": {"values": [-0.5]}}}]}
    assert run_cosines(run) == {"a|b": [0.1, 0.2, 0.3], "a|c": [-0.5]}
    assert run_cosines({"history": []}) == {}



def test_run_cosines_leave_heads_only_epochs_out_unless_asked():
    """Heads-only epochs measure on the shared layer alone, where the cosine STS head has no gradient: their
    sst|para steps once came first in a run's sst|para list while sst|sts started at the first full epoch."""
    run = {"history": [{"encoder_trainable": False, "grad_cosines": {"sst|para": {"values": [0.9, 0.8]}}},
                       {"encoder_trainable": True, "grad_cosines": {"sst|para": {"values": [0.1]},
                                                                    "sst|sts": {"values": [-0.2]}}},
                       {"encoder_trainable": False, "grad_cosines": {"sst|para": {"values": [0.7]}}},
                       {"grad_cosines": {"sst|para": {"values": [0.3]}, "sst|sts": {"values": [0.4]}}}]}
    assert run_cosines(run) == {"sst|para": [0.1, 0.3], "sst|sts": [-0.2, 0.4]}  # no flag: an older record
    assert run_cosines(run, heads_only_epochs=True) == {"sst|para": [0.9, 0.8, 0.1, 0.7, 0.3], "sst|sts": [-0.2, 0.4]}
