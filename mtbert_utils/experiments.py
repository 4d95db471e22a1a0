"""Experiments the notebooks run: a config over several seeds (`run_seeds`, `run_grid`) and the
zero-shot floor. Each training notebook then records its runs with `write_index`
(`{results_dir}/runs/{notebook}/index.json`, row name -> result files); tables and figures are
rebuilt from those files alone.

Notebooks import this one module. What they use besides running lives in its own home and is named
here too, so that a notebook needs one import:

    presets.py    make_config, best_config, BEST                  (the TrainConfig presets)
    budget.py     train_sizes, batches_per_epoch, epochs_for_budget, budget_epochs (examples budgets)
    schedules.py  schedule_params_for, resolve_sigma, adaptive_reference   (schedule parameters)
    results.py    write_index, load_index                         (which result files a notebook made)
    tables.py     Table 1, summaries over seeds, paired tests, the `best` profile's tables
    readings.py   the Markdown readings generated from those tables
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from mtbert_utils.budget import batches_per_epoch, budget_epochs, epochs_for_budget, train_sizes
from mtbert_utils.presets import BEST, best_config, make_config
from mtbert_utils.readings import WEAK_SURGERY, claim_sentence, pcgrad_reading, sampler_reading
from mtbert_utils.results import environment, load_index, write_index, write_json
from mtbert_utils.schedules import adaptive_reference, resolve_sigma, schedule_params_for
from mtbert_utils.stats import verdict
from mtbert_utils.tables import (BEST_REFERENCES, METRICS, STUDY_TABLE1, TABLE1_ROWS,
                                 TRAINING_MINUTES_TARGET, ablation_table, best_summary, best_verdict_markdown,
                                 ensemble_table, format_cell, frame_markdown, grad_conflicts, paired_table,
                                 position_effect, runs_frame, summarize, summarize_frame, table1, table_markdown,
                                 wall_minutes, weighting_label)

__all__ = [  # what notebooks call: run here, or named here from its own home
    "run_seeds", "run_grid", "zero_shot",
    "batches_per_epoch", "budget_epochs", "epochs_for_budget", "train_sizes", "BEST", "best_config",
    "make_config", "WEAK_SURGERY", "claim_sentence", "pcgrad_reading", "sampler_reading", "load_index",
    "write_index", "adaptive_reference", "resolve_sigma", "schedule_params_for", "verdict", "BEST_REFERENCES",
    "METRICS", "STUDY_TABLE1", "TABLE1_ROWS", "TRAINING_MINUTES_TARGET", "ablation_table", "best_summary",
    "best_verdict_markdown", "ensemble_table", "format_cell", "frame_markdown", "grad_conflicts", "paired_table",
    "position_effect", "runs_frame", "summarize", "summarize_frame", "table1", "table_markdown", "wall_minutes",
    "weighting_label",
]


def run_seeds(config, seeds, out_dir: str | Path, resume: bool = True) -> list[dict]:
    """Train `config` once per seed into `out_dir`; finished runs are reused (resume=True)."""
    from mtbert_utils.training import train
    results = []
    for seed in seeds:
        cfg = dataclasses.replace(config, seed=int(seed), out_dir=str(out_dir))
        results.append(train(cfg, resume=resume))
    return results


def run_grid(configs: dict, seeds, out_dir: str | Path, resume: bool = True) -> dict[str, list[dict]]:
    """run_seeds for several configs, seed by seed: the tokenized data is cached per seed, not per config."""
    runs = {label: [] for label in configs}
    for seed in seeds:
        for label, config in configs.items():
            runs[label] += run_seeds(config, [seed], out_dir, resume)
    return runs


def zero_shot(config, out_dir: str | Path) -> dict:
    """Dev metrics of the encoder with untrained heads: the floor under every fine-tuned row."""
    from mtbert_utils.evaluation import evaluate
    from mtbert_utils.model import load_tokenizer
    from mtbert_utils.batching import prepare_data
    from mtbert_utils.training import build_model, pick_amp, pick_device, run_record
    t0 = time.time()
    device = pick_device(config)
    amp_dtype, _ = pick_amp(config, device)
    enc, info = prepare_data(config, load_tokenizer(config.encoder))
    model = build_model(config).to(device)
    dev = evaluate(model, enc["dev"], config.eval_batch_size, device, amp_dtype)
    result = {**run_record(config, config.named("zero-shot"), device, model, info),
              "history": [], "dev": dev, "steps": 0, "train_time_s": 0.0, "wall_time_s": time.time() - t0,
              "environment": environment()}
    path = Path(out_dir) / f"{result['run_name']}.json"
    write_json(path, result)
    result["result_path"] = str(path)
    return result
