"""Presets: every named set of TrainConfig fields, in one place, and the two functions notebooks build
configs with (`make_config`, `best_config`).

    tuned      the TrainConfig defaults (the study's tuned setup)
    BASELINE   the study's plain setup (TrainConfig.baseline())
    BEST       the `best` profile of notebook 08 (MiniLM, all local data, 2 CPU cores, <= 60 minutes)
    SWEEP_BASE the starting point of the GPU sweeps that chose BEST (benchmarks/cuda_checks.py)
    REFERENCE, SPEED  the speed benchmark's lever sets (python -m mtbert_utils.bench)

The reproduce profiles (profiles/*.json) are notebook parameters, not TrainConfig fields: they say
which preset a notebook asks for and how much data it uses.
"""

from __future__ import annotations

from mtbert_utils.config import TrainConfig

# The study's plain setup: full fine-tuning, one learning rate, linear STS head with MSE.
BASELINE = dict(phases=[[10, True]], lr={k: 5e-5 for k in ("encoder", "shared", "sst", "para", "sts")},
                lr_decay=1.0, lr_decay_epochs=[], sts_head="linear", sts_loss="mse", dropout=0.3, batch_size=64)

# Chosen on validation splits only (10% of each train split, by id hash), in two GPU sweeps of
# one-change-at-a-time variants from SWEEP_BASE (benchmarks/cuda_checks.py; results/cuda/*.json):
#   joint paraphrase input    beat [u; v] (val Quora 0.846 vs 0.756) and SBERT [u; v; |u-v|; u*v] (0.851,
#                             but lower mean); SBERT cosine-MSE STS loss beat the cosine-embedding loss
#                             (val r 0.867 vs 0.829); STS loss x10 (its MSE is ~50x smaller than the
#                             others) lifted val STS r 0.870 -> 0.891 at no cost elsewhere;
#   proportional sampling     every example once per epoch; dropout 0.1 (0.3 no better); one learning-rate
#                             set, no decay (x0.7 decay no better); frozen word embeddings: same scores,
#                             faster on CPU; 5 epochs (best_config; the first profile had 4, which fit the
#                             60-minute budget before the speed levers below bought the fifth).
BEST = dict(pooling="mean", dropout=0.1, para_input="joint", sts_head="cosine", sts_loss="sbert_mse",
            schedule="proportional", batch_size=32, lr_decay=1.0, lr_decay_epochs=[],
            lr={"encoder": 2e-5, "shared": 1e-4, "sst": 9.5e-4, "para": 1e-4, "sts": 4e-5},
            task_weights={"sst": 1.0, "para": 1.0, "sts": 10.0}, val_fraction=0.1,
            freeze_word_embeddings=True, write_predictions=True, name="best",
            # the speed levers of SPEED below (accuracy check: results/bench/bench_full.json):
            # they buy the fifth epoch within the 60 minutes
            optimizer="fused", encoder_dropout=0.0,
            # per task, the outputs of the top-k epochs on validation averaged (k <= 3, chosen on validation)
            snapshot_ensemble=3,
            # paraphrase pairs in both orders in training, both orders averaged at inference
            # (chosen on validation: benchmarks/best_ablation.py, results/best/ablation.json)
            para_swap=True)

# the `best` candidates of the GPU sweeps: one change at a time from this
SWEEP_BASE = dict(pooling="mean", dropout=0.1, para_input="joint", sts_head="cosine", sts_loss="sbert_mse",
                  schedule="proportional", batch_size=32, phases=[[6, True]], lr_decay=1.0, lr_decay_epochs=[],
                  lr={"encoder": 2e-5, "shared": 1e-4, "sst": 9.5e-4, "para": 1e-4, "sts": 4e-5},
                  val_fraction=0.1, max_train=None, max_dev=None, precision="fp32")

# The plain repo config every speed lever is measured against (one change at a time) ...
REFERENCE = dict(group_by_length=False, precision="fp32", freeze_word_embeddings=False,
                 attn_implementation="sdpa", compile=False, optimizer="foreach", encoder_dropout=None)
# ... and the speed config: the levers that measured faster on 2 CPU cores and held dev accuracy
# (SST dev after 120 steps, 2 seeds; results/bench/bench_full.json: reference 0.427,
# these levers without/with encoder dropout off 0.431/0.433).
# No bf16: that CPU has no native bf16 matmul (see matmul_peak_gflops_bf16 in the bench output).
SPEED = dict(REFERENCE, group_by_length=True, freeze_word_embeddings=True, optimizer="fused", encoder_dropout=0.0)

PRESETS = {"tuned": {}, "baseline": BASELINE}


def make_config(preset: str = "tuned", *, encoder: str = "minilm", data_dir: str = "", max_train: dict | None = None,
                max_dev: int = 0, batch_size: int = 64, progress: bool = True, **overrides) -> TrainConfig:
    """The TrainConfig a notebook (or the benchmark) asks for, from its parameters.

    preset: "baseline" (the study's plain setup) or "tuned" (its tuned setup, the TrainConfig defaults).
    Notebook conventions: data_dir "" = $MTBERT_DATA_DIR or ./data; max_train {} or a missing task = all
    training examples; max_dev 0 = the whole dev set.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose 'baseline' or 'tuned'")
    max_train = dict(max_train) if isinstance(max_train, dict) else max_train  # an int: every task
    common = dict(encoder=encoder, data_dir=data_dir or None, max_train=max_train or None,
                  max_dev=max_dev or None, batch_size=batch_size, progress=progress, **overrides)
    return TrainConfig(**{**PRESETS[preset], **common})


def best_config(*, encoder: str = "minilm", data_dir: str = "", epochs: int = 5, progress: bool = True,
                **overrides) -> TrainConfig:
    """The `best` profile's TrainConfig: all training data, model selection on a validation split."""
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:  # True is an int to Python
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    return TrainConfig(**{**BEST, "encoder": encoder, "data_dir": data_dir or None, "phases": [[epochs, True]],
                          "progress": progress, **overrides})
