"""`python -m mtbert_utils.bench`: the speed benchmark, whose code is benchmarks/speed.py.

    python -m mtbert_utils.bench [--data-dir D] [--quick] [--levers] [--accuracy] [--out results/bench/bench.json]
    python -m mtbert_utils.bench --device cuda [--levers] [--accuracy] [--time-cap S]   # on a GPU

Only this entry point is in the package. The benchmark itself lives in benchmarks/, outside what
the notebooks import, so that editing it does not change reproduce.code_version and re-run them.
It needs a checkout of the repository (an editable install), as the benchmarks/ folder is not installed.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def speed_module():
    """benchmarks/speed.py of this checkout, imported as `benchmarks.speed`."""
    if not (REPO_ROOT / "benchmarks" / "speed.py").is_file():
        raise SystemExit(f"the benchmark needs a checkout of the repository: no benchmarks/speed.py in {REPO_ROOT}")
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module("benchmarks.speed")


def main(argv=None) -> dict:
    return speed_module().main(argv)


if __name__ == "__main__":
    main()
