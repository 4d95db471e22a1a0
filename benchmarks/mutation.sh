#!/usr/bin/env bash
# Mutation testing of the core modules with mutmut (pip install -e ".[mutation]"): plants single-line bugs
# in pcgrad, schedules, stats, tasks, the parsing half of data, batching, optim, budget, evaluation's arithmetic and
# checkpoint (and, each alone with tests of its own, config, tables, readings, results, gradients, presets and
# plans), one at a time, runs the tests that reach the mutated function, and writes
# results/mutation/{summary.md,mutants.json}. Not part of CI (docs/testing.md).
#
#   bash benchmarks/mutation.sh                   # fresh run (deletes ./mutants), then the summary
#   MUTATION_JOBS=2 bash benchmarks/mutation.sh   # parallel workers (default 1: a shared 2-core box)
#   bash benchmarks/mutation.sh "mtbert_utils.stats.*"   # only these mutants (patterns within the scope),
#                                                 # keeping ./mutants' other results; then the summary
#   bash benchmarks/mutation.sh $(python benchmarks/mutation_summary.py --unsettled)
#                                                 # after adding tests: re-check only the survivors
#   MUTATION_MODULES="optim budget" bash benchmarks/mutation.sh
#                                                 # a fresh run of these modules alone, scored on its own in
#                                                 # results/mutation/optim-budget/ (the whole scope's summary
#                                                 # stays as it was); re-check its survivors with the same
#                                                 # MUTATION_MODULES and `--unsettled --modules optim budget`
#   MUTATION_MODULES=config bash benchmarks/mutation.sh
#                                                 # a module with a test selection of its own (pyproject.toml's
#                                                 # [tool.mtbert.mutation-selection]) runs alone, in a copy of the
#                                                 # repository (.mutation/config/) whose [tool.mutmut] names it;
#                                                 # scored in results/mutation/config/
#   MUTATION_MODULES=config bash benchmarks/mutation.sh --survivors
#                                                 # after adding tests: re-check that run's survivors only
#                                                 # (--survivors works for any MUTATION_MODULES, and for none)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# the tests run from ./mutants, where conftest's default (the mirror beside the repository) is one level off:
# without this, every test that reads the CS224N files skips and the batching tests reach no mutant
export MTBERT_DATA_DIR="$(realpath -m "${MTBERT_DATA_DIR:-$(cd .. && pwd)/shared/data/cs224n}")"
read -r -a modules <<< "${MUTATION_MODULES:-}"
only=() out=results/mutation
if [ ${#modules[@]} -gt 0 ]; then
    only=(--modules "${modules[@]}") out="results/mutation/$(IFS=-; echo "${modules[*]}")"
fi
repo="$(pwd)" commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
# the pyproject.toml mutmut must read (a module with a test selection of its own alone: refused with others)
settings="$(python benchmarks/mutation_summary.py --pyproject "${only[@]}")"
if [ "$settings" != "$(cat pyproject.toml)" ]; then
    # a module with a test selection of its own: mutmut reads [tool.mutmut] from ./pyproject.toml only, so it
    # runs in a copy of the repository (tracked and untracked files, not the ignored ones) that names it
    work=".mutation/$(IFS=-; echo "${modules[*]}")"
    [ "${1:-}" = --survivors ] || rm -rf "$work"  # a fresh run; re-checking survivors keeps its results
    mkdir -p "$work"
    git ls-files -z --cached --others --exclude-standard \
        | tar --null --files-from - --ignore-failed-read -cf - | tar -xf - -C "$work"
    printf '%s\n' "$settings" > "$work/pyproject.toml"
    cd "$work"
fi
if [ "${1:-}" = --survivors ]; then
    mapfile -t scope < <(python benchmarks/mutation_summary.py --unsettled "${only[@]}" | grep . || true)
    [ ${#scope[@]} -gt 0 ] || { echo "no survivors to re-check"; exit 0; }
elif [ $# -gt 0 ]; then
    scope=("$@")
else
    rm -rf mutants  # a fresh run: no result cached from older code or tests
    mapfile -t scope < <(python benchmarks/mutation_summary.py --scope "${only[@]}")
fi
# mutmut exits non-zero when mutants survive; the summary below is the verdict
nice -n 19 mutmut run --max-children "${MUTATION_JOBS:-1}" "${scope[@]}" || true
python benchmarks/mutation_summary.py --out "$repo/$out" --commit "$commit" "${only[@]}"
