"""Re-run the numbered notebooks with papermill, passing each its parameters from a profile.

    python -m mtbert_utils.reproduce --profile cpu                  # the README's main job
    python -m mtbert_utils.reproduce --profile smoke --out /tmp/x   # what the tests run
    python -m mtbert_utils.reproduce --profile cpu --only 01_sequential --set max_dev=200 --out /tmp/x
    python -m mtbert_utils.reproduce --profile gpu-minilm --train-only --jobs 10    # train the runs, no papermill
    python -m mtbert_utils.reproduce --profile gpu-minilm --train-only --shard 3/8  # runs 3, 11, 19, ... (0-based)
    python -m mtbert_utils.reproduce --profile gpu-minilm --list-runs               # what --train-only would train

A profile is a JSON file (built-in ones live in mtbert_utils/profiles/, or pass a path):
    {"description": ..., "notebooks": [names], "params": {applied to every notebook that declares them},
     "notebook_params": {name: {params for that notebook only}}, "out_subdir": "" or a folder name}

Executed copies go to `{results}/executed/` (a failed one to `{name}.failed.ipynb` beside the last good
one). A notebook whose last run finished with the same parameters and the same code (the package modules it
runs + the notebook) is skipped; `--force` re-runs it.

`--train-only` (mtbert_utils.packing) trains every run the profile's notebooks make into the folders where the
notebooks look for them, N at a time in separate processes, without papermill or jupyter; executing the
notebooks afterwards (anywhere) reuses those run files and trains nothing (docs/gpu.md).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator

from mtbert_utils import results
from mtbert_utils.results import REPO_ROOT, write_json

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
PROFILE_KEYS = {"description", "notebooks", "params", "notebook_params", "out_subdir"}


class ReproduceError(RuntimeError):
    """A notebook failed, or the profile / overrides are invalid."""


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_profile(name_or_path: str) -> dict:
    """Read and validate a profile, naming the file and the offending key on error."""
    path = Path(name_or_path)
    if not path.suffix == ".json":
        path = PROFILE_DIR / f"{name_or_path}.json"
        if not path.exists():
            raise ReproduceError(f"unknown profile {name_or_path!r}; built-in profiles: {available_profiles()} "
                                 f"(or pass the path of a profile .json file)")
    if not path.exists():
        raise ReproduceError(f"profile file {path} does not exist")
    try:
        profile = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReproduceError(f"profile {path} is not valid UTF-8 JSON: {e}") from e
    if not isinstance(profile, dict):
        raise ReproduceError(f"profile {path} must be a JSON object")
    unknown = set(profile) - PROFILE_KEYS
    if unknown:
        raise ReproduceError(f"profile {path}: unknown keys {sorted(unknown)}; allowed: {sorted(PROFILE_KEYS)}")
    if not isinstance(profile.get("notebooks"), list) or not profile["notebooks"]:
        raise ReproduceError(f"profile {path}: 'notebooks' must be a non-empty list of notebook names")
    for key in ("params", "notebook_params"):
        if not isinstance(profile.get(key, {}), dict):
            raise ReproduceError(f"profile {path}: {key!r} must be an object")
    extra = set(profile.get("notebook_params", {})) - set(profile["notebooks"])
    if extra:
        raise ReproduceError(f"profile {path}: notebook_params for notebooks not in the list: {sorted(extra)}")
    for nb in profile["notebooks"]:
        notebook_path(nb)  # fails early with the list of notebooks
    profile["_path"] = str(path)
    profile["_name"] = path.stem
    return profile


def notebook_path(name: str) -> Path:
    path = NOTEBOOK_DIR / f"{name}.ipynb"
    if not path.exists():
        have = sorted(p.stem for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
        raise ReproduceError(f"no notebook {name!r}; notebooks: {have}")
    return path


def parameters_source(path: Path) -> str:
    """The source of the notebook's one cell tagged `parameters` (read as JSON: no papermill or nbformat needed)."""
    cells = [c for c in json.loads(Path(path).read_text(encoding="utf-8"))["cells"]
             if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ReproduceError(f"{path}: {len(cells)} cells tagged 'parameters'; a notebook needs exactly one")
    src = cells[0]["source"]
    return "".join(src) if isinstance(src, list) else src


def declared_parameters(path: Path) -> dict:
    """Name -> {name, inferred_type_name, default, help} of the notebook's `parameters` cell, read with `ast`.

    Every line must be `name: type = literal  # help` (the house style; papermill --help-notebook shows the
    same). `default` is the Python value, so the defaults are known without papermill (train-only runs)."""
    import ast
    src = parameters_source(path)
    lines = src.splitlines()
    declared = {}
    for node in ast.parse(src).body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None):
            raise ReproduceError(f"{path}: parameters cell line {node.lineno}: expected 'name: type = value  # help'")
        try:
            default = ast.literal_eval(node.value)
        except ValueError:
            raise ReproduceError(f"{path}: parameter {node.target.id!r}: the default must be a literal") from None
        rest = lines[node.end_lineno - 1][node.end_col_offset:].strip()
        declared[node.target.id] = {"name": node.target.id, "inferred_type_name": ast.unparse(node.annotation),
                                    "default": default, "help": rest.lstrip("#").strip()}
    return declared


def parse_override(text: str) -> tuple[str, object]:
    """`key=value` with a JSON value (strings may be bare): seeds=[0,1] max_dev=200 encoder=tiny."""
    from mtbert_utils.train import parse_override as parse
    try:
        return parse(text)
    except ValueError as e:
        raise ReproduceError(str(e)) from None


def _check_type(nb: str, key: str, value, spec: dict) -> None:
    want = (spec.get("inferred_type_name") or "None").split("[")[0]
    checks = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "str": lambda v: isinstance(v, str), "bool": lambda v: isinstance(v, bool),
              "list": lambda v: isinstance(v, list), "dict": lambda v: isinstance(v, dict)}
    if want in checks and not checks[want](value):
        raise ReproduceError(f"{nb}: parameter {key!r} must be {want}, got {value!r} ({type(value).__name__})")


def notebook_params(profile: dict, name: str, overrides: dict, results_dir: Path, figures_dir: Path) -> dict:
    declared = declared_parameters(notebook_path(name))
    params = {k: v for k, v in profile.get("params", {}).items() if k in declared}
    own = profile.get("notebook_params", {}).get(name, {})
    unknown = set(own) - set(declared)
    if unknown:
        raise ReproduceError(f"profile {profile['_path']}: {name} has no parameters {sorted(unknown)}; "
                             f"it takes {sorted(declared)}")
    params.update(own)
    params.update({k: v for k, v in overrides.items() if k in declared})
    for key, value in params.items():
        _check_type(name, key, value, declared[key])
    if "results_dir" in declared:
        params["results_dir"] = notebook_relative(results_dir)
    if "figures_dir" in declared:
        params["figures_dir"] = notebook_relative(figures_dir)
    if "profile" in declared:
        params["profile"] = profile["_name"]
    return params


def notebook_modules(nb_path: Path) -> list[Path]:
    """The package modules a notebook runs: those it imports, those they import (top-level and inside
    functions), and so on."""
    import ast
    pkg = Path(__file__).resolve().parent

    def imported(source: str) -> set[str]:
        """mtbert_utils modules a piece of code imports (`from mtbert_utils import x`: x where it is a module)."""
        names = {"__init__"}
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("mtbert_utils.")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mtbert_utils":
                parts = node.module.split(".")
                names |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        return {n for n in names if (pkg / f"{n}.py").is_file()}

    cells = ["".join(c["source"]) for c in json.loads(nb_path.read_text())["cells"] if c["cell_type"] == "code"]
    lines = [ln for src in cells for ln in src.splitlines()]
    # shell (!) and magic (%) lines are not Python: a `pass` at their indent keeps the blocks around them
    todo = imported("\n".join(ln[:len(ln) - len(ln.lstrip())] + "pass" if ln.lstrip().startswith(("!", "%"))
                              else ln for ln in lines))
    done: set[str] = set()
    while todo:
        name = todo.pop()
        done.add(name)
        todo |= imported((pkg / f"{name}.py").read_text()) - done
    return [pkg / f"{n}.py" for n in sorted(done)]


def code_version(nb_path: Path) -> str:
    """Hash of the notebook, the package modules it runs (notebook_modules) and the package's JSON files
    (profiles): a change to any of them re-runs the notebook; a change elsewhere (the benchmark, code
    outside the package) does not."""
    h = hashlib.sha256()
    pkg = Path(__file__).resolve().parent
    for p in notebook_modules(nb_path) + sorted(pkg.rglob("*.json")) + [nb_path]:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def manifest_path(results_dir: Path, name: str) -> Path:
    return results_dir / "executed" / f"{name}.done.json"


def is_complete(results_dir: Path, name: str, params: dict, version: str, data: dict) -> bool:
    """The notebook's manifest records these parameters, this code version and these data files' digests."""
    path = manifest_path(results_dir, name)
    if not path.exists():
        return False
    try:
        done = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    return (done.get("params") == json.loads(json.dumps(params)) and done.get("code_version") == version
            and done.get("data_sha256") == data)


def notebook_data(params: dict) -> dict:
    """Digests of the data files a notebook with these parameters reads: its data_dir (relative to the
    caller's directory), else $MTBERT_DATA_DIR, else the data folder a kernel in notebooks/ finds."""
    from mtbert_utils.data import file_digests, resolve_data_dir
    return file_digests(resolve_data_dir(params.get("data_dir") or None, start=NOTEBOOK_DIR))


def absolute_path(path: str) -> str:
    """A relative path given by the caller, made absolute against the caller's working directory (the
    notebooks run in notebooks/, where the same relative path would point elsewhere)."""
    return str(Path(path).expanduser().resolve()) if path else path


def with_absolute_data_dir(params: dict) -> dict:
    """The parameters as train-only gets them: a relative data_dir resolved against the caller's directory."""
    return {**params, "data_dir": absolute_path(params["data_dir"])} if params.get("data_dir") else params


def for_kernel(params: dict) -> dict:
    """The parameters as papermill gets them: a data_dir given relative to the caller's directory, rewritten
    relative to notebooks/ where the kernel runs (so run files and executed copies name no machine's path)."""
    if not params.get("data_dir"):
        return params
    return {**params, "data_dir": os.path.relpath(absolute_path(params["data_dir"]), NOTEBOOK_DIR)}


# what the notebook kernels get: no progress-bar frames in the executed copies (one line per epoch is
# printed by the training loop itself); a person running a notebook by hand still sees live bars
QUIET_KERNEL_ENV = {"MTBERT_PROGRESS": "lines", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


@contextlib.contextmanager
def patched_environ(values: dict) -> Iterator[None]:
    """os.environ with `values` set (a None value: removed) inside the block, as it was afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    _set_environ(values)
    try:
        yield
    finally:
        _set_environ(saved)


def _set_environ(values: dict) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def kernel_env():
    """The environment of every notebook kernel this run starts: $MTBERT_DATA_DIR resolved once, here,
    against the caller's working directory, and no progress bars. The caller's environment is restored."""
    from mtbert_utils.data import ENV_VAR
    given = os.environ.get(ENV_VAR)
    return patched_environ({**QUIET_KERNEL_ENV, **({ENV_VAR: absolute_path(given)} if given else {})})


def notebook_relative(path: Path) -> str:
    """A folder as a notebook parameter: relative to notebooks/ (where the kernel runs) when it is inside the
    repository, so executed copies and result files name no machine's paths; else absolute."""
    path = path.resolve()
    try:
        path.relative_to(REPO_ROOT)
    except ValueError:
        return str(path)
    return os.path.relpath(path, NOTEBOOK_DIR)


def failed_copy_path(out: Path) -> Path:
    return out.with_name(out.name.replace(".ipynb", ".failed.ipynb"))


def execute(pm, name: str, nb_path: Path, out: Path, params: dict, kernel, log_output: bool) -> None:
    """Run one notebook into `out`. It is executed into a side file first: only a successful run replaces
    the last good executed copy; a failed one is kept beside it as `{name}.failed.ipynb`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    failed, running = failed_copy_path(out), out.with_name(f".{out.stem}.running.ipynb")
    try:
        try:
            pm.execute_notebook(str(nb_path), str(running), parameters=params, cwd=str(NOTEBOOK_DIR),
                                kernel_name=kernel, progress_bar=False, log_output=log_output)
        except BaseException:
            if running.exists():
                os.replace(running, failed)
            raise
    except pm.PapermillExecutionError as e:
        raise ReproduceError(f"notebook {name} failed in cell {e.exec_count} ({e.ename}: {e.evalue}); "
                             f"the executed copy with the traceback is {failed}"
                             f"{'; the last good one is still ' + str(out) if out.exists() else ''}") from None
    except Exception as e:
        where = f"; see {failed}" if failed.exists() else ""
        raise ReproduceError(f"notebook {name} failed ({type(e).__name__}: {e}){where}") from None
    nb = json.loads(running.read_text(encoding="utf-8"))  # papermill records input/output paths: make them travel
    write_json(out, results.relativize(nb), lists_inline=False)  # a notebook: a source line a line, as Jupyter writes
    running.unlink()
    failed.unlink(missing_ok=True)  # the notebook runs now: an older failure is history


def resolve(profile_name: str, only: list[str] | None, overrides: dict | None,
            out_root: str | Path | None) -> tuple[dict, Path, Path, list[tuple[str, dict]]]:
    """(profile, results folder, figures folder, [(notebook, parameters as papermill gets them)]), every
    notebook's parameters validated before any runs."""
    profile = load_profile(profile_name)
    overrides = overrides or {}
    root = Path(out_root) if out_root else REPO_ROOT
    sub = profile.get("out_subdir", "")
    results_dir = (root / "results" / sub).resolve()
    figures_dir = (root / "figures" / sub).resolve()
    names = profile["notebooks"]
    if only:
        missing = [n for n in only if n not in names]
        if missing:
            raise ReproduceError(f"--only {missing}: not in profile {profile['_name']!r} ({names})")
        names = [n for n in names if n in only]
    plan = [(n, notebook_params(profile, n, overrides, results_dir, figures_dir)) for n in names]
    used = {k for _, p in plan for k in p}
    unused = set(overrides) - used
    if unused:
        raise ReproduceError(f"overrides {sorted(unused)} are not parameters of any notebook in this run")
    return profile, results_dir, figures_dir, plan


def run(profile_name: str, only: list[str] | None = None, overrides: dict | None = None,
        out_root: str | Path | None = None, force: bool = False, kernel: str | None = None,
        log_output: bool = False) -> list[dict]:
    """Execute the profile's notebooks in order; stop at the first failure. Returns one record per notebook."""
    import papermill as pm
    from tqdm.auto import tqdm

    profile, results_dir, figures_dir, plan = resolve(profile_name, only, overrides, out_root)
    overrides = overrides or {}
    records = []
    bar = tqdm(plan, desc=f"profile {profile['_name']}", unit="notebook")
    with kernel_env():
        for name, params in bar:
            bar.set_postfix_str(name)
            records.append(run_notebook(pm, profile, name, params, results_dir, force, kernel, log_output))
    log = results_dir / "executed" / "reproduce-log.json"
    if any(r["status"] != "skipped" for r in records) or not log.exists():  # a call that ran nothing keeps the
        write_json(log, {"profile": profile["_name"], "notebooks": records, "overrides": overrides})  # last log
    return records


def run_notebook(pm, profile: dict, name: str, params: dict, results_dir: Path, force: bool, kernel,
                 log_output: bool) -> dict:
    """Execute one notebook of a profile unless it is complete; its manifest records the parameters as given,
    the code version and the digests of the data files (a relative data_dir is the caller's, as here)."""
    from tqdm.auto import tqdm
    nb_path = notebook_path(name)
    version, data = code_version(nb_path), notebook_data(params)
    if not force and is_complete(results_dir, name, params, version, data):
        tqdm.write(f"[skip] {name}: already complete for these parameters, this code and these data files")
        return {"notebook": name, "status": "skipped"}
    t0 = time.time()
    execute(pm, name, nb_path, results_dir / "executed" / f"{name}.ipynb", for_kernel(params),
            kernel, log_output)
    record = {"notebook": name, "status": "ran", "seconds": round(time.time() - t0, 1),
              "params": params, "code_version": version, "data_sha256": data, "profile": profile["_name"]}
    write_json(manifest_path(results_dir, name), record)
    tqdm.write(f"[done] {name} in {record['seconds']:.0f}s")
    return record


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mtbert_utils.reproduce", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu", help=f"built-in {available_profiles()} or a .json path")
    ap.add_argument("--only", action="append", default=[], help="run only these notebooks (repeat or comma-separate)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a notebook parameter (JSON value), e.g. --set seeds=[0] --set max_dev=200")
    ap.add_argument("--out", default=None, help="folder that receives results/ and figures/ (default: the repo)")
    ap.add_argument("--force", action="store_true", help="re-run notebooks even if complete")
    ap.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebook's)")
    ap.add_argument("--log-output", action="store_true", help="stream the notebooks' output")
    ap.add_argument("--list", action="store_true", help="list profiles and notebooks, then exit")
    ap.add_argument("--train-only", action="store_true",
                    help="train every run the profile's notebooks make, without papermill or jupyter")
    ap.add_argument("--jobs", type=int, default=1, help="--train-only: runs at once, as separate processes")
    ap.add_argument("--shard", default="0/1", metavar="K/N",
                    help="--train-only: train runs K, K+N, K+2N, ... of the list (K 0-based: 0 <= K < N)")
    ap.add_argument("--list-runs", action="store_true",
                    help="print the runs --train-only would train (and which are done), then exit")
    return ap


def selection(args) -> tuple[list[str] | None, dict]:
    """The parsed arguments' notebooks (--only, repeated or comma-separated; None: all) and overrides (--set)."""
    only = [n for item in args.only for n in item.split(",") if n]
    return only or None, dict(parse_override(s) for s in args.set)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        for p in available_profiles():
            prof = load_profile(p)
            print(f"{p:14s} {prof.get('description', '')}\n{'':14s} {', '.join(prof['notebooks'])}")
        return 0
    try:
        only, overrides = selection(args)
        t0 = time.time()
        if args.train_only or args.list_runs:
            from mtbert_utils.packing import parse_shard, print_summary, train_only
            summary = train_only(args.profile, only=only, overrides=overrides, out_root=args.out,
                                 jobs=args.jobs, shard=parse_shard(args.shard), list_only=args.list_runs)
            print_summary(summary)
            return 1 if summary["failed"] else 0
        run(args.profile, only=only, overrides=overrides, out_root=args.out, force=args.force,
            kernel=args.kernel, log_output=args.log_output)
    except ReproduceError as e:
        print(f"reproduce: error: {e}", file=sys.stderr)
        return 1
    print(f"profile {args.profile} finished in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    # run main from the package's module, not from this copy named __main__: packing raises the package module's
    # ReproduceError, which this copy's `except ReproduceError` would not catch (a traceback instead of a message)
    from mtbert_utils.reproduce import main as package_main
    sys.exit(package_main())
