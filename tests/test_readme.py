"""The README's results are the committed result files: its Table 1s are the rendered tables, and every
difference ± CI quoted for the full-scale claims is a row of the paired tests (to the digits shown)."""

import re
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("table", ["results/table1.md", "results/gpu-minilm/table1.md"])
def test_readme_table1_is_the_rendered_table(table):
    lines = (ROOT / table).read_text().strip().splitlines()
    assert len(lines) == 8 and "\n".join(lines) in README  # header, rule, zero-shot and the five rows


def test_full_scale_claims_quote_the_paired_tests():
    section = README.split("What resolves at full scale", 1)[1].split("Caveat:", 1)[0]
    paired = pd.concat([pd.read_csv(ROOT / "results" / "gpu-minilm" / f) for f in
                        ("table1_paired.csv", "04_cosine_sts_cosine_vs_linear.csv")])
    quoted = re.findall(r"([+−-]\d\.\d+) ± (\d\.\d+)", section)
    assert len(quoted) >= 12
    for diff, ci in quoted:
        d = len(diff.split(".")[1])
        value = float(diff.replace("−", "-"))
        hits = paired[(paired.mean_diff.round(d) == round(value, d)) & (paired.ci95.round(d) == round(float(ci), d))]
        assert len(hits), f"README quotes {diff} ± {ci}, which no paired test gives"


@pytest.mark.parametrize("doc", ["README.md", "docs/results.md"])
def test_best_row_quotes_the_rendered_verdict(doc):
    """The best model's row (mean ± 95% CI over seeds) and its target gaps are notebook 08's verdict."""
    import json
    text = (ROOT / doc).read_text()
    verdict = json.loads((ROOT / "results" / "best" / "08_best_model.json").read_text())["verdict"]
    ours = next(ln for ln in text.splitlines() if ln.startswith("| **ours: MiniLM, 2 CPU cores"))
    assert f"{len(verdict['seeds'])} seeds" in ours
    quoted = re.findall(r"(\d\.\d{3}) ± (\d\.\d{3})", ours)
    assert quoted == [(f"{verdict['dev'][t]:.3f}", f"{verdict['ci95'][t]:.3f}") for t in ("sst", "para", "sts")]
    target = next(ln for ln in text.splitlines() if ln.startswith("| target for this profile"))
    assert re.findall(r"missed by (\d\.\d{3})", target) == [f"{-verdict['gap'][t]:.3f}" for t in ("sst", "para", "sts")]
