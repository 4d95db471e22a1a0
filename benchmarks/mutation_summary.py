"""Summarise a mutmut run (benchmarks/mutation.sh) into results/mutation/.

    python benchmarks/mutation_summary.py --scope        # the mutant-name patterns that are run and scored
    python benchmarks/mutation_summary.py --out DIR      # DIR/mutants.json (every scored mutant, its status and
                                                         # diff) and DIR/summary.md (kill rate, survivors)
    python benchmarks/mutation_summary.py --modules optim budget --out DIR
                                                         # the same for these modules alone (a run of
                                                         # mutation.sh with their patterns only)
    python benchmarks/mutation_summary.py --pyproject --modules config
                                                         # pyproject.toml with [tool.mutmut] set for a
                                                         # module with a test selection of its own

A module with a test selection of its own, in pyproject.toml's [tool.mtbert.mutation-selection], runs alone:
mutation.sh runs it in a copy of the repository whose [tool.mutmut] names that selection, and the whole scope's
run leaves it out. config needs one (every test builds a TrainConfig, so with the shared selection each of its
mutants would run nearly every test); the others (tables, readings, results, gradients, presets, plans) have
fast tests of their own that the shared selection's modules do not need.

A survivor is either killed by a test or listed in benchmarks/mutation_equivalent.json with the reason
it cannot change behaviour. Equivalents are keyed by function and mutated line (not by mutmut's
number, which shifts when a function changes), so a listed reason that no longer matches any
survivor is reported as stale.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import tomllib
from collections import Counter
from pathlib import Path

# What is mutated and scored: the modules whose tests are fast, and the parsing half of data.py
# (reading and checking one task file). mutmut names mutants module.x_function__mutmut_N
# (methods: module.xǁClassǁmethod__mutmut_N).
SCOPE = [
    "mtbert_utils.pcgrad.*",
    "mtbert_utils.schedules.*",
    "mtbert_utils.stats.*",
    "mtbert_utils.tasks.*",
    # the parsing half of data.py: read_task_file and the named steps it is made of
    *(f"mtbert_utils.data.x_{f}__mutmut_*" for f in ("_check_task", "_parse_label", "_next_record", "read_task_file",
                                                      "_decode", "_header_columns", "_read_records", "_row_problem",
                                                      "_drop_duplicate_ids")),
    "mtbert_utils.data.xǁ_Skipsǁ*",
    # batching.py: tokenized tasks, padding, batch cutting, the resumable streams; not the loading and caching
    # of a run's data (load_run_tasks, prepare_data), which the training tests cover end to end
    *(f"mtbert_utils.batching.x_{f}__mutmut_*" for f in ("encode_task", "_pad", "collate", "batch_indices",
                                                          "eval_batches", "training_streams", "check_trainable")),
    "mtbert_utils.batching.xǁEncodedTaskǁ*",
    "mtbert_utils.batching.xǁTaskBatchStreamǁ*",
    # the study's tuned optimisation: per-module and layer-wise learning rates, the step decay
    "mtbert_utils.optim.*",
    # examples budgets (equal-budget runs, GPU planning); not train_sizes, which reads the data files
    *(f"mtbert_utils.budget.x_{f}__mutmut_*" for f in ("expected_examples", "relative_cost", "batches_per_epoch",
                                                        "budget_epochs", "epochs_for_budget")),
    # evaluation's arithmetic: metrics, their summaries, ensembles and their members; not the model's forward
    *(f"mtbert_utils.evaluation.x_{f}__mutmut_*" for f in ("score", "add_summary_metrics", "combine_outputs",
                                                            "ensemble_prediction", "select_members")),
    # what a run carries between epochs, saved and restored (resumes must be exact)
    "mtbert_utils.checkpoint.*",
    # with test selections of their own (OWN_SELECTION): TrainConfig's checks, derived values and run names;
    # the tables the README's numbers come from (Table 1, summaries over seeds, paired tests); the readings, the
    # conclusions notebooks 09-11 write from their tables; result files written atomically and read back; the
    # gradient-combination registry and the logged cosines; the presets and what each profile trains; the model
    # (heads, pooling, the frozen encoder's cache, fused tasks, the MiniLM folder); the training step
    "mtbert_utils.config.*",
    "mtbert_utils.tables.*",
    "mtbert_utils.readings.*",
    "mtbert_utils.results.*",
    "mtbert_utils.gradients.*",
    "mtbert_utils.presets.*",
    "mtbert_utils.plans.*",
    "mtbert_utils.model.*",
    # training.py's step half: the model a config builds, a step's task losses, their read-back and its stop on a
    # non-finite loss, a finished run read back, the run record; not the loop (Run, train_run, build_state,
    # set_up_epoch, run_epoch, optimizer_step, score_epoch, select_and_finish: about 700 mutants, each running
    # seconds of training tests, over two hours on 2 cores)
    *(f"mtbert_utils.training.x_{f}__mutmut_*" for f in ("build_model", "sst_class_weights", "task_loss",
                                                          "stop_on_non_finite", "training_step", "read_finished",
                                                          "finished_result", "budget_spent", "run_record",
                                                          "next_global_batch")),
    "mtbert_utils.training.xǁPendingLossesǁ*",
]
EQUIVALENT = Path(__file__).with_name("mutation_equivalent.json")
PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"
# module -> the tests its mutants run against, instead of [tool.mutmut]'s selection
OWN_SELECTION = tomllib.loads(PYPROJECT.read_text())["tool"]["mtbert"]["mutation-selection"]
MODULES = ("pcgrad", "schedules", "stats", "tasks", "data", "batching", "optim", "budget", "evaluation",
           "checkpoint", "config", "tables", "readings", "results", "gradients", "presets", "plans", "model",
           "training")
SHARED = tuple(m for m in MODULES if m not in OWN_SELECTION)  # the whole scope's run: the shared selection


def scope_of(modules) -> list[str]:
    """SCOPE's patterns for these modules."""
    return [p for p in SCOPE if p.split(".")[1] in modules]


def in_scope(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in SCOPE)


def function_of(name: str) -> str:
    """mtbert_utils.tasks.x_pearson__mutmut_3 -> tasks.pearson; xǁAdaptiveǁratio -> schedules.Adaptive.ratio"""
    module, _, mangled = name.rpartition(".")
    mangled = mangled.rsplit("__mutmut_", 1)[0]
    func = ".".join(mangled.split("ǁ")[1:]) if mangled.startswith("xǁ") else mangled[2:]
    return f"{module.rpartition('.')[2]}.{func}"


def mutated_line(diff: str) -> str:
    """The first added line of a mutant's diff, stripped: with the function, a stable key for it."""
    plus = [l[1:].strip() for l in diff.splitlines() if l.startswith("+") and not l.startswith("+++")]
    return plus[0] if plus else ""


def collect(diffs: bool = True) -> list[dict]:
    from mutmut.__main__ import SourceFileMutationData, walk_mutatable_files
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code

    rows = []
    for path in walk_mutatable_files():
        meta = Path("mutants") / (str(path) + ".meta")
        if not meta.exists():
            continue
        data = SourceFileMutationData(path=path)
        data.load()
        for name, code in data.exit_code_by_key.items():
            if not in_scope(name):
                continue
            status = status_by_exit_code[code] if code is not None else "not checked"
            diff = get_diff_for_mutant(name, path=path) if diffs and status != "killed" else ""
            rows.append({"mutant": name, "function": function_of(name), "status": status,
                         **({"line": mutated_line(diff), "diff": diff} if diff else {})})
    return rows


def of_modules(function: str, modules) -> bool:
    return function.split(".", 1)[0] in modules


def summarize(rows: list[dict], equivalent: dict, baseline: dict | None = None, modules: tuple = SHARED,
              version: str = "", commit: str = "") -> tuple[dict, str]:
    """rows: collect()'s, of `modules` only (a run over part of the scope is scored on that part alone);
    version and commit: mutmut's and the code's, for the record."""
    known = {(e["function"], e["line"]): e["reason"] for e in equivalent["equivalent"]
             if of_modules(e["function"], modules)}
    # survivors that are real bugs but cannot be observed on this machine (e.g. CUDA only): they stay
    # survivors and count against the kill rate, with the reason shown
    noted = {(e["function"], e["line"]): e["reason"] for e in equivalent.get("not_observable_here", [])
             if of_modules(e["function"], modules)}
    for r in rows:
        key = (r["function"], r.get("line"))
        if r["status"] in ("survived", "no tests") and key in known:
            r["status"] = "equivalent"
            r["reason"] = known[key]
        elif r["status"] in ("survived", "no tests") and key in noted:
            r["reason"] = noted[key]
    used = {(r["function"], r.get("line")) for r in rows if "reason" in r}
    stale = [f"{f}: `{l}`" for f, l in [*known, *noted] if (f, l) not in used]

    by_module = {}
    for m in modules:
        c = Counter(r["status"] for r in rows if of_modules(r["function"], (m,)))
        by_module[m] = dict(sorted(c.items()))
    total = Counter(r["status"] for r in rows)
    # "no tests": a mutant no selected test reaches counts as surviving
    scored = total["killed"] + total["survived"] + total["timeout"] + total["suspicious"] + total["no tests"] \
        + total["segfault"]
    killed = total["killed"] + total["timeout"] + total["segfault"]  # a mutant that hangs or crashes the tests is caught
    rate = killed / scored if scored else float("nan")
    summary = {"tool": "mutmut", "scope": scope_of(modules), "modules": list(modules),
               "counts": dict(sorted(total.items())), "by_module": by_module,
               "non_equivalent": scored, "killed_or_timeout": killed, "kill_rate": round(rate, 4),
               "stale_equivalents": stale}

    summary["mutmut"], summary["commit"] = version, commit
    part = "" if set(modules) == set(SHARED) else f": {', '.join(modules)}"
    md = [f"# Mutation testing of the core modules{part}", "",
          f"Produced by `bash benchmarks/mutation.sh` (mutmut {version}, code at {commit or 'unknown'}; "
          "scope and method in docs/testing.md).", "",
          f"**Kill rate: {killed} of {scored} non-equivalent mutants killed ({rate:.1%})**; "
          f"{total['equivalent']} survivors are equivalent (listed below with the reason), "
          f"{total['survived']} survive, {total['no tests']} are reached by no test, "
          f"{total['not checked']} were not run.", "",
          "| module | " + " | ".join(sorted(total)) + " |", "|---|" + "---|" * len(total)]
    for m, c in by_module.items():
        md.append(f"| {m} | " + " | ".join(str(c.get(s, 0)) for s in sorted(total)) + " |")
    for title, status in (("Surviving mutants (not killed, not shown equivalent)", "survived"),
                          ("Mutants reached by no test", "no tests"),
                          ("Equivalent mutants", "equivalent")):
        group = [r for r in rows if r["status"] == status]
        md += ["", f"## {title}: {len(group)}", ""]
        for r in group:
            why = f" — {r['reason']}" if "reason" in r else ""
            md.append(f"- `{r['mutant'].rpartition('.')[2]}` ({r['function']}): `{r.get('line', '')}`{why}")
    if baseline:
        before = baseline["mutants"]
        newly = sorted(r["mutant"] for r in rows if r["status"] == "killed" and before.get(r["mutant"]) not in (None, "killed"))
        md += ["", "## Against an earlier run", "", f"{baseline.get('about', '')}", "",
               f"Earlier: {baseline['counts']}. Killed now but not then: {len(newly)}."]
        summary["baseline_counts"], summary["newly_killed"] = baseline["counts"], len(newly)
    if stale:
        md += ["", "## Listed as equivalent but no longer found (benchmarks/mutation_equivalent.json)", ""]
        md += [f"- {s}" for s in stale]
    return summary, "\n".join(md) + "\n"


def pyproject_for(modules) -> str:
    """pyproject.toml with its [tool.mutmut] set for `modules`: for a module with its own test selection, that
    selection and only that module mutated; otherwise the file as it is."""
    own = [m for m in modules if m in OWN_SELECTION]
    text = PYPROJECT.read_text()
    if not own:
        return text
    if len(modules) > 1:
        raise ValueError(f"{own[0]} has a test selection of its own: run it alone (MUTATION_MODULES={own[0]})")
    conf = tomllib.loads(text)["tool"]["mutmut"]
    conf["only_mutate"] = [f"mtbert_utils/{own[0]}.py"]
    conf["pytest_add_cli_args_test_selection"] = OWN_SELECTION[own[0]]
    head, _, rest = text.partition("[tool.mutmut]\n")
    # the section ends at its first blank line, or at the next section's header
    ends = [i + 1 for i in (rest.find("\n\n"), rest.find("\n[")) if i >= 0]
    after = rest[min(ends):] if ends else ""
    # TOML reads these values (strings, lists of strings, booleans) as JSON writes them
    section = "[tool.mutmut]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in conf.items())
    return head + section + after


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scope", action="store_true", help="print the mutant-name patterns (of --modules), one a line")
    p.add_argument("--unsettled", action="store_true",
                   help="print the scored mutants not (yet) killed: to re-check them after adding tests")
    p.add_argument("--pyproject", action="store_true",
                   help="print pyproject.toml with [tool.mutmut] set for --modules (their own test selection)")
    p.add_argument("--out", type=Path, default=Path("results/mutation"))
    p.add_argument("--commit", help="the code's commit, for the record (default: git's HEAD here)")
    p.add_argument("--modules", nargs="+", choices=MODULES, default=list(SHARED),
                   help="score these modules only (after a run of their patterns alone); default: the whole "
                        f"scope but {', '.join(OWN_SELECTION)}, which have test selections of their own")
    args = p.parse_args(argv)
    modules = tuple(m for m in MODULES if m in args.modules)
    if args.pyproject:
        try:
            sys.stdout.write(pyproject_for(modules))
        except ValueError as e:
            p.error(str(e))
        return 0
    if args.scope:
        print("\n".join(scope_of(modules)))
        return 0
    equivalent = json.loads(EQUIVALENT.read_text()) if EQUIVALENT.exists() else {"equivalent": []}
    rows = [r for r in collect() if of_modules(r["function"], modules)]
    if args.unsettled:
        summarize(rows, equivalent, modules=modules)  # marks the equivalent ones
        print("\n".join(r["mutant"] for r in rows if r["status"] not in ("killed", "timeout", "segfault", "equivalent")))
        return 0
    if not rows:
        print("no mutmut results in ./mutants: run benchmarks/mutation.sh first", file=sys.stderr)
        return 1
    import subprocess
    from importlib.metadata import PackageNotFoundError, version
    try:
        tool = version("mutmut")
    except PackageNotFoundError:  # results read back without mutmut installed
        tool = "unknown"
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True).stdout.strip()
    first = args.out / "first_run.json"  # an earlier full run kept for comparison, if there is one
    summary, md = summarize(rows, equivalent, json.loads(first.read_text()) if first.exists() else None, modules,
                            tool, commit)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mutants.json").write_text(json.dumps({"summary": summary, "mutants": rows}, indent=1,
                                                      ensure_ascii=False) + "\n")
    (args.out / "summary.md").write_text(md)
    print(md.split("\n\n")[2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
