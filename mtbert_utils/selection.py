"""Model selection: which weights a run reports. Without a validation split, its last epoch; with one
(config.val_fraction), the best epoch on validation, or per task an ensemble of the best epochs
(config.snapshot_ensemble). Dev is scored once, at the end, with what was chosen."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mtbert_utils import TASKS, distributed
from mtbert_utils.checkpoint import load_model_state
from mtbert_utils.config import TrainConfig
from mtbert_utils.evaluation import add_summary_metrics, ensemble_prediction, evaluate_run, score, select_members


def final_model(run, state) -> tuple[dict, dict | None, dict]:
    """The model the run reports: its last epoch; with a validation split the best epoch on it, or per task
    an ensemble of epochs (snapshot_ensemble). Returns (dev scores, the selection record or None, the dev
    and test predictions already made, by split)."""
    config, model, main = run.config, state.model, run.main
    if not run.select:
        return state.history[-1]["dev"], None, {"dev": None, "test": None}
    dev_eval = test_eval = ensemble = None
    if config.snapshot_ensemble:  # per task, an ensemble of epochs chosen on validation
        if main:
            ensemble, dev_eval, test_eval = snapshot_ensemble(model, run.enc, state.snapshot_val,
                                                              run.ckpt_path.parent, config, run.device,
                                                              run.amp_dtype)
    else:  # the best epoch on validation, scored on dev once (predictions kept for the files)
        if main:
            load_model_state(model, state.best["model"], run.ckpt_path)
            dev_eval = evaluate_run(model, run.enc["dev"], config, run.device, run.amp_dtype)
        distributed.broadcast_module_(model)
    final_dev = distributed.broadcast_object(dev_eval["metrics"] if main else None)
    best = state.best["epoch"]
    selection = {"split": "val", "metric": "mean", "epoch": best, "val": state.history[best - 1]["val"],
                 "val_fraction": config.val_fraction, **({"snapshot_ensemble": ensemble} if ensemble is not None else {})}
    return final_dev, selection, {"dev": dev_eval, "test": test_eval}


def snapshot_ensemble(model, enc: dict, snap_val: dict, snap_dir: Path, config: TrainConfig, device,
                      amp_dtype=None) -> tuple[dict, dict, dict]:
    """The end of a run with config.snapshot_ensemble: per task, choose epochs on validation
    (evaluation.select_members), then predict dev and test with each chosen epoch's weights and
    average. Returns (what was chosen, with each member's own dev scores; dev {"metrics",
    "predictions"}; test {"predictions"} or None)."""
    tasks = [t for t in TASKS if t in enc["val"]]
    chosen = {t: select_members(t, {e: np.asarray(snap_val[e][t]) for e in sorted(snap_val)},
                                enc["val"][t].labels.numpy(), model.sts_head_kind, config.snapshot_ensemble)
              for t in tasks}
    epochs = sorted({e for c in chosen.values() for e in c["members"]})
    preds = {"dev": {}, "test": {}}
    for e in epochs:
        path = snap_dir / f"epoch{e}.pt"
        load_model_state(model, torch.load(path, map_location="cpu", weights_only=True), path)
        for split in preds:
            need = {t: enc[split][t] for t in tasks if t in enc[split] and e in chosen[t]["members"]}
            if need:
                preds[split][e] = evaluate_run(model, need, config, device, amp_dtype)["predictions"]
    out = {}
    for split in preds:
        out[split] = {t: ensemble_prediction(t, [preds[split][e][t] for e in chosen[t]["members"]],
                                             model.sts_head_kind)
                      for t in tasks if t in enc[split]}
    metrics = add_summary_metrics({t: score(t, p["pred"], enc["dev"][t]) for t, p in out["dev"].items()})
    info = {t: {"epochs": c["members"], "val": c["val"], "val_by_k": c["val_by_k"],
                "val_single": {str(e): v for e, v in c["single"].items()},
                "dev_single": {str(e): score(t, preds["dev"][e][t]["pred"], enc["dev"][t]) for e in c["members"]}}
            for t, c in chosen.items()}
    return info, {"metrics": metrics, "predictions": out["dev"]}, ({"predictions": out["test"]} if out["test"] else None)
