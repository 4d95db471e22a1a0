"""Experiments the notebooks run: a config over several seeds, the zero-shot floor, and Table 1.

Each training notebook writes `{results_dir}/runs/{notebook}/index.json` listing the result files
of the runs it made, by row name; tables and figures are rebuilt from those files alone.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pandas as pd
import torch

from mtbert_utils import TASKS
from mtbert_utils.results import environment, write_json
from mtbert_utils.stats import mean_ci, paired_comparison

# The study's Table 1 (dev, bert-base-uncased, one seed each): reference values to compare against.
STUDY_TABLE1 = {
    "random sequential": {"sst": 0.304, "para": 0.670, "sts": 0.212},
    "RR undersampling": {"sst": 0.301, "para": 0.632, "sts": 0.181},
    "RR oversampling": {"sst": 0.432, "para": 0.691, "sts": 0.272},
    "RR oversampling + tuning + cosine": {"sst": 0.497, "para": 0.864, "sts": 0.387},
    "RR oversampling + tuning + cosine + PCGrad": {"sst": 0.497, "para": 0.860, "sts": 0.378},
}

# Table 1 rows: (row label, notebook that makes the runs, run name in that notebook's index)
TABLE1_ROWS = [
    ("zero-shot (encoder not fine-tuned)", "04_cosine_sts", "zero-shot"),
    ("random sequential", "01_sequential", "sequential-baseline"),
    ("RR undersampling", "02_rr_undersampling", "rr_under-baseline"),
    ("RR oversampling", "03_rr_oversampling", "rr_over-baseline"),
    ("RR oversampling + tuning + cosine", "04_cosine_sts", "rr_over-tuned-cosine"),
    ("RR oversampling + tuning + cosine + PCGrad", "05_pcgrad_ablation", "rr_over-tuned-cosine-pcgrad"),
]


def run_seeds(config, seeds, out_dir: str | Path, resume: bool = True) -> list[dict]:
    """Train `config` once per seed into `out_dir`; finished runs are reused (resume=True)."""
    from mtbert_utils.training import train
    results = []
    for seed in seeds:
        cfg = dataclasses.replace(config, seed=int(seed), out_dir=str(out_dir))
        results.append(train(cfg, resume=resume))
    return results


def zero_shot(config, out_dir: str | Path) -> dict:
    """Dev metrics of the encoder with untrained heads: the floor under every fine-tuned row."""
    from mtbert_utils.evaluation import evaluate
    from mtbert_utils.model import default_pooling, load_tokenizer
    from mtbert_utils.training import build_model, pick_amp, pick_device, prepare_data
    t0 = time.time()
    device = pick_device(config)
    amp_dtype, _ = pick_amp(config, device)
    enc, info = prepare_data(config, load_tokenizer(config.encoder))
    model = build_model(config).to(device)
    dev = evaluate(model, enc["dev"], config.eval_batch_size, device, amp_dtype)
    result = {"status": "finished", "run_name": f"zero-shot-{config.fingerprint()}-seed{config.seed}",
              "config": config.to_dict(), "fingerprint": config.fingerprint(), "seed": config.seed,
              "encoder": {"name": config.encoder, "pooling": config.pooling or default_pooling(config.encoder)},
              "device": str(device), "data": info, "history": [], "dev": dev, "steps": 0,
              "train_time_s": 0.0, "wall_time_s": time.time() - t0, "environment": environment()}
    path = Path(out_dir) / f"{result['run_name']}.json"
    write_json(path, result)
    result["result_path"] = str(path)
    return result


def write_index(results_dir: str | Path, notebook: str, runs: dict[str, list[dict]]) -> Path:
    """Record which result files this notebook produced, by row name (paths relative to results_dir)."""
    results_dir = Path(results_dir)
    index = {name: [str(Path(r["result_path"]).resolve().relative_to(results_dir.resolve())) for r in rs]
             for name, rs in runs.items()}
    return write_json(results_dir / "runs" / notebook / "index.json", {"notebook": notebook, "runs": index})


def load_index(results_dir: str | Path, notebook: str) -> dict[str, list[dict]]:
    """Row name -> list of run results (read back from their JSON files)."""
    results_dir = Path(results_dir)
    path = results_dir / "runs" / notebook / "index.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run notebooks/{notebook}.ipynb first")
    index = json.loads(path.read_text())
    return {name: [json.loads((results_dir / p).read_text()) for p in paths] for name, paths in index["runs"].items()}


def summarize(runs_by_row: dict[str, list[dict]]) -> pd.DataFrame:
    """One row per configuration: mean and 95% CI over seeds of each task metric and the two summaries."""
    rows = []
    for label, runs in runs_by_row.items():
        row = {"row": label, "seeds": len(runs)}
        for key in (*TASKS, "mean", "overall"):
            m, ci = mean_ci([r["dev"][key] for r in runs])
            row[f"{key}_mean"], row[f"{key}_ci95"] = m, ci
        row["train_time_s"] = sum(r.get("train_time_s", 0.0) for r in runs) / len(runs)
        row["examples_seen"] = sum(sum(r.get("examples_seen", {}).values()) for r in runs) / len(runs)
        rows.append(row)
    return pd.DataFrame(rows)


def table1(results_dir: str | Path) -> tuple[pd.DataFrame, dict[str, list[dict]]]:
    """Table 1 from the result files only, with the study's numbers beside ours."""
    runs_by_row, indexes = {}, {}
    for label, notebook, name in TABLE1_ROWS:
        if notebook not in indexes:
            indexes[notebook] = load_index(results_dir, notebook)
        if name not in indexes[notebook]:
            raise KeyError(f"{notebook} index has no runs named {name!r}; it has {sorted(indexes[notebook])}")
        runs_by_row[label] = indexes[notebook][name]
    table = summarize(runs_by_row)
    for task in TASKS:
        table[f"study_{task}"] = [STUDY_TABLE1.get(r, {}).get(task) for r in table["row"]]
    return table, runs_by_row


def format_cell(mean: float, ci: float) -> str:
    return f"{mean:.3f}" if ci != ci else f"{mean:.3f} ± {ci:.3f}"  # ci != ci: nan for a single seed


def table_markdown(table: pd.DataFrame) -> str:
    """Markdown: ours as mean ± 95% CI half-width over seeds, the study's value in brackets."""
    head = "| configuration | seeds | SST acc | Quora acc | STS r | mean |\n|---|---|---|---|---|---|\n"
    lines = []
    for _, r in table.iterrows():
        cells = []
        for task in TASKS:
            s = format_cell(r[f"{task}_mean"], r[f"{task}_ci95"])
            study = r.get(f"study_{task}")
            cells.append(s + (f" ({study:.3f})" if study is not None and study == study else ""))
        lines.append(f"| {r['row']} | {r['seeds']} | " + " | ".join(cells)
                     + f" | {format_cell(r['mean_mean'], r['mean_ci95'])} |")
    return head + "\n".join(lines) + "\n"


def paired_table(runs_by_row: dict[str, list[dict]], claims: list[tuple[str, str]]) -> pd.DataFrame:
    """Paired (same seeds) comparisons a - b per task for each claimed ordering (a, b)."""
    rows = []
    for a, b in claims:
        ra = {r["seed"]: r for r in runs_by_row[a]}
        rb = {r["seed"]: r for r in runs_by_row[b]}
        seeds = sorted(set(ra) & set(rb))
        if len(seeds) < 2:
            continue
        for key in (*TASKS, "mean"):
            c = paired_comparison([ra[s]["dev"][key] for s in seeds], [rb[s]["dev"][key] for s in seeds])
            rows.append({"a": a, "b": b, "metric": key, **c})
    return pd.DataFrame(rows)


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def make_config(preset: str = "tuned", *, encoder: str = "minilm", data_dir: str = "", max_train: dict | None = None,
                max_dev: int = 0, batch_size: int = 64, progress: bool = True, **overrides):
    """The TrainConfig a notebook asks for, from its parameters.

    preset: "baseline" (the study's plain setup) or "tuned" (its tuned setup, the TrainConfig defaults).
    Notebook conventions: data_dir "" = $MTBERT_DATA_DIR or ./data; max_train {} or a missing task = all
    training examples; max_dev 0 = the whole dev set.
    """
    from mtbert_utils.training import TrainConfig
    if preset not in ("baseline", "tuned"):
        raise ValueError(f"unknown preset {preset!r}; choose 'baseline' or 'tuned'")
    common = dict(encoder=encoder, data_dir=data_dir or None, max_train=dict(max_train) if max_train else None,
                  max_dev=max_dev or None, batch_size=batch_size, progress=progress, **overrides)
    return TrainConfig.baseline(**common) if preset == "baseline" else TrainConfig(**common)
