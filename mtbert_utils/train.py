"""Command line: train one run from a JSON config, on one process or under torchrun.

    python -m mtbert_utils.train --config cfg.json --set pcgrad=true --set seed=1
    python -m mtbert_utils.train --preset baseline --set encoder=tiny --set max_train=64
    torchrun --nproc_per_node 4 -m mtbert_utils.train --config cfg.json       # data parallel
    torchrun --nproc_per_node 4 -m mtbert_utils.train --config cfg.json --resume

The config file holds TrainConfig fields (missing ones keep their defaults).
The result JSON goes to `{out_dir}/{run_name}.json`; the last line printed is
{"status", "run_name", "result_path", "checkpoint", "dev"} as JSON (with "val" when
the run selects its model on a validation split).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mtbert_utils import distributed
from mtbert_utils.config import TrainConfig, check_keys
from mtbert_utils.data import check_data_dir
from mtbert_utils.model import load_tokenizer
from mtbert_utils.training import train


def parse_override(text: str) -> tuple[str, object]:
    """`key=value` with a JSON value (strings may be bare): seed=1 pcgrad=true phases=[[1,true]] encoder=tiny."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {text!r} must look like key=value")
    try:
        return key.strip(), json.loads(raw)
    except json.JSONDecodeError:
        return key.strip(), raw


def build_config(config_path: str | None = None, overrides: list[str] = (), preset: str = "default") -> TrainConfig:
    d = json.loads(Path(config_path).read_text()) if config_path else {}
    d.update(parse_override(o) for o in overrides)
    check_keys(d)
    return TrainConfig.baseline(**d) if preset == "baseline" else TrainConfig(**d)


def check_inputs(config: TrainConfig) -> None:
    """What a run reads before it trains, read up front: the data files (FileNotFoundError naming the missing
    ones) and the encoder's tokenizer (ValueError naming the known encoders), so that a wrong path or name
    ends the command with its message instead of a traceback from inside train()."""
    check_data_dir(config.data_dir)
    load_tokenizer(config.encoder)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m mtbert_utils.train", description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="JSON file of TrainConfig fields")
    ap.add_argument("--preset", choices=("default", "baseline"), default="default",
                    help="defaults to start from: the tuned setup or TrainConfig.baseline()")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override one field (JSON value), e.g. --set pcgrad=true --set max_train=64")
    ap.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    ap.add_argument("--max-epochs", type=int, default=None, help="stop after this many epochs (no result)")
    args = ap.parse_args(argv)
    try:
        config = build_config(args.config, args.set, args.preset)
        check_inputs(config)
    except (ValueError, TypeError, OSError) as e:
        ap.error(str(e))

    try:
        result = train(config, resume=args.resume, max_epochs=args.max_epochs)
        main_process = distributed.is_main()
    finally:
        distributed.cleanup()
    if main_process:
        print(json.dumps(summary_line(result)))
    return result


def summary_line(result: dict) -> dict:
    """The last line the command prints: a finished run's dev scores (of the model it kept); an interrupted
    one's from its last epoch, which holds dev scores or, for a run that selects on validation, val scores."""
    last = (result.get("history") or [{}])[-1]
    line = {"status": result["status"], "run_name": result.get("run_name"),
            "result_path": result.get("result_path"), "checkpoint": result.get("checkpoint"),
            "dev": result["dev"] if "dev" in result else last.get("dev")}
    if "val" in last:
        line["val"] = last["val"]
    return line


if __name__ == "__main__":
    main()
