"""The three tasks declared as data: each task's loss, metric and prediction format.

A task is looked up by name ("sst", "para", "sts") in `TASK_SPECS` for its metric, title and
prediction-file header. The losses are not in the table: training.task_loss picks each task's
loss by name (the STS loss also depends on the config), as predictions_from_outputs does here.
What the data files hold (columns, valid label ranges) is declared in
`data` (COLUMNS, LABELS); the task names in the package root (TASKS).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr

# ---------------------------------------------------------------------------
# losses


def sst_loss(logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """5-way cross-entropy, optionally class-weighted (SST is imbalanced)."""
    return F.cross_entropy(logits.float(), labels, weight=class_weights)


def para_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on one logit per pair."""
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


def sts_mse_loss(pred: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Linear STS head: regress the 0-5 score directly."""
    return F.mse_loss(pred.float(), scores.float())


def sts_cosine_embedding_loss(cos: torch.Tensor, scores: torch.Tensor, threshold: float = 2.5,
                              margin: float = 0.0) -> torch.Tensor:
    """The study's cosine-embedding loss on a cosine similarity.

    A pair with gold score >= `threshold` (on 0-5) counts as similar (target +1)
    and is pulled together with 1 - cos; any other pair is dissimilar (target -1)
    and is pushed apart with max(0, cos - margin). This equals
    torch.nn.functional.cosine_embedding_loss on the two embeddings.
    """
    cos = cos.float()
    similar = scores >= threshold
    return torch.where(similar, 1 - cos, (cos - margin).clamp(min=0)).mean()


def sts_sbert_loss(cos: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Sentence-BERT's regression objective: MSE between cos and score / 5."""
    return F.mse_loss(cos.float(), scores.float() / 5.0)


STS_LOSSES: dict[str, Callable] = {
    "mse": sts_mse_loss,
    "cosine_embedding": sts_cosine_embedding_loss,
    "sbert_mse": sts_sbert_loss,
}

# ---------------------------------------------------------------------------
# metrics


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float(np.mean(np.asarray(pred) == np.asarray(gold)))


def pearson(pred: np.ndarray, gold: np.ndarray) -> float:
    """Pearson r of predictions and gold scores; 0.0 where r is undefined (fewer than two examples, or either
    side constant): a constant predictor carries no signal, and a run's mean stays a number."""
    pred, gold = np.asarray(pred, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    if len(pred) < 2 or np.std(pred) == 0 or np.std(gold) == 0:
        return 0.0  # undefined correlation: a constant predictor carries no signal
    return float(pearsonr(pred, gold)[0])


def study_mean(metrics: dict) -> float:
    """The study's summary: plain mean of SST acc, Quora acc and STS r."""
    return (metrics["sst"] + metrics["para"] + metrics["sts"]) / 3


def cs224n_overall(metrics: dict) -> float:
    """The CS224N leaderboard score: (sst + para + (r + 1) / 2) / 3."""
    return (metrics["sst"] + metrics["para"] + (metrics["sts"] + 1) / 2) / 3


# ---------------------------------------------------------------------------
# the table


@dataclass(frozen=True)
class TaskSpec:
    name: str
    title: str            # for plots and tables
    metric_name: str      # "accuracy" or "pearson"
    metric: Callable      # (pred, gold) -> float
    output_header: str    # CS224N prediction-file header column


TASK_SPECS: dict[str, TaskSpec] = {
    "sst": TaskSpec("sst", "SST sentiment", "accuracy", accuracy, "Predicted_Sentiment"),
    "para": TaskSpec("para", "Quora paraphrase", "accuracy", accuracy, "Predicted_Is_Paraphrase"),
    # sic: the CS224N starter code (evaluation.py) writes "Similiary"; graders parse that header
    "sts": TaskSpec("sts", "STS similarity", "pearson", pearson, "Predicted_Similiary"),
}


def predictions_from_outputs(task: str, out: torch.Tensor, sts_head: str = "linear") -> np.ndarray:
    """Turn raw model outputs into label-space predictions for one task.

    sst: argmax class; para: 1 if logit > 0; sts: the 0-5 score. The cosine
    head's cos is scaled by 5 (Pearson r does not change under scaling).
    Scores are never clipped: the reported Pearson r and the prediction files
    use the same unclipped values (as the CS224N starter code does).
    """
    if task not in ("sst", "para", "sts") or sts_head not in ("linear", "cosine"):
        raise ValueError(f"predictions_from_outputs: task must be sst, para or sts and sts_head linear or cosine; "
                         f"got task {task!r}, sts_head {sts_head!r}")
    out = out.detach().float().cpu()
    if task == "sst":
        return out.argmax(-1).numpy()
    if task == "para":
        return (out > 0).long().numpy()
    if sts_head == "cosine":
        return (5.0 * out).numpy()
    return out.numpy()
