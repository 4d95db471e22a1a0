"""One-change variants of the `best` profile, trained on 2 CPU cores like the profile itself.

    python benchmarks/best_ablation.py --change para_swap --data-dir ../shared/data/cs224n

Each variant is presets.best_config() with one change, trained with seed 0 into results/best/runs
(the same folder as the profile's own run, so a finished run is reused, never retrained). The summary,
results/best/ablation.json, puts every variant beside the profile's configuration with its validation
scores (what a choice between them may use) and its dev scores (reported, not used to choose).

Run it alone on the machine: the training minutes are part of what is compared.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtbert_utils import TASKS, experiments, presets, tables  # noqa: E402
from mtbert_utils.results import write_json  # noqa: E402
from mtbert_utils.config import ADDED_LATER  # noqa: E402

# name -> overrides of presets.best_config(); the summary says how each run differs from the profile as it
# is now, so a variant that has become the profile shows no difference (and is listed once, as the profile)
CHANGES = {
    "profile": {},
    "para_swap": {"para_swap": True},            # both pair orders in training, their average at inference
    "no_para_swap": {"para_swap": False},
    "encoder_dropout_0.1": {"encoder_dropout": None},  # the checkpoint's own dropout inside the encoder
    # layer-wise lr decay x0.8 per layer down from a top-layer rate of 3e-5 (the embeddings at 0.8 ** 6 of it)
    "layer_lr_decay_0.8": {"layer_lr_decay": 0.8, "lr": {**presets.BEST["lr"], "encoder": 3e-5}},
    # the first `best` profile (commit cb5a20d): 4 epochs, encoder dropout 0.1, foreach AdamW, one epoch for all
    # tasks chosen by the validation mean; its run is committed, so this reuses it
    "first_profile": {"epochs": 4, "optimizer": "auto", "encoder_dropout": None, "snapshot_ensemble": 0,
                      "para_swap": False},
}


# config keys that do not change the numbers
NOT_COMPARED = ("seed", "name", "out_dir", "data_dir", "progress", "write_predictions")


def differences(config: dict, profile: dict) -> dict:
    """The settings of `config` that differ from the profile's (as {key: value in config}). A run recorded
    before a knob existed ran with that knob's default (config.ADDED_LATER)."""
    config = {**ADDED_LATER, **config}
    return {k: v for k, v in config.items() if k not in NOT_COMPARED and profile.get(k) != v}


def summarize(name: str, run: dict, profile: dict) -> dict:
    """What a comparison of variants needs from one run: how it differs from the profile, validation
    (ensemble and top-1 epoch per task), dev, minutes."""
    ens = run["selection"].get("snapshot_ensemble")
    val = {t: ens[t]["val"] for t in TASKS} if ens else {t: run["selection"]["val"][t] for t in TASKS}
    top1 = {t: max(ens[t]["val_single"].values()) for t in TASKS} if ens else val
    return {"change": differences(run["config"], profile), "run_name": run["run_name"], "val": val, "val_mean": sum(val.values()) / 3,
            "val_top1_epoch": top1, "dev": {t: run["dev"][t] for t in TASKS},
            "ensemble_epochs": {t: ens[t]["epochs"] for t in TASKS} if ens else None,
            "selected_epoch": run["selection"]["epoch"],
            "training_minutes": tables.wall_minutes(run), "train_loop_minutes": run["train_time_s"] / 60,
            "resumes": run.get("resumes"), "train_examples_per_s": run["train_examples_per_s"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--change", action="append", choices=sorted(CHANGES), required=True,
                    help="variant(s) to train (repeat); 'profile' is the profile's own configuration")
    ap.add_argument("--data-dir", default="", help="CS224N data folder (default: $MTBERT_DATA_DIR)")
    ap.add_argument("--epochs", type=int, default=None, help="default: the best profile's")
    ap.add_argument("--encoder", default="minilm", help="default: minilm (the profile's); tiny for tests")
    ap.add_argument("--max-train", type=int, default=None, help="training examples per task (default: all)")
    ap.add_argument("--max-dev", type=int, default=None, help="dev examples per task (default: all)")
    ap.add_argument("--out", default=str(ROOT / "results" / "best"), help="results folder of the best profile")
    args = ap.parse_args(argv)
    out = Path(args.out)
    summary_path = out / "ablation.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"variants": {}}
    def config_of(name):
        kw = {**({} if args.epochs is None else {"epochs": args.epochs}), **CHANGES[name]}
        return presets.best_config(encoder=args.encoder, data_dir=args.data_dir, max_train=args.max_train,
                                       max_dev=args.max_dev, **kw)
    profile = config_of("profile")
    for name in dict.fromkeys(["profile", *args.change]):  # the profile's run first: the reference
        config = config_of(name)
        if name != "profile" and config.run_name == profile.run_name:
            print(f"{name}: this is the profile's configuration now; listed as 'profile'", flush=True)
            summary["variants"].pop(name, None)
            continue
        run = experiments.run_seeds(config, [0], out / "runs")[0]
        summary["variants"][name] = summarize(name, run, profile.to_dict())
        write_json(summary_path, summary)  # after every variant: nothing lost if a later one is interrupted
        print(name, json.dumps(summary["variants"][name]["val"]), flush=True)


if __name__ == "__main__":
    main()
