import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_dir():
    """The read-only CS224N mirror next to the repo; $MTBERT_DATA_DIR overrides it."""
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cs224n"
    path = Path(os.environ.get("MTBERT_DATA_DIR") or default)
    if not (path / "ids-sst-train.csv").is_file():
        pytest.skip(f"CS224N data not found at {path}")
    return path
