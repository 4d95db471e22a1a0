"""Data: read the CS224N multitask files, split, tokenize and batch them.

Reading:   read_task_file -> (examples, report); load_task / load_tasks -> TaskData
Locating:  resolve_data_dir, missing_files, check_data_dir, download
Splitting: split_by_hash (by id, order-free), subsample (seeded)
Batching:  encode_task (tokenize once) -> collate / batch_indices /
           TaskBatchStream (endless, resumable, data parallel) / eval_batches

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
import os
import random
import tempfile
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

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

def resolve_data_dir(data_dir=None):
    """The data_dir argument, else $MTBERT_DATA_DIR, else the repository's data/ folder.

    The repository's data/ is found from wherever the caller runs: ./data, or data/ beside the notebooks/
    folder of an enclosing directory (a notebook runs in notebooks/, in a terminal, JupyterLab or Colab).
    Relative paths are relative to the current directory."""
    if data_dir is None:
        data_dir = os.environ.get(ENV_VAR) or default_data_dir()
    return Path(data_dir).expanduser().resolve()


def default_data_dir() -> Path:
    """./data if it exists, else data/ of the nearest enclosing folder that has notebooks/ and data/ (the
    repository root seen from notebooks/), else ./data (which then fails with the usual message)."""
    here = Path.cwd()
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
            # para train can be carved from quora-dev.csv (see load_task)
            if task == "para" and split == "train" and (data_dir / FILES["para"]["dev"]).is_file():
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
            f"  3. pass data_dir=/path/to/dir to load_task / load_tasks")
    return data_dir


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
            with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url) as r:
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
        full = train if split == "train" else dev
        if n is not None and n < len(full):
            sources[split] += f" (subsample {n} of {len(full)}, seed {seed})"
            if split == "train":
                train = subsample(train, n, seed)
            else:
                dev = subsample(dev, n, seed)
    return TaskData(task, train, dev, test, sources, reports)


def load_tasks(data_dir=None, tasks=TASKS, max_train=None, max_dev=None, seed=0, strict=False, *, warn=True):
    """load_task for each task, after checking the data dir once (all missing files in one error)."""
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
# tokenization and batching

PAIR_MODES = ("joint", "separate", "both")


@dataclass
class EncodedTask:
    """A task's examples tokenized once, unpadded; collate pads per batch."""
    task: str
    ids: list
    labels: torch.Tensor | None          # long for sst, float for para/sts; None if unlabeled
    single: list | None = None           # sst: [CLS] s [SEP]
    joint: list | None = None            # pair tasks: [CLS] a [SEP] b [SEP]
    joint_types: list | None = None      # token type ids for joint
    a: list | None = None                # pair tasks: [CLS] a [SEP]
    b: list | None = None                # pair tasks: [CLS] b [SEP]
    pad_id: int = 0

    def __len__(self):
        return len(self.ids)

    def swapped_joint(self, i):
        """Example i as [CLS] b [SEP] a [SEP] (token types 0 for b, 1 for a), or None where the
        joint encoding was truncated (then the two orders do not hold the same tokens)."""
        a, b = self.a[i], self.b[i]
        if len(a) + len(b) - 1 != len(self.joint[i]):
            return None
        return b + a[1:], [0] * len(b) + [1] * (len(a) - 1)

    def lengths(self, pair_mode="joint"):
        """Per-example token cost, for length grouping."""
        if self.single is not None:
            return [len(s) for s in self.single]
        if pair_mode == "joint":
            return [len(s) for s in self.joint]
        if pair_mode == "separate":
            return [len(x) + len(y) for x, y in zip(self.a, self.b)]
        if pair_mode == "both":
            return [len(j) + len(x) + len(y) for j, x, y in zip(self.joint, self.a, self.b)]
        raise ValueError(f"unknown pair_mode {pair_mode!r}; valid: {PAIR_MODES}")


def encode_task(examples, tokenizer, task, max_length=128):
    """Tokenize every field in one batched call (no padding), truncating to max_length."""
    _check_task(task)
    kw = dict(truncation=True, max_length=max_length, padding=False)
    labeled = bool(examples) and all(ex.label is not None for ex in examples)
    labels = None
    if labeled:
        labels = torch.tensor([ex.label for ex in examples], dtype=torch.long if task == "sst" else torch.float)
    enc = EncodedTask(task, [ex.id for ex in examples], labels,
                      pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    a = [ex.text_a for ex in examples]
    if task == "sst":
        enc.single = tokenizer(a, **kw)["input_ids"] if examples else []
        return enc
    b = [ex.text_b for ex in examples]
    if not examples:
        enc.joint, enc.joint_types, enc.a, enc.b = [], [], [], []
        return enc
    joint = tokenizer(a, b, return_token_type_ids=True, **kw)
    enc.joint, enc.joint_types = joint["input_ids"], joint["token_type_ids"]
    enc.a, enc.b = tokenizer(a, **kw)["input_ids"], tokenizer(b, **kw)["input_ids"]
    return enc


def _pad(seqs, value, multiple=None):
    """(tensor padded to the longest seq in this batch, rounded up to `multiple` if given; attention mask)."""
    width = max((len(s) for s in seqs), default=0)
    if multiple:
        width = -(-width // multiple) * multiple
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return out, mask


def collate(enc, indices, pair_mode="joint", swap=None, pad_to_multiple=None):
    """Batch of enc at indices, padded to the batch's longest sequence (rounded up to pad_to_multiple).

    swap: optional booleans, one per index: those pairs go into the joint input as
    [CLS] b [SEP] a [SEP] (pair-order augmentation / symmetric inference); kept as batch["swap"].
    """
    m = pad_to_multiple
    if pair_mode not in PAIR_MODES:
        raise ValueError(f"unknown pair_mode {pair_mode!r}; valid: {PAIR_MODES}")
    indices = [int(i) for i in indices]
    if swap is not None and len(swap) != len(indices):
        raise ValueError(f"swap has {len(swap)} flags for {len(indices)} examples")
    batch = {}
    if enc.single is not None:
        batch["input_ids"], batch["attention_mask"] = _pad([enc.single[i] for i in indices], enc.pad_id, m)
    else:
        if pair_mode in ("joint", "both"):
            joint = [(enc.joint[i], enc.joint_types[i]) for i in indices]
            if swap is not None:
                joint = [(enc.swapped_joint(i) or j) if s else j for i, j, s in zip(indices, joint, swap)]
            batch["input_ids"], batch["attention_mask"] = _pad([j[0] for j in joint], enc.pad_id, m)
            batch["token_type_ids"], _ = _pad([j[1] for j in joint], 0, m)
        if pair_mode in ("separate", "both"):
            batch["input_ids_a"], batch["attention_mask_a"] = _pad([enc.a[i] for i in indices], enc.pad_id, m)
            batch["input_ids_b"], batch["attention_mask_b"] = _pad([enc.b[i] for i in indices], enc.pad_id, m)
    if enc.labels is not None:
        batch["labels"] = enc.labels[indices]
    batch["ids"] = [enc.ids[i] for i in indices]
    batch["index"] = torch.tensor(indices, dtype=torch.long)
    if swap is not None:
        batch["swap"] = [bool(x) for x in swap]
    return batch


def batch_indices(n, batch_size, rng=None, lengths=None, group_by_length=False):
    """Cut range(n) into batches. rng (random.Random) shuffles; None keeps order.

    group_by_length: shuffle, sort by length inside windows of 50 batches, cut, shuffle
    the batches (bucketing: batches of similar lengths, little padding, still random).
    Without rng it sorts fully by length (evaluation).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = list(range(n))
    if rng is not None:
        rng.shuffle(order)
    if not group_by_length:
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if lengths is None or len(lengths) != n:
        raise ValueError("group_by_length needs one length per example")
    if rng is None:
        order.sort(key=lambda i: lengths[i])  # stable: ties keep file order
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    window = 50 * batch_size
    batches = []
    for w in range(0, n, window):
        chunk = sorted(order[w:w + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)  # else every window would run short-to-long
    return batches


class TaskBatchStream:
    """Endless, reshuffling batch iterator for one task; the trainer keeps one per task.
    Exact resume via state_dict.

    Data parallel: every rank builds the same global batches of batch_size * world_size
    from one permutation (same seed) and yields its rank-th contiguous chunk
    (np.array_split), so the ranks together see each example once per pass. A chunk
    is empty only if the last global batch has fewer than world_size examples.
    """

    def __init__(self, enc, batch_size, seed, pair_mode="joint", group_by_length=False,
                 rank=0, world_size=1, swap_pairs=False, pad_to_multiple=None):
        if len(enc) == 0:
            raise ValueError(f"task {enc.task!r} has no examples to batch")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.enc, self.batch_size, self.seed = enc, batch_size, seed
        self.pair_mode, self.group_by_length = pair_mode, group_by_length
        self.rank, self.world_size = rank, world_size
        self.pad_to_multiple = pad_to_multiple
        # pair-order augmentation: each joint pair is fed as (b, a) with probability 1/2, drawn from
        # (seed, pass, position) so that a resumed stream swaps exactly as the uninterrupted one
        self.swap_pairs = bool(swap_pairs) and enc.single is None and pair_mode == "joint"
        self.lengths = enc.lengths(pair_mode) if group_by_length else None
        self.num_batches = math.ceil(len(enc) / (batch_size * world_size))
        self.rng = random.Random(seed)
        self.passes = 0      # completed passes
        self.position = 0    # next batch in the current pass
        self._new_pass()

    def _new_pass(self):
        self.order = batch_indices(len(self.enc), self.batch_size * self.world_size, self.rng,
                                   self.lengths, self.group_by_length)
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.order[self.position]
        chunk = np.array_split(np.asarray(batch), self.world_size)[self.rank]
        swap = None
        if self.swap_pairs:  # drawn for the global batch, so every rank agrees
            flips = np.random.default_rng([self.seed, self.passes, self.position]).random(len(batch)) < 0.5
            swap = np.array_split(flips, self.world_size)[self.rank].tolist()
        self.position += 1
        if self.position == len(self.order):  # pass done: reshuffle now so state_dict is simple
            self.passes += 1
            self._new_pass()
        return collate(self.enc, chunk.tolist(), self.pair_mode, swap, self.pad_to_multiple)

    def state_dict(self):
        return {"rng_state": self.rng.getstate(), "order": [list(b) for b in self.order],
                "position": self.position, "passes": self.passes, "n": len(self.enc),
                "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state):
        mine = (len(self.enc), self.batch_size, self.world_size)
        theirs = (state["n"], state["batch_size"], state["world_size"])
        if mine != theirs:
            raise ValueError(f"state is for (n, batch_size, world_size) = {theirs}, this stream has {mine}")
        v, internal, gauss = state["rng_state"]
        self.rng.setstate((v, tuple(internal), gauss))  # tuple: survives a json/list round trip
        self.order = [list(b) for b in state["order"]]
        self.position, self.passes = state["position"], state["passes"]


def eval_batches(enc, batch_size, pair_mode="joint", sort_by_length=True, swap=False,
                 pad_to_multiple=None) -> Iterator[dict]:
    """Every example once, sorted by length for speed; batch["index"] restores file order.
    swap=True: every joint pair as (b, a)."""
    lengths = enc.lengths(pair_mode) if sort_by_length else None
    for idx in batch_indices(len(enc), batch_size, None, lengths, sort_by_length):
        yield collate(enc, idx, pair_mode, [True] * len(idx) if swap else None, pad_to_multiple)


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

    if args.cmd == "download":
        for path in download(args.dir, args.names, args.overwrite):
            print(path)
        return
    data = load_tasks(args.dir)
    for task, td in data.items():
        print(f"{task}: {td.sizes}  sources: {td.sources}")
        for name, rep in td.reports.items():
            if rep["skipped"]:
                print(f"  {name}: skipped {rep['skipped']} first lines {rep['first_lines']}")


if __name__ == "__main__":
    main()
