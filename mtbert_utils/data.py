"""Data: read the CS224N multitask files, find them, split them (tokenizing and batching: mtbert_utils.batching).

Reading:   read_task_file -> (examples, report); load_task / load_tasks -> TaskData
Locating:  resolve_data_dir, missing_files, check_data_dir, download; file_digests (what a run read)
Splitting: split_by_hash (by id, order-free), subsample (seeded)

Files are tab-separated with CSV quoting; the first column is a row index.
Columns are found by header name, never by position.

CLI:
    python -m mtbert_utils.data download [DIR]   # fetch the files, check sha256
    python -m mtbert_utils.data check [DIR]      # sizes and skipped rows per task
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import math
import numbers
import os
import random
import tempfile
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path


from mtbert_utils import TASKS  # the one list of task names; the package root imports nothing

FILES = {"sst": {"train": "ids-sst-train.csv", "dev": "ids-sst-dev.csv", "test": "ids-sst-test-student.csv"},
         "para": {"train": "quora-train.csv", "dev": "quora-dev.csv", "test": "quora-test-student.csv"},
         "sts": {"train": "sts-train.csv", "dev": "sts-dev.csv", "test": "sts-test-student.csv"}}
# sha256 of the files at the pinned commit below (quora-train/test-student: not known, so not checked)
SHA256 = {
    "ids-sst-dev.csv": "a186ce94577635fbe10beaaddd50f16cccf6c30973221cefdf90deed2a584bfe",
    "ids-sst-test-student.csv": "bdd5a767faa0c26782117e37767ece154c30d5d04fb8727d09c71e3850a55c7b",
    "ids-sst-train.csv": "03b2b625c090f94a6afd59f114cde5282e2053aab0b101e87ed695d8a0c5b1df",
    "quora-dev.csv": "bfa3cc954a9ba300ae776a980141de65f622a3c1b97e3fd905d63245bc36d5ad",
    "sts-dev.csv": "ce3cad6f16062586ac7ba462c28b010a9be10c530fd5074165860d7b7ab4e93d",
    "sts-test-student.csv": "dee455745b72e9ca3ff74e7c056bd73e34bad5b8d5641045a2c1e7e131866f47",
    "sts-train.csv": "15d12efc2d656fffb1d61ac1f08ec4227f43925fd16f420c037cbd063699c21b",
}
# The files live in data/ of gpoesia/minbert-default-final-project; pinned to a commit
# (March 2023) so the sums above stay valid.
DOWNLOAD_URL = "https://raw.githubusercontent.com/gpoesia/minbert-default-final-project/7ac8260577fc/data/{name}"
ENV_VAR = "MTBERT_DATA_DIR"

# per task: (id column, text columns, label column); the label column is optional (test files)
COLUMNS = {"sst": ("id", ("sentence",), "sentiment"),
           "para": ("id", ("sentence1", "sentence2"), "is_duplicate"),
           "sts": ("id", ("sentence1", "sentence2"), "similarity")}
# per task: valid labels (lowest, highest, whole numbers only, type kept); the one home of the ranges
LABELS = {"sst": (0, 4, True, int),       # 5 classes; "3.0" is class 3, 3.5 is no class
          "para": (0, 1, True, float),    # the quora files write "0.0" / "1.0"
          "sts": (0, 5, False, float)}    # a similarity score
REASONS = ("wrong_field_count", "missing_id", "empty_sentence", "missing_label",
           "non_numeric_label", "label_out_of_range", "field_too_long", "bad_quoting",
           "unbalanced_quote", "duplicate_id", "conflicting_duplicate_id")
MAX_RECORD_LINES = 20  # a quoted field may span lines, but no record spans more than this


@dataclass(frozen=True)
class Example:
    id: str                     # the hex id column
    text_a: str
    text_b: str | None          # None for sst
    label: float | int | None   # sst int 0-4, para float 0/1, sts float 0-5; None if unlabeled
    line: int                   # 1-based physical line where the record starts (header is line 1)


def _check_task(task):
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")


def _parse_label(task, raw):
    """Return (label, None) or (None, reason)."""
    raw = raw.strip()
    if not raw:
        return None, "missing_label"
    try:
        x = float(raw)
    except ValueError:
        return None, "non_numeric_label"
    if not math.isfinite(x):
        return None, "non_numeric_label"
    low, high, whole, kind = LABELS[task]
    if not low <= x <= high or (whole and not x.is_integer()):
        return None, "label_out_of_range"
    return kind(x), None


def _next_record(lines, i):
    """Parse the record that starts at lines[i]: (fields, lines used) or (None, reason).

    A quoted field may run over several lines (CSV), but an unbalanced quote must not swallow the
    rows after it: a record is one line unless its quote closes within MAX_RECORD_LINES lines.
    The caller accepts a multi-line record only if it has the header's field count and no field
    holds a tab (a quote that swallowed rows swallows their tabs too); otherwise
    only its first line is skipped (as unbalanced_quote) and reading goes on at the next line.
    """
    reader = csv.reader(iter(lines[i:i + MAX_RECORD_LINES]), delimiter="\t", strict=True)
    try:
        return next(reader), reader.line_num
    except csv.Error as e:
        if "field limit" in str(e):  # csv's own limit (131072 characters): a corrupt row, not a sentence
            return None, "field_too_long"
        if "unexpected end of data" in str(e):  # the quote never closed
            return None, "unbalanced_quote"
        return None, "bad_quoting"


def read_task_file(path, task, strict=False, *, warn=True):
    """Read one task file. Bad rows are skipped and counted (strict=True: raise on the first).

    Returns (examples, report); report has path, kept, skipped {reason: count},
    first_lines {reason: first 5 line numbers}, labeled (inferred from the header),
    rows (records read), continuation_lines (lines inside multi-line quoted records) and
    duplicates {id: its line numbers}, for ids that occur more than once (first 5 ids).
    Every non-blank line after the header starts a record or continues one:
    rows = kept + sum(skipped).

    Duplicate ids: an exact repeat (same texts and label) is skipped as duplicate_id, the
    first occurrence kept; rows that share an id but disagree are all skipped as
    conflicting_duplicate_id (which one is right cannot be told).
    """
    _check_task(task)
    path = Path(path)
    lines = io.StringIO(_decode(path, task), newline="").readlines()  # splits at \n, \r\n and \r, as csv does
    columns = _header_columns(path, task, lines)
    skips = _Skips(path, strict)
    examples, rows, continued = _read_records(lines, task, columns, skips)
    examples, duplicates = _drop_duplicate_ids(examples, skips)
    first_lines = {r: sorted(ls)[:5] for r, ls in skips.lines.items()}
    if skips.count and warn:  # one warning per file, not per row (the report always has them)
        detail = "; ".join(f"{r}: {n} (lines {first_lines[r]})" for r, n in skips.count.items())
        if duplicates:
            detail += f"; duplicate ids (lines): {duplicates}"
        warnings.warn(f"{path}: skipped {sum(skips.count.values())} bad rows, kept {len(examples)}: {detail}",
                      stacklevel=2)
    report = {"path": str(path), "kept": len(examples), "skipped": skips.count,
              "first_lines": first_lines, "labeled": columns["label"] is not None, "rows": rows,
              "continuation_lines": continued, "duplicates": duplicates}
    return examples, report


def _decode(path: Path, task: str) -> str:
    """The file's text; a clear error for a missing, non-UTF-8 or empty file."""
    if not path.is_file():
        raise FileNotFoundError(f"{task} data file not found: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # -sig: tolerate a BOM from spreadsheet exports
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path} is not UTF-8 (byte {data[e.start]:#x} at line {line}); "
                         f"re-save it as UTF-8") from None
    if not text.strip():
        raise ValueError(f"{path} is empty; expected a tab-separated header and rows")
    return text


def _header_columns(path: Path, task: str, lines: list) -> dict:
    """Positions of the task's columns in the header: {"n", "id", "text": [..], "label" (None: unlabeled)}."""
    header, _ = _next_record(lines, 0)
    if header is None:
        raise ValueError(f"{path}: line 1: the header cannot be parsed")
    id_col, text_cols, label_col = COLUMNS[task]
    needed = (id_col,) + text_cols
    if any(c not in header for c in needed):
        raise ValueError(f"{path}: header is missing columns for task {task!r}: expected "
                         f"{list(needed)} (+ optional {label_col!r}), found {header}")
    return {"n": len(header), "id": header.index(id_col), "text": [header.index(c) for c in text_cols],
            "label": header.index(label_col) if label_col in header else None}


class _Skips:
    """Skipped rows by reason with their line numbers; strict: the first one raises, naming file and line."""

    def __init__(self, path: Path, strict: bool):
        self.path, self.strict, self.count, self.lines = path, strict, {}, {}

    def __call__(self, reason: str, line: int, row=None, detail: str = "") -> None:
        if self.strict:
            raise ValueError(f"{self.path}: line {line}: bad row ({reason}){detail}" + (f": {row!r}" if row else ""))
        self.count[reason] = self.count.get(reason, 0) + 1
        self.lines.setdefault(reason, []).append(line)


def _read_records(lines: list, task: str, columns: dict, skip: _Skips) -> tuple[list, int, int]:
    """Every record after the header as an Example, bad ones skipped. Returns (examples, records read,
    lines that continued a multi-line record)."""
    examples, rows, continued, i = [], 0, 0, 1
    while i < len(lines):
        line = i + 1
        if not lines[i].rstrip("\r\n"):  # blank line (e.g. trailing newline): not a record
            i += 1
            continue
        rows += 1
        row, used = _next_record(lines, i)  # used: lines the record spans, or why it cannot be parsed
        if row is None or (used > 1 and (len(row) != columns["n"] or any("\t" in f for f in row))):
            # a csv error, or a quote that ran over lines into a record of the wrong shape or over the tabs
            # of other rows: skip this line alone
            skip(used if row is None else "unbalanced_quote", line, detail=f" ({len(lines[i])} characters)")
            i += 1
            continue
        i += used
        continued += used - 1
        label, reason = _row_problem(task, row, columns)
        if reason:
            skip(reason, line, row)
            continue
        texts = [row[k].strip() for k in columns["text"]]  # SST sentences start with a space
        examples.append(Example(row[columns["id"]].strip(), texts[0], texts[1] if len(texts) > 1 else None,
                                label, line))
    return examples, rows, continued


def _row_problem(task: str, row: list, columns: dict) -> tuple:
    """(label, None) for a usable row, else (None, the reason to skip it)."""
    if len(row) != columns["n"]:
        return None, "wrong_field_count"
    if not row[columns["id"]].strip():
        return None, "missing_id"
    if any(not row[k].strip() for k in columns["text"]):
        return None, "empty_sentence"
    if columns["label"] is not None:
        return _parse_label(task, row[columns["label"]])
    return None, None


def _drop_duplicate_ids(examples: list, skip: _Skips) -> tuple[list, dict]:
    """Exact repeats of an id: later ones skipped; ids whose rows disagree: every row skipped.
    Returns (the examples kept, {id: line numbers} for the first 5 repeated ids)."""
    first_seen, conflicted, dup_lines, kept = {}, set(), {}, []
    for ex in examples:
        if ex.id in first_seen:
            first = first_seen[ex.id]
            dup_lines.setdefault(ex.id, [first.line]).append(ex.line)
            same = (first.text_a, first.text_b, first.label) == (ex.text_a, ex.text_b, ex.label)
            skip("duplicate_id" if same else "conflicting_duplicate_id", ex.line, None,
                 f" (id {ex.id!r} first on line {first.line})")
            if not same:
                conflicted.add(ex.id)
            continue
        first_seen[ex.id] = ex
        kept.append(ex)
    for ex in kept:  # the first occurrence of a conflicting id goes too
        if ex.id in conflicted:
            skip("conflicting_duplicate_id", ex.line)
    return [ex for ex in kept if ex.id not in conflicted], dict(list(dup_lines.items())[:5])


# -----------------------------------------------------------------------------
# locating and downloading the data

def resolve_data_dir(data_dir=None, start=None):
    """The data_dir argument, else $MTBERT_DATA_DIR, else the repository's data/ folder.

    The repository's data/ is found from wherever the caller runs (or from `start`, a folder such as the
    notebooks/ a kernel runs in): ./data, or data/ beside the notebooks/ folder of an enclosing directory (a
    notebook runs in notebooks/, in a terminal, JupyterLab or Colab). Relative paths are relative to the
    current directory."""
    if data_dir is None:
        data_dir = os.environ.get(ENV_VAR) or default_data_dir(start)
    return Path(data_dir).expanduser().resolve()


def default_data_dir(start=None) -> Path:
    """./data if it exists, else data/ of the nearest enclosing folder that has notebooks/ and data/ (the
    repository root seen from notebooks/), else ./data (which then fails with the usual message); `.` is the
    current directory, or `start` when given."""
    here = Path(start) if start is not None else Path.cwd()
    for folder in (here, *here.parents):
        if (folder / "data").is_dir() and (folder == here or (folder / "notebooks").is_dir()):
            return folder / "data"
    return here / "data"


def missing_files(data_dir, tasks=TASKS, splits=("train", "dev")):
    """Names of the needed files that are not in data_dir."""
    data_dir = Path(data_dir)
    missing = []
    for task in tasks:
        _check_task(task)
        for split in splits:
            name = FILES[task][split]
            if (data_dir / name).is_file():
                continue
            # para train can be carved from quora-dev.csv (see load_task): missing only if that one is too, and
            # then named once, as quora-dev.csv, when dev is asked for as well
            if task == "para" and split == "train" and ((data_dir / FILES["para"]["dev"]).is_file()
                                                       or "dev" in splits):
                continue
            missing.append(name)
    return missing


def check_data_dir(data_dir=None, tasks=TASKS):
    """Resolve the data dir and raise FileNotFoundError naming every missing file."""
    data_dir = resolve_data_dir(data_dir)
    missing = missing_files(data_dir, tasks)
    if missing:
        where = "" if data_dir.is_dir() else " (the directory does not exist)"
        raise FileNotFoundError(
            f"data dir {data_dir}{where} is missing {len(missing)} file(s): {', '.join(missing)}.\n"
            f"Provide them in one of three ways:\n"
            f"  1. python -m mtbert_utils.data download {data_dir}\n"
            f"  2. export {ENV_VAR}=/path/to/dir/with/the/csv/files\n"
            f"  3. pass data_dir=/path/to/dir to load_task / load_tasks (--set data_dir=... to "
            f"python -m mtbert_utils.train, -p data_dir ... to a notebook)"
            + (f"\n{FILES['para']['train']} is optional: without it, para train and dev are carved 80/20 from "
               f"{FILES['para']['dev']}" if "para" in tasks else ""))
    return data_dir


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digests(data_dir=None, tasks=TASKS) -> dict[str, str]:
    """{file name: sha256} of the tasks' files present in the data dir: the files a run reads. Every result
    file records them (data.sha256) and every executed notebook's manifest too, so a run or a notebook made
    from other files (a full quora-train.csv, a corrected file) is never taken as done."""
    folder = resolve_data_dir(data_dir)
    return {name: _sha256(folder / name) for task in tasks for name in FILES[task].values()
            if (folder / name).is_file()}


def digest_changes(recorded: dict, current: dict) -> str:
    """What differs between recorded file digests and the current ones, in words ('' when nothing does)."""
    changes = [f"{n} {'missing now' if n not in current else 'new' if n not in recorded else 'changed'}"
               for n in sorted(set(recorded) | set(current)) if recorded.get(n) != current.get(n)]
    return ", ".join(changes)


def pinned_status(name: str, digest: str) -> str:
    """Whether a file is the CS224N file at the pinned commit (SHA256), in words."""
    if name not in SHA256:
        return "no pinned sum to compare"
    return "the pinned CS224N file" if SHA256[name] == digest else "DIFFERS from the pinned CS224N file"


def download(data_dir=None, names=None, overwrite=False):
    """Download the task files into data_dir; returns the paths of all requested files.

    Checks sha256 where known (mismatch: delete and raise). Writes to a temp file
    and renames, so an interrupted download never leaves a half file behind.
    """
    from tqdm.auto import tqdm
    data_dir = resolve_data_dir(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    if names is None:
        names = [name for task in TASKS for name in FILES[task].values()]
    paths = []
    for name in names:
        dest = data_dir / name
        paths.append(dest)
        want = SHA256.get(name)
        if dest.is_file() and not overwrite:
            if want is None or _sha256(dest) == want:
                continue
            warnings.warn(f"{dest} has the wrong sha256; downloading it again")
        url = DOWNLOAD_URL.format(name=name)
        fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=f".{name}.", suffix=".part")
        try:
            h = hashlib.sha256()
            try:
                response = urllib.request.urlopen(url)
            except urllib.error.URLError as e:  # no network: say what was fetched and the way without it
                os.close(fd)  # the scratch file's descriptor (fdopen, below, would have closed it)
                raise OSError(f"cannot download {url} ({e.reason}): this needs internet; with the files already "
                              f"on disk, point {ENV_VAR} (or data_dir) at their folder instead") from e
            with os.fdopen(fd, "wb") as f, response as r:
                total = int(r.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=name) as bar:
                    for chunk in iter(lambda: r.read(1 << 16), b""):
                        f.write(chunk)
                        h.update(chunk)
                        bar.update(len(chunk))
            if want is not None and h.hexdigest() != want:
                raise ValueError(f"sha256 mismatch for {name} from {url}: got {h.hexdigest()}, "
                                 f"expected {want}; the file was deleted")
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return paths


# -----------------------------------------------------------------------------
# splitting and loading

def _hash_unit(s):
    """Map a string to [0, 1) by sha256: same answer on every machine and run."""
    return int(hashlib.sha256(s.encode("utf-8")).hexdigest()[:16], 16) / 2**64


def split_by_hash(examples, train_fraction=0.8, salt=""):
    """Split by the hash of Example.id: independent of file order and of any seed.

    `salt` gives an independent split of the same ids (the validation split carved
    from a train split that was itself a hash split of quora-dev uses salt 'val:').
    """
    if isinstance(train_fraction, bool) or not isinstance(train_fraction, numbers.Real) or not 0 <= train_fraction <= 1:
        raise ValueError(f"train_fraction must be a number in [0, 1], got {train_fraction!r}")
    train, dev = [], []
    for ex in examples:
        (train if _hash_unit(salt + ex.id) < train_fraction else dev).append(ex)
    return train, dev


def subsample(examples, n, seed):
    """n examples chosen with a seeded rng, in file order; n None or >= len: all."""
    if n is None or n >= len(examples):
        return list(examples)
    if n < 0:
        raise ValueError(f"subsample size must be >= 0, got {n}")
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


@dataclass
class TaskData:
    task: str
    train: list
    dev: list
    test: list           # [] when the test file is absent
    sources: dict        # split -> where it came from (file, hash split, subsample)
    reports: dict        # file name -> report from read_task_file

    @property
    def sizes(self):
        return {"train": len(self.train), "dev": len(self.dev), "test": len(self.test)}


def _per_task(value, task):
    """max_train/max_dev: int (every task), dict task -> int, or None."""
    return value.get(task) if isinstance(value, dict) else value


def load_task(task, data_dir=None, max_train=None, max_dev=None, seed=0, strict=False, *, warn=True):
    """warn=False: skipped rows only in the reports (training records them in its result file; notebook 00
    shows them), not as a warning every time a run loads the data."""
    _check_task(task)
    data_dir = check_data_dir(data_dir, (task,))
    files, reports, sources = FILES[task], {}, {}

    def read(name):
        examples, reports[name] = read_task_file(data_dir / name, task, strict, warn=warn)
        return examples

    if (data_dir / files["train"]).is_file():
        train, dev = read(files["train"]), read(files["dev"])
        sources.update(train=files["train"], dev=files["dev"])
    else:  # only para gets here (check_data_dir): no quora-train.csv, carve train from dev
        train, dev = split_by_hash(read(files["dev"]), 0.8)
        sources.update(train=f"{files['dev']} (hash split, 80%)", dev=f"{files['dev']} (hash split, 20%)")
    has_test = (data_dir / files["test"]).is_file()
    test = read(files["test"]) if has_test else []
    sources["test"] = files["test"] if has_test else None

    # subsample after splitting, so the split never depends on max_train / max_dev
    for split, n in (("train", _per_task(max_train, task)), ("dev", _per_task(max_dev, task))):
        if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1):
            raise ValueError(f"max_{split} for {task!r} must be None (all) or an int >= 1, got {n!r}")
        full = train if split == "train" else dev
        if n is not None and n < len(full):
            sources[split] += f" (subsample {n} of {len(full)}, seed {seed})"
            if split == "train":
                train = subsample(train, n, seed)
            else:
                dev = subsample(dev, n, seed)
    return TaskData(task, train, dev, test, sources, reports)


def load_tasks(data_dir=None, tasks=TASKS, max_train=None, max_dev=None, seed=0, strict=False, *, warn=True):
    """load_task for each task, after checking the data dir once (all missing files in one error); `tasks` is
    a list of task names or one name."""
    tasks = (tasks,) if isinstance(tasks, str) else tasks
    for task in tasks:
        _check_task(task)
    data_dir = check_data_dir(data_dir, tasks)
    return {task: load_task(task, data_dir, max_train, max_dev, seed, strict, warn=warn) for task in tasks}


def source_line(data_dir=None) -> str:
    """The data source in one line, for the notebooks after 00 (which shows the skipped-row report)."""
    folder = check_data_dir(data_dir)
    carved = "" if (folder / FILES["para"]["train"]).is_file() else f"; para train/dev carved 80/20 from {FILES['para']['dev']}"
    return (f"data: CS224N files in {os.path.relpath(folder)}{carved}; rows the loader skips are listed by notebook 00 "
            f"(results/data_skipped_rows.csv) and counted in every run's result file")


# -----------------------------------------------------------------------------
# command line

def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mtbert_utils.data", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download", help="download the task files and check their sha256")
    d.add_argument("dir", nargs="?", default=None, help=f"data dir (default: ${ENV_VAR}, else the repository's data/)")
    d.add_argument("--overwrite", action="store_true", help="download even if present")
    d.add_argument("--names", nargs="*", default=None, help="only these files")
    c = sub.add_parser("check", help="print sizes and skipped rows per task")
    c.add_argument("dir", nargs="?", default=None, help=f"data dir (default: ${ENV_VAR}, else the repository's data/)")
    args = p.parse_args(argv)
    try:
        _run_command(args)
    except (OSError, ValueError) as e:  # a missing folder or file, no network, a wrong sha256: the message alone
        raise SystemExit(f"{p.prog}: error: {e}") from e


def _run_command(args) -> None:
    if args.cmd == "download":
        for path in download(args.dir, args.names, args.overwrite):
            print(path)
        return
    data = load_tasks(args.dir, warn=False)  # the skipped rows are printed below
    for task, td in data.items():
        print(f"{task}: {td.sizes}  sources: {td.sources}")
        for name, rep in td.reports.items():
            if rep["skipped"]:
                print(f"  {name}: skipped {rep['skipped']} first lines {rep['first_lines']}")
    print("sha256 (recorded by every run that reads these files):")
    for name, digest in file_digests(args.dir).items():
        print(f"  {name:26s} {digest[:16]}  {pinned_status(name, digest)}")


if __name__ == "__main__":
    main()
