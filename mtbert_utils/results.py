"""Result files: atomic writes, run metadata, and reading runs back into tables.

Every output is written to a temporary file in the same folder and renamed
over the target, so a crash never leaves a truncated file where a good one stood.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import mtbert_utils

REPO_ROOT = Path(__file__).resolve().parents[1]


def current_umask() -> int:
    """The process's file-creation mask (reading it means setting it: set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix + ".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # make the bytes durable before the rename publishes them
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it owner-only; open() would not have
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def json_text(obj) -> str:
    """`obj` as JSON: two-space indents, keys in their own order, and each list of plain values (numbers, strings,
    or lists of those) on one line, so a run's per-step traces (gradient cosines, examples seen) take half the
    bytes they took at one value a line. numpy values, tuples, sets and paths as _jsonable turns them."""
    plain = json.loads(json.dumps(obj, default=_jsonable))

    def flat(v) -> bool:
        return not isinstance(v, (dict, list)) or (isinstance(v, list) and not any(isinstance(x, (dict, list)) for x in v))

    def text(v, depth: int) -> str:
        if not v or not isinstance(v, (dict, list)) or isinstance(v, list) and all(flat(x) for x in v):
            return json.dumps(v)
        items = ([f"{json.dumps(k)}: {text(x, depth + 1)}" for k, x in v.items()] if isinstance(v, dict)
                 else [text(x, depth + 1) for x in v])
        opening, closing = "{}" if isinstance(v, dict) else "[]"
        return f"{opening}\n" + ",\n".join("  " * (depth + 1) + i for i in items) + f"\n{'  ' * depth}{closing}"
    return text(plain, 0)


def write_json(path: str | Path, obj, lists_inline: bool = True) -> Path:
    """`obj` into `path` atomically, laid out by json_text; lists_inline=False: one value a line throughout
    (json.dumps' indent=2), as an executed notebook keeps its cells' source one line a line."""
    with atomic_path(path) as tmp:
        tmp.write_text((json_text(obj) if lists_inline else json.dumps(obj, indent=2, default=_jsonable)) + "\n")
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_torch(path: str | Path, obj) -> Path:
    import torch
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def save_figure(fig, path: str | Path, **kwargs) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", bbox_inches="tight", **kwargs)
    return path


def _jsonable(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def git_commit(short: bool = False) -> str | None:
    """The code version: the git commit of the repository (with '+dirty' if it has uncommitted changes)."""
    try:
        rev = subprocess.run(["git", "rev-parse", *(["--short"] if short else []), "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "mtbert_utils"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    """Versions and machine facts recorded with every result."""
    import torch
    import transformers
    env = {"mtbert_utils": mtbert_utils.__version__, "git_commit": git_commit(),
           "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name(0)
    return env


def load_runs(folder: str | Path, pattern: str = "*.json") -> list[dict]:
    """Every finished run's result JSON under `folder` (recursively)."""
    runs = []
    for p in sorted(Path(folder).rglob(pattern)):
        try:
            obj = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and obj.get("status") == "finished":
            obj["_path"] = str(p)
            runs.append(obj)
    return runs


# -----------------------------------------------------------------------------
# paths that travel: result files record paths relative to the repository, never the machine's own

def repo_relative(path: str | Path) -> str:
    """`path` relative to the repository root when it lies inside it (as result files record it), else as
    given: a folder outside the clone (a test's tmp folder, a user's --out) stays what the user typed."""
    resolved = Path(path).expanduser().resolve()
    try:
        return resolved.relative_to(REPO_ROOT).as_posix() or "."
    except ValueError:
        return str(path)


def relativize(obj, root: str | Path = REPO_ROOT):
    """A copy of a JSON-like object in which every string holding an absolute path under `root` (the machine
    that wrote it) has that prefix removed; used to migrate files written before paths were recorded relative.
    Only a path's start is a prefix (`/x/old/root/a` is another folder's path and stays); a root of `/` changes
    nothing (every absolute path and every ` / ` in code would lose its slash)."""
    prefix = str(Path(root).resolve()).rstrip("/") + "/"
    if prefix == "/":
        return obj
    if isinstance(obj, str):
        return re.sub(r"(?<![\w.~/-])" + re.escape(prefix), "", obj) if prefix in obj else obj
    if isinstance(obj, list):
        return [relativize(v, root) for v in obj]
    if isinstance(obj, dict):
        return {k: relativize(v, root) for k, v in obj.items()}
    return obj


def write_index(results_dir: str | Path, notebook: str, runs: dict[str, list[dict]]) -> Path:
    """Record which result files this notebook produced, by row name (paths relative to results_dir)."""
    results_dir = Path(results_dir)
    index = {name: [str(Path(r["result_path"]).resolve().relative_to(results_dir.resolve())) for r in rs]
             for name, rs in runs.items()}
    return write_json(results_dir / "runs" / notebook / "index.json", {"notebook": notebook, "runs": index})


def load_index(results_dir: str | Path, notebook: str) -> dict[str, list[dict]]:
    """Row name -> list of run results (read back from their JSON files)."""
    results_dir = Path(results_dir)
    path = results_dir / "runs" / notebook / "index.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run notebooks/{notebook}.ipynb first")
    index = json.loads(path.read_text())
    return {name: [json.loads((results_dir / p).read_text()) for p in paths] for name, paths in index["runs"].items()}
