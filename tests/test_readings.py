"""readings.py on tables made by hand: each conclusion a notebook writes (09's samplers, 11's PCGrad under task
weights) follows from the verdicts of its paired differences, branch by branch, in its whole words.

No data and no training: readings.py's own mutation-test selection (pyproject.toml's
[tool.mtbert.mutation-selection], docs/testing.md). tests/test_pipeline_numbers.py checks the readings the
pipelines write against their run files.
"""

import pandas as pd

from mtbert_utils.readings import WEAK_SURGERY, _survival, claim_sentence, pcgrad_reading, sampler_reading

NAN = float("nan")


def diff(mean_diff, ci95, p, dz, n=3, **labels):
    return {**labels, "n": n, "mean_diff": mean_diff, "ci95": ci95, "p_value": p, "cohens_dz": dz}


def test_claim_sentence():
    row = diff(0.05, 0.02, 0.0123, 2.5, a="rr_over", b="rr_under", metric="sst")
    assert claim_sentence(row) == ("rr_over > rr_under (sst): **holds**, difference +0.050 ± 0.020 (95% CI), "
                                   "p = 0.012, d_z = 2.50, 3 paired seeds")
    row = diff(-0.01, 0.03, 0.5, -0.33, n=2, a="x", b="y", metric="mean")
    assert claim_sentence(row, "PCGrad helps") == ("PCGrad helps (mean): **not resolved**, difference -0.010 ± 0.030 "
                                                   "(95% CI), p = 0.5, d_z = -0.33, 2 paired seeds")


def test_what_survives_an_equal_budget():
    assert _survival("holds", "holds") == "survives an equal budget"
    assert _survival("reversed", "reversed") == "reversed in both comparisons"
    assert _survival("not resolved", "not resolved") == "not resolved at this scale in either comparison"
    assert _survival("holds", "not resolved") == \
        "holds at equal epochs only: it does not survive an equal number of examples"
    assert _survival("reversed", "not resolved") == \
        "reversed at equal epochs only: it does not survive an equal number of examples"
    assert _survival("not resolved", "holds") == "holds only at an equal number of examples"
    assert _survival("holds", "reversed") == "holds at equal epochs but reversed at an equal number of examples"


def sampler_tables(winner=True):
    summary = pd.DataFrame([  # only the second mode has a summary: the first is skipped, the second still read
        {"budget_mode": "equal examples", "sampler": "sequential", "mean_mean": 0.50, "mean_ci95": 0.01},
        {"budget_mode": "equal examples", "sampler": "temperature", "mean_mean": 0.55, "mean_ci95": 0.02},
        {"budget_mode": "equal examples", "sampler": "proportional", "mean_mean": 0.52, "mean_ci95": NAN}])
    rows = [
        diff(0.05, 0.02, 0.01, 2.0, a="temperature", b="sequential", metric="mean", budget_mode="equal epochs"),
        diff(0.01, 0.02, 0.5, 0.4, a="temperature", b="sequential", metric="mean", budget_mode="equal examples"),
        diff(-0.03, 0.01, 0.02, -3.0, a="proportional", b="sequential", metric="mean", budget_mode="equal epochs"),
        diff(-0.04, 0.01, 0.01, -4.0, a="proportional", b="sequential", metric="mean", budget_mode="equal examples"),
        # another metric, and sequential against itself: neither is read
        diff(0.2, 0.01, 0.001, 9.0, a="proportional", b="sequential", metric="sst", budget_mode="equal examples"),
        diff(0.2, 0.01, 0.001, 9.0, a="sequential", b="sequential", metric="mean", budget_mode="equal examples"),
        # a claim with one mode only is skipped
        diff(0.2, 0.01, 0.001, 9.0, a="annealed", b="proportional", metric="mean", budget_mode="equal epochs")]
    if winner:
        rows.append(diff(0.1, 0.02, 0.003, 5.0, a="annealed", b="sequential", metric="mean",
                         budget_mode="equal examples"))
    return summary, pd.DataFrame(rows)


def test_sampler_reading_whole():
    summary, paired = sampler_tables()
    claims = [("annealed", "proportional"), ("temperature", "sequential"), ("proportional", "sequential")]
    assert sampler_reading(summary, paired, claims) == "\n".join([
        "Verdicts use the 95% CI of the paired (same seeds) difference of the mean dev score: **holds** if it lies "
        "above 0, **reversed** if below, **not resolved** otherwise.\n",
        "- **temperature > sequential**: equal epochs: holds (+0.050 ± 0.020, p = 0.01, d_z = 2.00); equal examples: "
        "not resolved (+0.010 ± 0.020, p = 0.5, d_z = 0.40). Conclusion: holds at equal epochs only: it does not "
        "survive an equal number of examples.",
        "- **proportional > sequential**: equal epochs: reversed (-0.030 ± 0.010, p = 0.02, d_z = -3.00); equal "
        "examples: reversed (-0.040 ± 0.010, p = 0.01, d_z = -4.00). Conclusion: reversed in both comparisons.",
        "- equal examples, ranked by mean (± 95% CI): temperature 0.550 ± 0.020, proportional 0.520, sequential "
        "0.500 ± 0.010. Resolved better than sequential: annealed."]) + "\n"


def test_sampler_reading_with_a_header_other_modes_and_no_winner():
    summary, paired = sampler_tables(winner=False)
    text = sampler_reading(summary, paired, [], header="## Reading")
    assert text.startswith("## Reading\nVerdicts use the 95% CI")
    assert text.endswith("sequential 0.500 ± 0.010. Resolved better than sequential: none.\n")
    paired = paired.assign(budget_mode=paired["budget_mode"].replace({"equal epochs": "a", "equal examples": "b"}))
    summary = summary.assign(budget_mode="a", sst_mean=[0.3, 0.1, 0.2], sst_ci95=NAN)
    text = sampler_reading(summary, paired, [("temperature", "sequential")], modes=("a", "b"), metric="sst")
    assert "difference of the sst dev score" in text
    assert "- a, ranked by sst (± 95% CI): sequential 0.300, proportional 0.200, temperature 0.100. Resolved " \
        "better than sequential: none." in text
    assert "**temperature > sequential**" not in text  # no sst rows for that claim
    # one seed: paired_table has no rows, and the reading says why rather than read "none" as a finding
    text = sampler_reading(summary, paired.iloc[:0], [("temperature", "sequential")], modes=("a", "b"))
    assert text.endswith("Resolved better than sequential: none.\n- No paired comparison: each needs two or more "
                         "seeds shared by both samplers.\n") and "**temperature > sequential**" not in text


def conflicts(surgery_equal=(0.01, 0.02), surgery_weighted=(0.03, 0.04)):
    # sst:3 first: weightings are read in the order they appear, not sorted
    return pd.DataFrame([
        {"weighting": "sst:3", "pair": "sst|para", "conflict_rate_mean": 0.1, "conflict_cos_mean": NAN,
         "surgery_mean": surgery_weighted[0]},
        {"weighting": "sst:3", "pair": "sst|sts", "conflict_rate_mean": 0.4, "conflict_cos_mean": -0.2,
         "surgery_mean": surgery_weighted[1]},
        {"weighting": "equal", "pair": "sst|para", "conflict_rate_mean": 0.3, "conflict_cos_mean": -0.1,
         "surgery_mean": surgery_equal[0]},
        {"weighting": "equal", "pair": "sst|sts", "conflict_rate_mean": 0.2, "conflict_cos_mean": -0.3,
         "surgery_mean": surgery_equal[1]}])


def pcgrad_paired(equal=(0.01, 0.02), weighted=(-0.01, 0.02)):
    return pd.DataFrame([
        diff(0.3, 0.01, 0.001, 9.0, weighting="equal", metric="sst"),  # another metric: not read
        diff(*equal, 0.6, 0.2, weighting="equal", metric="mean"),
        diff(*weighted, 0.4, -0.3, weighting="sst:3", metric="mean")])


def test_pcgrad_reading_when_every_conflict_is_weak():
    assert WEAK_SURGERY == 0.05
    text = pcgrad_reading(conflicts(), pcgrad_paired())
    assert text == "\n".join([
        "- **sst:3**: task gradients conflict in 10%–40% of steps (by pair), mean cosine when in conflict -0.200; "
        "PCGrad removes at most 4.0% of a gradient's norm per pair and step. PCGrad - plain (mean): not resolved "
        "(-0.010 ± 0.020, p = 0.4, d_z = -0.30).",
        "- **equal**: task gradients conflict in 20%–30% of steps (by pair), mean cosine when in conflict -0.200; "
        "PCGrad removes at most 2.0% of a gradient's norm per pair and step. PCGrad - plain (mean): not resolved "
        "(+0.010 ± 0.020, p = 0.6, d_z = 0.20)."]) + (
        "\n\nPCGrad changes nothing resolvable under any weighting, and in every weighting the conflicts are weak "
        "(surgery under 5%): consistent with the study's explanation that there is too little gradient conflict "
        "for surgery to matter. (Most conflict: sst:3; 2 weightings.)\n")


def test_pcgrad_reading_when_a_conflict_is_not_weak_or_an_effect_is_resolved():
    text = pcgrad_reading(conflicts(surgery_weighted=(0.01, WEAK_SURGERY)), pcgrad_paired())  # 5%: not weak
    assert text.endswith("\n\nPCGrad changes nothing resolvable, although conflicts are not weak under sst:3 "
                         "(surgery of 5% or more): weak conflict alone does not explain the null result. "
                         "(Most conflict: sst:3; 2 weightings.)\n")
    text = pcgrad_reading(conflicts(surgery_equal=(0.2, 0.1)), pcgrad_paired(weighted=(-0.05, 0.02)))
    assert "PCGrad - plain (mean): reversed (-0.050 ± 0.020" in text
    assert text.endswith("\n\nPCGrad's effect is resolved under sst:3 and not under the others; most surgery: "
                         "equal. The study's 'no change' does not hold everywhere. (Most conflict: equal; "
                         "2 weightings.)\n")
    text = pcgrad_reading(conflicts(), pcgrad_paired(equal=(0.05, 0.02), weighted=(0.04, 0.02)))
    assert "PCGrad's effect is resolved under sst:3; equal and not under the others" in text  # in their order


def test_pcgrad_reading_skips_a_weighting_without_both_arms():
    paired = pcgrad_paired().iloc[:2]  # sst:3 (read first) has no paired row
    text = pcgrad_reading(conflicts(), paired)
    assert "**sst:3**" not in text and text.startswith("- **equal**: ")
    assert text.endswith("(Most conflict: equal; 1 weightings.)\n")
    assert pcgrad_reading(conflicts(), paired.iloc[:1]) == \
        "No weighting has both arms with two or more seeds: nothing to read.\n"


def test_lists_of_several_are_joined():
    summary, paired = sampler_tables()
    paired = pd.concat([paired, pd.DataFrame([diff(0.1, 0.02, 0.003, 5.0, a="temperature", b="sequential",
                                                   metric="mean", budget_mode="equal examples")])])
    assert sampler_reading(summary, paired, []).endswith("Resolved better than sequential: annealed, temperature.\n")
    text = pcgrad_reading(conflicts(surgery_equal=(0.1, 0.0), surgery_weighted=(0.0, 0.2)), pcgrad_paired())
    assert "although conflicts are not weak under sst:3; equal (surgery of 5% or more)" in text
