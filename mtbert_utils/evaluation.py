"""Evaluation: predictions over a split, the metrics of the study, CS224N prediction files."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mtbert_utils.data import EncodedTask, eval_batches
from mtbert_utils.results import write_text
from mtbert_utils.tasks import TASK_SPECS, cs224n_overall, predictions_from_outputs, study_mean


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def autocast_context(device: torch.device | str, dtype: torch.dtype | None):
    """torch.autocast for bf16/fp16, or nothing for fp32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


@torch.no_grad()
def predict(model, enc: EncodedTask, batch_size: int = 128, device="cpu", amp_dtype=None,
            sort_by_length: bool = True) -> dict:
    """Run one task's examples through the model. Returns ids, raw outputs and predictions, in file order."""
    was_training = model.training
    model.eval()
    task = enc.task
    if sort_by_length and model.pair_mode(task) == "separate":
        # embed every sentence on its own, sorted by its own length (the two sides of a pair
        # often differ a lot in length, so padding them together wastes compute), then the head
        n = len(enc)
        emb = _embed_sentences(model, enc.a + enc.b, enc.pad_id, batch_size, device, amp_dtype)
        with autocast_context(device, amp_dtype):
            raw = model.pair_output(task, emb[:n], emb[n:]).float().cpu()
    else:
        outs, index = [], []
        for batch in eval_batches(enc, batch_size, pair_mode=model.pair_mode(task), sort_by_length=sort_by_length):
            index.append(batch["index"])
            with autocast_context(device, amp_dtype):
                outs.append(model.forward_task(task, to_device(batch, device)).float().cpu())
        raw = torch.cat(outs)[torch.cat(index).argsort()]  # back to file order
    model.train(was_training)
    preds = predictions_from_outputs(task, raw, model.sts_head_kind)
    gold = enc.labels.numpy() if enc.labels is not None else None
    return {"ids": list(enc.ids), "raw": raw.numpy(), "pred": preds, "gold": gold}


def _embed_sentences(model, seqs: list, pad_id: int, batch_size: int, device, amp_dtype) -> torch.Tensor:
    """Pooled embeddings of tokenized single sentences, in length-sorted batches; returned in input order."""
    single = EncodedTask("sentences", ids=list(range(len(seqs))), labels=None, single=seqs, pad_id=pad_id)
    embs, index = [], []
    for batch in eval_batches(single, batch_size):
        index.append(batch["index"])
        b = to_device(batch, device)
        with autocast_context(device, amp_dtype):
            embs.append(model.embed(b["input_ids"], b["attention_mask"]))
    return torch.cat(embs)[torch.cat(index).argsort().to(embs[0].device)]


def score(task: str, pred: np.ndarray, enc: EncodedTask) -> float:
    return TASK_SPECS[task].metric(pred, enc.labels.numpy())


def evaluate(model, encoded: dict[str, EncodedTask], batch_size: int = 128, device="cpu",
             amp_dtype=None, return_predictions: bool = False) -> dict:
    """Dev metrics for every task, plus the study's mean and the CS224N overall score."""
    metrics, predictions = {}, {}
    for task, enc in encoded.items():
        p = predict(model, enc, batch_size, device, amp_dtype)
        predictions[task] = p
        if enc.labels is not None:
            metrics[task] = score(task, p["pred"], enc)
    if all(t in metrics for t in ("sst", "para", "sts")):
        metrics["mean"] = study_mean(metrics)
        metrics["overall"] = cs224n_overall(metrics)
    return {"metrics": metrics, "predictions": predictions} if return_predictions else metrics


def write_predictions(predictions: dict, folder: str | Path, split: str) -> list[Path]:
    """CS224N submission format: `{task}-{split}-output.csv` with the starter code's headers."""
    names = {"sst": "sst", "para": "para", "sts": "sts"}
    paths = []
    for task, p in predictions.items():
        pred = p["pred"]
        if task == "sts":
            pred = np.clip(pred, 0.0, 5.0)
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
