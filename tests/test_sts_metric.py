"""The STS metric on the whole evaluation path, with outputs a tiny encoder never produces (negative cosines)."""

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr
from torch import nn

from mtbert_utils.batching import EncodedTask
from mtbert_utils.evaluation import ensemble_prediction, evaluate, select_members
from mtbert_utils.tasks import TASK_SPECS, pearson, predictions_from_outputs

# cosines spread over [-1, 1], a third of them negative; gold scores that follow them loosely
COS = np.array([-0.9, -0.6, -0.35, -0.1, 0.05, 0.2, 0.4, 0.55, 0.7, 0.95])
GOLD = np.array([0.0, 1.2, 0.4, 1.0, 2.0, 1.8, 3.1, 2.6, 4.4, 4.9])
# float32 cosines, then Pearson in float64 over 10 values: float32 rounding of the inputs dominates
TOL = 16 * float(np.finfo(np.float32).eps)


class FixedOutputs(nn.Module):
    """Stands in for MultitaskBert: the cosine head's raw outputs are COS, whatever the batch."""

    sts_head_kind = "cosine"

    def __init__(self, raw):
        super().__init__()
        self.raw = torch.as_tensor(raw, dtype=torch.float32)

    def pair_mode(self, task):
        return "joint"

    def forward_task(self, task, batch):
        return self.raw[batch["index"]]


def _sts_examples(n):
    # token ids of different lengths, so the evaluator's length sort really reorders the examples
    joint = [[101] + [7] * (1 + (5 * i) % n) + [102] for i in range(n)]
    return EncodedTask("sts", ids=[f"id{i}" for i in range(n)], labels=torch.tensor(GOLD, dtype=torch.float),
                       joint=joint, joint_types=[[0] * len(j) for j in joint], a=joint, b=joint)


def test_sts_pearson_uses_the_unclamped_cosine():
    """Invariant: dev STS r is Pearson's r of the raw cosines (times 5) and the gold scores, negatives kept.

    Kills: predictions clamped to [0, 5] (or cosines to [0, 1]) before the metric, anywhere on the
    path predict -> predictions_from_outputs -> score -> pearson.
    """
    expected = pearsonr(COS, GOLD)[0]
    clamped = pearsonr(np.clip(5 * COS, 0, 5), GOLD)[0]
    assert abs(expected - clamped) > 100 * TOL  # the data can tell the two apart
    metrics = evaluate(FixedOutputs(COS), {"sts": _sts_examples(len(COS))}, batch_size=4)
    assert metrics["sts"] == pytest.approx(expected, abs=TOL)
    assert pearson(predictions_from_outputs("sts", torch.tensor(COS), "cosine"), GOLD) == pytest.approx(
        expected, abs=TOL)
    assert TASK_SPECS["sts"].metric(5 * COS, GOLD) == pytest.approx(expected, abs=1e-12)


def test_sts_predictions_keep_the_cosine_sign():
    """Invariant: the cosine head's prediction is 5 * cos, linear in cos (Pearson r is scale-invariant only)."""
    pred = predictions_from_outputs("sts", torch.tensor(COS, dtype=torch.float32), "cosine")
    np.testing.assert_allclose(pred, 5 * COS, rtol=TOL, atol=0)
    lin = predictions_from_outputs("sts", torch.tensor([-1.5, 6.0]), "linear")
    assert lin.tolist() == [-1.5, 6.0]  # the linear head's raw score, unclipped (files clip, metrics don't)


def test_sts_ensembles_score_unclamped_cosines():
    """The snapshot ensemble scores members on validation through the same metric: no clamp there either."""
    members = [{"ids": list(range(10)), "raw": COS + d, "pred": None} for d in (-0.05, 0.05)]
    ens = ensemble_prediction("sts", members, "cosine")
    np.testing.assert_allclose(ens["pred"], 5 * COS, rtol=TOL, atol=TOL)
    chosen = select_members("sts", {"a": COS, "b": COS[::-1].copy()}, GOLD, "cosine")
    assert chosen["single"]["a"] == pytest.approx(pearsonr(COS, GOLD)[0], abs=TOL)
