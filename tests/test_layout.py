"""The package's layering: leaf modules import nothing else of the package (the package root's
constants, such as TASKS, excepted: the root imports nothing), and each fact has one home."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mtbert_utils"
LEAVES = ("data", "model", "tasks", "schedules", "pcgrad", "stats", "distributed")
MODULES = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}


def package_imports(path: Path) -> set[str]:
    """Modules of the package that `path` imports (`from mtbert_utils import TASKS` is the root, not a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("mtbert_utils.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mtbert_utils"):
            if node.module == "mtbert_utils":
                found |= {a.name for a in node.names if a.name in MODULES}
            else:
                found.add(node.module.split(".")[1])
    return found


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaf_modules_import_nothing_else_of_the_package(leaf):
    assert package_imports(PACKAGE / f"{leaf}.py") == set()


def test_the_root_imports_nothing_of_the_package():
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def test_task_names_and_label_ranges_have_one_home():
    import mtbert_utils
    from mtbert_utils import data, model, tasks
    assert data.TASKS is mtbert_utils.TASKS and model.TASKS is mtbert_utils.TASKS
    assert set(data.LABELS) == set(data.COLUMNS) == set(tasks.TASK_SPECS) == set(mtbert_utils.TASKS)
    # no second copy of the ranges in the task table
    assert not any("range" in f for f in tasks.TaskSpec.__dataclass_fields__)


def test_no_undefined_or_unused_names():
    """Pyflakes' rules (ruff's F) over the package, the benchmarks, the tests and the notebooks: an undefined name
    in a test that only a GPU runs (a stale block left by a merge) would fail first there, where each minute is
    scarce; an unused import in a notebook's setup cell sends a reader looking for where it is used."""
    import shutil
    import subprocess
    import sys
    if shutil.which("ruff") is None and subprocess.run([sys.executable, "-m", "ruff", "--version"],
                                                       capture_output=True).returncode != 0:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    root = PACKAGE.parent
    found = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "F", "--no-cache", "--quiet",
                            "mtbert_utils", "benchmarks", "tests", "notebooks"], cwd=root, capture_output=True, text=True)
    assert found.returncode == 0, found.stdout + found.stderr
