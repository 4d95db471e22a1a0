"""Readings: Markdown paragraphs generated from the tables (tables.py) of notebooks 09-11, so that
what a notebook says follows from its numbers. A claim's verdict (stats.verdict) is 'holds',
'reversed' or 'not resolved', from the 95% CI of a paired difference.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mtbert_utils.stats import verdict
from mtbert_utils.tables import format_cell


def claim_sentence(row, what: str | None = None) -> str:
    """One line of a computed reading from a paired_table row."""
    what = what or f"{row['a']} > {row['b']}"
    return (f"{what} ({row['metric']}): **{verdict(row['mean_diff'], row['ci95'])}**, difference "
            f"{row['mean_diff']:+.3f} ± {row['ci95']:.3f} (95% CI), p = {row['p_value']:.2g}, "
            f"d_z = {row['cohens_dz']:.2f}, {row['n']} paired seeds")


def _diff_text(row) -> str:
    return (f"{verdict(row['mean_diff'], row['ci95'])} ({row['mean_diff']:+.3f} ± {row['ci95']:.3f}, "
            f"p = {row['p_value']:.2g}, d_z = {row['cohens_dz']:.2f})")


def _survival(v_epochs: str, v_budget: str) -> str:
    if v_epochs == v_budget:
        return {"holds": "survives an equal budget", "reversed": "reversed in both comparisons",
                "not resolved": "not resolved at this scale in either comparison"}[v_epochs]
    if v_budget == "not resolved":
        return f"{v_epochs} at equal epochs only: it does not survive an equal number of examples"
    if v_epochs == "not resolved":
        return f"{v_budget} only at an equal number of examples"
    return f"{v_epochs} at equal epochs but {v_budget} at an equal number of examples"


def sampler_reading(summary: pd.DataFrame, paired: pd.DataFrame, claims: list[tuple[str, str]],
                    modes: tuple[str, str] = ("equal epochs", "equal examples"), metric: str = "mean",
                    header: str = "") -> str:
    """Markdown reading of notebook 09, generated from its tables: each claimed ordering in both
    comparison modes, whether it survives an equal budget, the best sampler and who beats sequential."""
    lines = [header] if header else []
    lines.append(f"Verdicts use the 95% CI of the paired (same seeds) difference of the {metric} dev score: "
                 "**holds** if it lies above 0, **reversed** if below, **not resolved** otherwise.\n")
    p = paired[paired["metric"] == metric]
    for a, b in claims:
        rows = {m: p[(p["a"] == a) & (p["b"] == b) & (p["budget_mode"] == m)] for m in modes}
        if any(r.empty for r in rows.values()):
            continue
        r0, r1 = rows[modes[0]].iloc[0], rows[modes[1]].iloc[0]
        lines.append(f"- **{a} > {b}**: {modes[0]}: {_diff_text(r0)}; {modes[1]}: {_diff_text(r1)}. "
                     f"Conclusion: {_survival(verdict(r0['mean_diff'], r0['ci95']), verdict(r1['mean_diff'], r1['ci95']))}.")
    for mode in modes:
        s = summary[summary["budget_mode"] == mode].sort_values(f"{metric}_mean", ascending=False)
        if s.empty:
            continue
        ranking = ", ".join(f"{r['sampler']} {format_cell(r[f'{metric}_mean'], r[f'{metric}_ci95'])}"
                            for _, r in s.iterrows())
        beat = p[(p["budget_mode"] == mode) & (p["b"] == "sequential") & (p["a"] != "sequential")]
        winners = [r["a"] for _, r in beat.iterrows() if verdict(r["mean_diff"], r["ci95"]) == "holds"]
        lines.append(f"- {mode}, ranked by {metric} (± 95% CI): {ranking}. Resolved better than sequential: "
                     f"{', '.join(winners) if winners else 'none'}.")
    if paired.empty:
        lines.append("- No paired comparison: each needs two or more seeds shared by both samplers.")
    return "\n".join(lines) + "\n"


WEAK_SURGERY = 0.05  # PCGrad removing under 5% of a task gradient's norm per pair and step counts as weak


def pcgrad_reading(conflicts: pd.DataFrame, paired: pd.DataFrame, metric: str = "mean") -> str:
    """Markdown reading of notebook 11 from its tables: per weighting, how much the task gradients
    conflict (plain arm, before any projection) and what PCGrad changed; then whether weak conflict
    explains the (lack of) effect. `conflicts`: summarize_frame over (weighting, pair) with
    conflict_rate, conflict_cos and surgery; `paired`: paired_table rows with a weighting column."""
    lines, effects, surgery = [], {}, {}
    for w, g in conflicts.groupby("weighting", sort=False):
        pr = paired[(paired["weighting"] == w) & (paired["metric"] == metric)]
        if pr.empty:
            continue
        r = pr.iloc[0]
        effects[w], surgery[w] = verdict(r["mean_diff"], r["ci95"]), float(g["surgery_mean"].max())
        lines.append(f"- **{w}**: task gradients conflict in {g['conflict_rate_mean'].min():.0%}–"
                     f"{g['conflict_rate_mean'].max():.0%} of steps (by pair), mean cosine when in conflict "
                     f"{np.nanmean(g['conflict_cos_mean']):.3f}; PCGrad removes at most {surgery[w]:.1%} of a "
                     f"gradient's norm per pair and step. PCGrad - plain ({metric}): {_diff_text(r)}.")
    if not effects:
        return "No weighting has both arms with two or more seeds: nothing to read.\n"
    changed = [w for w, v in effects.items() if v != "not resolved"]
    weak = [w for w, s in surgery.items() if s < WEAK_SURGERY]
    if not changed and len(weak) == len(effects):
        end = (f"PCGrad changes nothing resolvable under any weighting, and in every weighting the conflicts are weak "
               f"(surgery under {WEAK_SURGERY:.0%}): consistent with the study's explanation that there is too "
               "little gradient conflict for surgery to matter.")
    elif not changed:
        strong = [w for w in effects if w not in weak]
        end = (f"PCGrad changes nothing resolvable, although conflicts are not weak under {'; '.join(strong)} "
               f"(surgery of {WEAK_SURGERY:.0%} or more): weak conflict alone does not explain the null result.")
    else:
        end = (f"PCGrad's effect is resolved under {'; '.join(changed)} and not under the others; "
               f"most surgery: {max(surgery, key=surgery.get)}. The study's 'no change' does not hold everywhere.")
    top = max(surgery, key=surgery.get)
    return "\n".join(lines) + f"\n\n{end} (Most conflict: {top}; {len(effects)} weightings.)\n"
