"""Evaluation: predictions over a split, the metrics of the study, CS224N prediction files."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mtbert_utils.batching import EncodedTask, eval_batches
from mtbert_utils.results import write_text
from mtbert_utils.tasks import TASK_SPECS, cs224n_overall, predictions_from_outputs, study_mean


def to_device(batch: dict, device) -> dict:
    """The batch's tensors on `device`. To CUDA they go through pinned memory: a copy from pageable memory makes
    the host wait for every kernel already queued, and the GPU then waits for the host."""
    pin = torch.device(device).type == "cuda"
    return {k: ((v.pin_memory() if pin and v.device.type == "cpu" else v).to(device, non_blocking=True)
                if torch.is_tensor(v) else v) for k, v in batch.items()}


def autocast_context(device: torch.device | str, dtype: torch.dtype | None):
    """torch.autocast for bf16/fp16, or nothing for fp32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


@torch.no_grad()
def predict(model, enc: EncodedTask, batch_size: int = 128, device="cpu", amp_dtype=None,
            sort_by_length: bool = True, symmetric: bool = False, pad_to_multiple: int | None = None) -> dict:
    """Run one task's examples through the model. Returns ids, raw outputs and predictions, in file order.

    symmetric=True: a pair fed jointly ([CLS] a [SEP] b [SEP]) is also fed as (b, a) and the two raw
    outputs are averaged (paraphrase is symmetric; the joint encoder is not). Other tasks are unchanged.
    Runs on `device` (the model's) under autocast to amp_dtype; pad_to_multiple as in batching.collate.
    """
    if len(enc) == 0:
        raise ValueError(f"predict: task {enc.task!r} has no examples")
    was_training = model.training
    model.eval()
    task = enc.task
    if sort_by_length and model.pair_mode(task) == "separate":
        # embed every sentence on its own, sorted by its own length (the two sides of a pair
        # often differ a lot in length, so padding them together wastes compute), then the head
        n = len(enc)
        emb = _embed_sentences(model, enc.a + enc.b, enc.pad_id, batch_size, device, amp_dtype, pad_to_multiple)
        with autocast_context(device, amp_dtype):
            raw = model.pair_output(task, emb[:n], emb[n:]).float().cpu()
    else:
        orders = (False, True) if symmetric and enc.single is None and model.pair_mode(task) == "joint" else (False,)
        raws = []
        for swap in orders:
            outs, index = [], []
            for batch in eval_batches(enc, batch_size, pair_mode=model.pair_mode(task),
                                      sort_by_length=sort_by_length, swap=swap, pad_to_multiple=pad_to_multiple):
                index.append(batch["index"])
                with autocast_context(device, amp_dtype):
                    outs.append(model.forward_task(task, to_device(batch, device)).float())
            # one copy to the host at the end: the GPU never waits for the host between batches
            raws.append(torch.cat(outs).cpu()[torch.cat(index).argsort()])  # back to file order
        raw = torch.stack(raws).mean(0)
    model.train(was_training)
    preds = predictions_from_outputs(task, raw, model.sts_head_kind)
    gold = enc.labels.numpy() if enc.labels is not None else None
    return {"ids": list(enc.ids), "raw": raw.numpy(), "pred": preds, "gold": gold}


def _embed_sentences(model, seqs: list, pad_id: int, batch_size: int, device, amp_dtype,
                     pad_to_multiple: int | None = None) -> torch.Tensor:
    """Pooled embeddings of tokenized single sentences, in length-sorted batches; returned in input order."""
    single = EncodedTask("sentences", ids=list(range(len(seqs))), labels=None, single=seqs, pad_id=pad_id)
    embs, index = [], []
    for batch in eval_batches(single, batch_size, pad_to_multiple=pad_to_multiple):
        index.append(batch["index"])
        b = to_device(batch, device)
        with autocast_context(device, amp_dtype):
            embs.append(model.embed(b["input_ids"], b["attention_mask"]))
    return torch.cat(embs)[torch.cat(index).argsort().to(embs[0].device)]


def score(task: str, pred: np.ndarray, enc: EncodedTask) -> float:
    return TASK_SPECS[task].metric(pred, enc.labels.numpy())


def evaluate(model, encoded: dict[str, EncodedTask], batch_size: int = 128, device="cpu",
             amp_dtype=None, return_predictions: bool = False, symmetric: bool = False,
             pad_to_multiple: int | None = None) -> dict:
    """Dev metrics for every task, plus the study's mean and the CS224N overall score."""
    metrics, predictions = {}, {}
    for task, enc in encoded.items():
        p = predict(model, enc, batch_size, device, amp_dtype, symmetric=symmetric, pad_to_multiple=pad_to_multiple)
        predictions[task] = p
        if enc.labels is not None:
            metrics[task] = score(task, p["pred"], enc)
    add_summary_metrics(metrics)
    return {"metrics": metrics, "predictions": predictions} if return_predictions else metrics


def evaluate_run(model, encoded: dict[str, EncodedTask], config, device, amp_dtype=None) -> dict:
    """evaluate() with a training run's settings (config.eval_batch_size, symmetric Quora pairs when
    config.para_swap, config.pad_to_multiple), predictions included: every epoch's score, the final
    prediction files and the snapshot ensemble's members all evaluate this way."""
    return evaluate(model, encoded, config.eval_batch_size, device, amp_dtype, return_predictions=True,
                    symmetric=config.para_swap, pad_to_multiple=config.pad_to_multiple)


def add_summary_metrics(metrics: dict) -> dict:
    """Add the study's mean and the CS224N overall score once all three task metrics are there."""
    if all(t in metrics for t in ("sst", "para", "sts")):
        metrics["mean"] = study_mean(metrics)
        metrics["overall"] = cs224n_overall(metrics)
    return metrics


def write_predictions(predictions: dict, folder: str | Path, split: str) -> list[Path]:
    """CS224N submission format: `{task}-{split}-output.csv` with the starter code's headers, byte for byte.

    Values are the predictions the metrics were computed on: STS scores unclipped, so the file's
    Pearson r is the reported one.
    """
    names = {"sst": "sst", "para": "para", "sts": "sts"}
    paths = []
    for task, p in predictions.items():
        pred = np.asarray(p["pred"])
        lines = [f"id \t {TASK_SPECS[task].output_header} \n"]
        lines += [f"{i} , {v} \n" for i, v in zip(p["ids"], pred.tolist())]
        paths.append(write_text(Path(folder) / f"{names[task]}-{split}-output.csv", "".join(lines)))
        # raw model outputs beside the submission file, for error analysis
        raw = np.asarray(p["raw"])
        cols = {"id": p["ids"], **({"raw": raw} if raw.ndim == 1 else {f"raw_{k}": raw[:, k] for k in range(raw.shape[1])}),
                "pred": p["pred"]}
        if p.get("gold") is not None:
            cols["gold"] = p["gold"]
        paths.append(write_text(Path(folder) / f"{names[task]}-{split}-scores.csv",
                                pd.DataFrame(cols).to_csv(index=False)))
    return paths


# ---------------------------------------------------------------------------
# ensembles: several models' (or one run's epoch snapshots') outputs averaged

def combine_outputs(task: str, raws: list) -> np.ndarray:
    """Average ensemble members' raw outputs: sst class probabilities (returned as log-probabilities),
    para probabilities (returned as a logit, so 0 stays the decision threshold), sts scores as they are."""
    if not raws:
        raise ValueError("an ensemble needs at least one member")
    x = torch.as_tensor(np.stack([np.asarray(r, dtype=np.float32) for r in raws]))
    if task == "sst":
        return torch.log(torch.softmax(x, -1).mean(0)).numpy()
    if task == "para":
        return torch.logit(torch.sigmoid(x).mean(0).clamp(1e-7, 1 - 1e-7)).numpy()
    return x.mean(0).numpy()


def ensemble_prediction(task: str, members: list[dict], sts_head: str = "cosine") -> dict:
    """One prediction dict (as predict returns) from members' predictions of the same examples."""
    ids = members[0]["ids"]
    if any(list(m["ids"]) != list(ids) for m in members[1:]):
        raise ValueError(f"{task}: ensemble members predicted different examples")
    raw = combine_outputs(task, [m["raw"] for m in members])
    return {**members[0], "raw": raw, "pred": predictions_from_outputs(task, torch.as_tensor(raw), sts_head)}


def select_members(task: str, candidates: dict, gold: np.ndarray, sts_head: str = "cosine",
                   max_members: int | None = None) -> dict:
    """Choose an ensemble on validation: rank the candidates (name -> raw outputs) by their own score,
    then keep the top k, k = 1 .. max_members, whichever k scores best (the smallest on a tie).

    Returns {"members": names, "val": the ensemble's score, "val_by_k": [score of the top k],
    "single": {name: score}}.
    """
    if not candidates:
        raise ValueError(f"{task}: no candidates to choose an ensemble from")
    metric = TASK_SPECS[task].metric
    def val_score(names):
        raw = combine_outputs(task, [candidates[n] for n in names])
        return float(metric(predictions_from_outputs(task, torch.as_tensor(raw), sts_head), gold))
    single = {n: val_score([n]) for n in candidates}
    ranked = sorted(candidates, key=lambda n: -single[n])  # stable: the earlier candidate wins a tie
    k_max = len(ranked) if max_members is None else max(1, min(max_members, len(ranked)))
    by_k = [val_score(ranked[:k]) for k in range(1, k_max + 1)]
    k = int(np.argmax(by_k)) + 1
    return {"members": ranked[:k], "val": by_k[k - 1], "val_by_k": by_k, "single": single}
