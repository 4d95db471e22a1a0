"""The prepared GPU job (benchmarks/gpu_run.py) end to end on CPU, and the MiniLM folder that travels with it.

CUDA-only parts (nvidia-smi, the CUDA benchmark) fail on CPU: the job records that and goes on."""

import csv
import json
import os
import re
import shlex
import shutil
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch

from mtbert_utils import model

from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


def test_minilm_dir_fp16_copy_loads_as_fp32(tiny_minilm, tmp_path, monkeypatch):
    original = {k: v.clone() for k, v in model.load_encoder(str(tiny_minilm)).state_dict().items()}
    dest = model.export_minilm(tmp_path / "fp16", fp16=True, source=tiny_minilm)
    from safetensors.torch import load_file
    assert {v.dtype for v in load_file(str(dest / "model.safetensors")).values() if v.is_floating_point()} \
        == {torch.float16}  # it travels at half the size
    monkeypatch.setenv(model.MINILM_DIR_VAR, str(dest))
    assert model.minilm_path() == dest
    loaded = model.load_encoder("minilm").state_dict()
    assert {v.dtype for v in loaded.values() if v.is_floating_point()} == {torch.float32}
    for k, v in original.items():
        if v.is_floating_point():  # exactly the fp16-rounded weights, back in fp32
            assert torch.equal(loaded[k], v.half().float()), k
    assert model.load_tokenizer("minilm")("a test")["input_ids"][0] == 101  # [CLS] of the shared vocabulary
    monkeypatch.setenv(model.MINILM_DIR_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="MTBERT_MINILM_DIR"):
        model.minilm_path()


def test_packed_minilm_comes_back_byte_for_byte(tiny_minilm, tmp_path):
    """gpu_run packs MiniLM's fp16 weights as byte planes in an xz archive (smaller, to fit the 64 MiB that
    travel); unpacked, every file is the export's, byte for byte."""
    gpu_run = load_benchmark("gpu_run")
    export = model.export_minilm(tmp_path / "export", fp16=True, source=tiny_minilm)
    raw = (export / "model.safetensors").read_bytes()
    assert gpu_run.byte_planes(raw) != raw and gpu_run.byte_planes(gpu_run.byte_planes(raw), inverse=True) == raw
    (tmp_path / "pack").mkdir()
    gpu_run.pack_minilm(tmp_path / "pack", tiny_minilm)
    back = gpu_run.unpack_minilm(tmp_path / "pack" / gpu_run.MINILM_ARCHIVE, tmp_path / "back")
    assert sorted(p.name for p in back.iterdir()) == sorted(p.name for p in export.iterdir())
    assert all((back / p.name).read_bytes() == p.read_bytes() for p in export.iterdir())


def test_data_token_ids_cover_every_id_the_runs_encode(small_data_dir):
    """pack sends only the word-embedding rows of data_token_ids: every id that encode_task gives any split of
    any task (pairs joint and apart, as each para_input encodes them) must be among them, [PAD] too."""
    from mtbert_utils.batching import encode_task
    from mtbert_utils.data import FILES, read_task_file
    gpu_run = load_benchmark("gpu_run")
    tok = model.load_tokenizer("minilm")
    ids = gpu_run.data_token_ids(small_data_dir, tok)
    encoded = set()
    for task, splits in FILES.items():
        for name in splits.values():
            if (small_data_dir / name).exists():
                enc = encode_task(read_task_file(small_data_dir / name, task, warn=False)[0], tok, task)
                for rows in (enc.single,) if task == "sst" else (enc.joint, enc.a, enc.b):
                    encoded.update(i for row in rows for i in row)
    assert len(encoded) > 1000 and encoded <= ids and tok.pad_token_id in ids
    assert len(ids) < len(encoded) + 50 < tok.vocab_size  # whole texts and special tokens only: most rows go


def test_trimmed_minilm_is_the_export_on_its_data_and_nan_elsewhere(tiny_minilm, small_data_dir, tmp_path):
    """MiniLM packed for a data folder: the rows its texts use come back byte for byte, so a run on those data
    computes what it would with every row; the rest are NaN, so any other text gives NaN at once."""
    from mtbert_utils.data import read_task_file
    gpu_run = load_benchmark("gpu_run")
    export = model.export_minilm(tmp_path / "export", fp16=True, source=tiny_minilm)
    (tmp_path / "pack").mkdir()
    gpu_run.pack_minilm(tmp_path / "pack", tiny_minilm, small_data_dir)
    back = gpu_run.unpack_minilm(tmp_path / "pack" / gpu_run.MINILM_ARCHIVE, tmp_path / "back")
    tok = model.load_tokenizer(str(back))
    ids = sorted(gpu_run.data_token_ids(small_data_dir, tok))
    record = json.loads((back / gpu_run.TRIM_RECORD).read_text())
    assert record["rows_kept"] == len(ids) and record["rows_not_sent"] == tok.vocab_size - len(ids)
    from mtbert_utils.data import file_digests  # the files a run reads, as every result file records them
    assert record["data_sha256"] == file_digests(small_data_dir) and len(record["data_sha256"]) == 7
    full, trimmed = (model.load_encoder(str(d)).eval() for d in (export, back))
    key = "embeddings.word_embeddings.weight"
    a, b = full.state_dict(), trimmed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k != key)
    sent = torch.zeros(tok.vocab_size, dtype=torch.bool)
    sent[ids] = True
    assert torch.equal(a[key][sent], b[key][sent]) and b[key][~sent].isnan().all()

    sentences = [e.text_a for e in read_task_file(small_data_dir / "ids-sst-dev.csv", "sst", warn=False)[0][:8]]
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        a, b = full(**batch).last_hidden_state, trimmed(**batch).last_hidden_state
        # the same weights wherever the data look: only a library's summation order could differ (BLAS may take
        # another path for other memory alignment), a few fp32 roundings per layer; a NaN row used would show as NaN
        assert not b.isnan().any()
        tol = 64 * torch.finfo(torch.float32).eps
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)
        other = next(t for t in tok.convert_ids_to_tokens(range(2000, tok.vocab_size))
                     if t.isalpha() and tok.convert_tokens_to_ids(t) not in ids)
        unseen = tok([f"a {other} here"], return_tensors="pt")
        assert trimmed(**unseen).last_hidden_state.isnan().any() and not full(**unseen).last_hidden_state.isnan().any()


def test_restore_refuses_data_other_than_the_trimmed_minilm_was_packed_for(tiny_minilm, small_data_dir, tmp_path):
    gpu_run = load_benchmark("gpu_run")
    pack = tmp_path / "pack"
    gpu_run.pack(pack, small_data_dir, tiny_minilm)
    env = {}
    assert gpu_run.restore(pack, env, tmp_path / "tmp") == {"minilm": env["MTBERT_MINILM_DIR"],
                                                            "data": "(--tmp)/cs224n"}
    other = tmp_path / "other"
    shutil.copytree(small_data_dir, other)
    with open(other / "sts-dev.csv", "a", encoding="utf-8") as f:
        f.write("9999\tnew1\tan unseen sentence\tanother one\t3.0\n")
    with tarfile.open(pack / "data.tar.xz", "w:xz") as tar:  # the data packed again, MiniLM not
        for f in sorted(other.glob("*.csv")):
            tar.add(f, arcname=f.name)
    with pytest.raises(SystemExit, match=r"\(sts-dev.csv changed\): pack again"):
        gpu_run.restore(pack, {}, tmp_path / "tmp2")


def test_the_monitors_log_each_query_and_cost_nothing_without_nvidia_smi(tmp_path):
    """gpu_run's nvidia-smi loops: one file per MONITORS entry, each its own query (the GPU's utilization, each
    process's memory); without nvidia-smi (this CPU machine) none starts and the job goes on."""
    gpu_run = load_benchmark("gpu_run")
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho \"$@\"\n")
    fake.chmod(0o755)
    procs = gpu_run.start_monitors(tmp_path, command=str(fake))
    for proc in procs:
        proc.wait(timeout=30)
    assert len(procs) == len(gpu_run.MONITORS) == 2
    for name, query in gpu_run.MONITORS.items():
        assert (tmp_path / name).read_text().split() == [query, "--format=csv", "-l", "5"]
    assert "--query-compute-apps=" in gpu_run.MONITORS["gpu-processes.csv"]
    assert gpu_run.start_monitors(tmp_path, command=str(tmp_path / "no-such-command")) == []


def test_minilm_dir_leaves_run_names_alone(tiny_minilm, monkeypatch):
    from mtbert_utils import plans
    args = dict(encoder="minilm", data_dir="", max_train={}, max_dev=0, batch_size=64, epochs=5,
                order=["sst", "para", "sts"], progress=False)
    before = plans.sequential(**args)["sequential-baseline"]
    monkeypatch.setenv(model.MINILM_DIR_VAR, str(tiny_minilm))
    after = plans.sequential(**args)["sequential-baseline"]
    assert after.run_name == before.run_name and after.encoder == "minilm"


def test_unpack_refuses_paths_outside_results(tmp_path):
    gpu_run = load_benchmark("gpu_run")
    bad = tmp_path / "bad.tar.gz"
    (tmp_path / "x").write_text("x")
    with tarfile.open(bad, "w:gz") as tar:
        tar.add(tmp_path / "x", arcname="mtbert_utils/evil.py")
    with pytest.raises(SystemExit, match="refusing"):
        gpu_run.unpack(bad, tmp_path / "into")


def test_unpack_writes_new_files_and_keeps_those_there_that_differ(tmp_path, capsys):
    """A GPU archive held train-only summaries ("0 trained, 18 reused") that would have replaced the committed ones
    recording how the runs were trained: unpack writes the new files, skips the identical ones (untouched) and keeps
    and lists those whose bytes differ; --replace replaces them."""
    gpu_run = load_benchmark("gpu_run")
    src, into, archive = tmp_path / "src", tmp_path / "into", tmp_path / "gpu_results.tar.gz"
    archived = {"figures/p.svg": "<svg/>", "results/p/executed/train-only.json": '{"trained": 0, "reused": 18}',
                "results/p/gpu_run/timings.json": '{"seconds": 9}', "results/p/runs/new.json": "new",
                "results/p/runs/same.json": "same"}
    for name, text in archived.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    gpu_run.write_tar(archive, src, sorted(archived))
    there = {"results/p/executed/train-only.json": '{"trained": 18, "reused": 0}',  # committed
             "results/p/gpu_run/timings.json": '{"seconds": 500}', "results/p/runs/same.json": "same"}
    for name, text in there.items():
        (into / name).parent.mkdir(parents=True, exist_ok=True)
        (into / name).write_text(text)
    os.utime(into / "results/p/runs/same.json", (1, 1))

    assert gpu_run.unpack(archive, into) == ["figures/p.svg", "results/p/runs/new.json"]
    assert all((into / name).read_text() == text for name, text in there.items())  # nothing replaced
    assert (into / "results/p/runs/same.json").stat().st_mtime == 1  # identical: not even rewritten
    printed = capsys.readouterr().out
    assert "results/p/executed/train-only.json" in printed and "results/p/gpu_run/timings.json" in printed
    assert f"unpack {archive} --into {into} --replace" in printed

    assert gpu_run.main(["unpack", str(archive), "--into", str(into), "--replace"]) == 0
    assert all((into / name).read_text() == text for name, text in archived.items())
    assert gpu_run.unpack(archive, into) == []  # all there now, identical
    assert "kept" not in capsys.readouterr().out


def test_run_logs_go_to_a_folder_named_by_the_start_time(tmp_path):
    """Every call's logs get their own folder, gpu_run-YYYYMMDD-HHMMSS (UTC start), so none replaces an earlier
    session's committed gpu_run/; a job with no time for any step (budget 5 s) still writes and packs them."""
    gpu_run = load_benchmark("gpu_run")
    root, out, pack = tmp_path / "root", tmp_path / "out", tmp_path / "pack"
    pack.mkdir()  # empty: nothing to restore
    earlier = root / "results" / "smoke" / "gpu_run" / "timings.json"
    earlier.parent.mkdir(parents=True)
    earlier.write_text("an earlier session's")
    t0 = time.time()
    assert gpu_run.main(["run", "--profile", "smoke", "--budget", "5", "--no-train", "--then", "", "--pytest",
                         "--pack-dir", str(pack), "--root", str(root), "--tmp", str(tmp_path / "tmp"),
                         "--out", str(out)]) == 0
    t1 = time.time()
    folders = sorted(p.name for p in (root / "results" / "smoke").iterdir())
    assert len(folders) == 2 and folders[0] == "gpu_run" and earlier.read_text() == "an earlier session's"
    name = folders[1]
    assert re.fullmatch(r"gpu_run-\d{8}-\d{6}", name), name
    started = datetime.strptime(name, "gpu_run-%Y%m%d-%H%M%S").replace(tzinfo=timezone.utc).timestamp()
    assert int(t0) <= started <= t1
    with tarfile.open(out / gpu_run.ARCHIVE) as tar:
        names = tar.getnames()
    assert f"results/smoke/{name}/timings.json" in names and all(n.startswith(f"results/smoke/{name}/") for n in names)
    assert gpu_run.default_log_name(0) == "gpu_run-19700101-000000"


def test_pack_checks_the_data_folder_before_packing_minilm(tmp_path, monkeypatch):
    """Without csv files, pack stops at once (not after ~40 s of MiniLM) and leaves the pack folder as it was."""
    gpu_run = load_benchmark("gpu_run")
    monkeypatch.setattr(gpu_run, "pack_minilm", lambda *a: pytest.fail("MiniLM packed before the data were checked"))
    empty, dest = tmp_path / "empty", tmp_path / "pack"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no CS224N csv files in"):
        gpu_run.main(["pack", "--dest", str(dest), "--data", str(empty)])
    assert not dest.exists()  # no half-made folder
    dest.mkdir()
    (dest / "data.tar.xz").write_text("an earlier pack")
    with pytest.raises(SystemExit, match="no CS224N csv files in"):
        gpu_run.pack(dest, empty, None)
    assert (dest / "data.tar.xz").read_text() == "an earlier pack"


@pytest.mark.slow
def test_pack_run_unpack_on_cpu(tiny_minilm, small_data_dir, tmp_path, monkeypatch):
    """pack (tiny data, a tiny 'MiniLM'), run the smoke profiles with 2 jobs, unpack into a fresh folder."""
    gpu_run = load_benchmark("gpu_run")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MTBERT_DATA_DIR", raising=False)
    pack, root, out, into = (tmp_path / d for d in ("pack", "root", "out", "into"))
    assert gpu_run.main(["pack", "--dest", str(pack), "--data", str(small_data_dir),
                         "--minilm-src", str(tiny_minilm)]) == 0
    assert (pack / gpu_run.MINILM_ARCHIVE).exists() and (pack / "data.tar.xz").exists()

    rc = gpu_run.main(["run", "--profile", "smoke", "--set", "seeds=[0]", "--jobs", "2", "--then", "smoke-best",
                       "--then-seeds", "1", "--then-min", "0", "--budget", "400", "--warm-compile", "120",
                       "--pack-dir", str(pack),
                       "--root", str(root), "--tmp", str(tmp_path / "tmp"), "--out", str(out), "--pytest"])
    first = [p.name for p in (root / "results" / "smoke").glob("gpu_run*")]  # the default: gpu_run-<UTC start>
    assert len(first) == 1 and re.fullmatch(r"gpu_run-\d{8}-\d{6}", first[0]), first
    first = first[0]
    timings = json.loads((root / "results" / "smoke" / first / "timings.json").read_text())
    steps = {s["step"]: s["status"] for s in timings["steps"]}
    assert rc == 0, steps
    assert steps["minilm-check"] == "ok"  # the fp16 copy loads as fp32 from the restored folder
    assert not (pack / "minilm").exists()  # removed after the call: a dry run adds nothing that would travel
    assert steps["train-smoke"] == "ok" and steps["train-smoke-best"] == "ok" and "pytest" not in steps  # none asked
    assert steps["compare"].startswith("skipped")  # retrained apart, but the repository has no smoke runs
    if not torch.cuda.is_available():
        assert steps["bench"] != "ok"  # recorded, not fatal
    assert timings["restored"]["data"] == "(--tmp)/cs224n"  # the machine's folders are not recorded
    assert all(not s["command"].startswith("/") for s in timings["steps"] if "command" in s)  # "python3 -m ..."
    assert "--train-only --out . " in next(s["command"] for s in timings["steps"] if s["step"] == "train-smoke")

    names = gpu_run.unpack(out / gpu_run.ARCHIVE, into)
    assert not [n for n in names if "checkpoints" in n or n.endswith(".pt")]
    smoke_runs = sorted(p.name for p in (into / "results" / "smoke" / "runs").glob("*.json"))
    assert len(smoke_runs) == 6 and smoke_runs == sorted(p.name for p in (root / "results" / "smoke" / "runs").glob("*.json"))
    # --warm-compile: before the training, one tiny run of each kind of step, apart in --tmp (names of their own)
    order = [s["step"] for s in timings["steps"]]
    assert steps["warm-compile"] == "ok" and order.index("warm-compile") + 1 == order.index("train-smoke"), order
    warm = sorted(p.name for p in (tmp_path / "tmp" / "warm-compile" / "results" / "smoke" / "runs").glob("*.json"))
    assert len(warm) == 3 and not set(warm) & set(smoke_runs), warm
    assert len(list((into / "results" / "smoke-best" / "runs").glob("best-*-seed1.json"))) == 1
    assert (into / "results" / "smoke" / first / "train-smoke.log").exists()
    assert (into / "results" / "smoke" / "executed" / "train-only.json").exists()

    # a second call on the same (warm) machine, whose new copy of the tree lacks the first call's run files:
    # they come back from the pack folder and are reused, its logs go to their own folder, the CUDA-only tests
    # run last (the default list; skipped on CPU), and the archive holds only what changed
    assert (pack / gpu_run.CARRIED).exists()
    for f in (root / "results" / "smoke" / "runs").glob("*.json"):
        f.unlink()
    rc = gpu_run.main(["run", "--profile", "smoke", "--set", "seeds=[0]", "--jobs", "2", "--then", "",
                       "--shard", "1/2",
                       "--bench-max", "0", "--no-accuracy", "--log-name", "gpu_run-2", "--budget", "200",
                       "--pack-dir", str(pack),
                       "--root", str(root), "--tmp", str(tmp_path / "tmp"), "--out", str(out)])
    second = json.loads((root / "results" / "smoke" / "gpu_run-2" / "timings.json").read_text())
    steps = {s["step"]: s["status"] for s in second["steps"]}
    assert rc == 0 and steps["train-smoke"] == steps["pytest"] == "ok", steps  # the default CUDA tests, skipped here
    log = (root / "results" / "smoke" / "gpu_run-2" / "pytest.log").read_text()
    assert f"{len(gpu_run.CUDA_TESTS)} skipped" in log  # each default node id exists (a missing one is an error)
    assert re.search(r"test_cuda_training_steps_make_no_host_sync SKIPPED .*\d(us|ms|s)\n", log), log  # its time
    assert steps["bench"].startswith("skipped")
    assert "--accuracy" not in next(c["command"] for c in second["steps"] if c["step"] == "bench")
    assert " --accuracy --levers " in next(c["command"] for c in timings["steps"] if c["step"] == "bench")
    summary = json.loads((root / "results" / "smoke" / "gpu_run-2" / "smoke-train-only-shard1of2.json").read_text())
    assert summary["shard"] == "1/2" and summary["reused"] == 3 and summary["trained"] == 0  # every 2nd run of 6
    with tarfile.open(out / gpu_run.ARCHIVE) as tar:
        names = tar.getnames()
    assert not [n for n in names if "/runs/" in n]  # nothing retrained, so no run file travels back again
    assert (root / "results" / "smoke" / first / "timings.json").exists()  # the first call's logs stay
    gpu_run.unpack(out / gpu_run.ARCHIVE, into)  # beside the first call's, in their own folder
    assert (into / "results" / "smoke" / first / "timings.json").exists()
    assert (into / "results" / "smoke" / "gpu_run-2" / "timings.json").exists()


def test_packing_timeline_sums_the_rates_of_the_runs_training_together():
    """benchmarks/packing_timeline.py on numbers worked by hand: run a trains one heads-only then one full
    epoch of 100 examples, 10 s each, from t=0; run b one full epoch of 50 examples from t=10."""
    timeline, pool_starts = (getattr(load_benchmark("packing_timeline"), f) for f in ("timeline", "pool_starts"))

    def run(epochs):
        seen, history = 0, []
        for n, trainable in epochs:
            seen += n
            history.append({"examples_seen": {"sst": seen}, "epoch_time_s": 10.0, "encoder_trainable": trainable})
        return {"wall_time_s": 10.0 * len(epochs), "train_time_s": 10.0 * len(epochs), "history": history}
    summary = {"jobs": 2, "runs": [{"run_name": "a", "status": "trained", "seconds": 20.0, "start_s": 0.0},
                                   {"run_name": "b", "status": "trained", "seconds": 10.0, "start_s": 10.0}]}
    rows = timeline(summary, {"a": run([(100, False), (100, True)]), "b": run([(50, True)])}, 10, None)
    from mtbert_utils.budget import HEADS_ONLY_COST
    assert [(r["from_s"], r["runs_training"], r["full_ex_per_s"], r["heads_only_ex_per_s"]) for r in rows] == [
        (0, 1, 0, 10), (10, 2, 15, 0)]
    assert rows[0]["full_step_equivalents_per_s"] == round(10 * HEADS_ONLY_COST)
    # without start_s: a pool of `jobs` slots in the submitted order
    assert pool_starts(["a", "b", "c"], {"a": 5.0, "b": 3.0, "c": 1.0}, 2) == {"a": 0.0, "b": 0.0, "c": 3.0}


def test_packing_timeline_without_a_summary_simulates_packings_pool(data_dir, tmp_path, monkeypatch, capsys):
    """GPU session 3's call was stopped before it wrote a train-only summary: `--jobs N` takes the folder's finished
    runs and starts them as packing would, costliest first (budget.relative_cost), each for its wall time. Two
    committed gpu-minilm runs, the short one listed first: with one slot the tuned run still starts at 0."""
    monkeypatch.setenv("MTBERT_DATA_DIR", str(data_dir))
    timeline = load_benchmark("packing_timeline")
    src, runs = ROOT / "results" / "gpu-minilm" / "runs", tmp_path / "back" / "runs"
    runs.mkdir(parents=True)
    short, tuned = "rr_under-baseline-b66b3d54-seed0", "rr_over-tuned-linear-ba73b4f3-seed0"
    for name in (short, tuned):
        shutil.copy2(src / f"{name}.json", runs / f"{name}.json")
    (runs / "index.json").write_text("{}")  # not a run: no status
    walls = {n: json.loads((runs / f"{n}.json").read_text())["wall_time_s"] for n in (short, tuned)}
    summary, order, read = timeline.pool_summary(runs, 1)
    assert set(read) == {short, tuned}  # read once, for main's timeline too
    assert order == [tuned, short] and summary["jobs"] == 1
    assert summary["runs"] == [{"run_name": n, "status": "trained", "seconds": walls[n]} for n in order]
    out = tmp_path / "timeline.csv"
    assert timeline.main([str(tmp_path / "back"), "--jobs", "1", "--bin", "60", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    # one slot: two runs share only the bin in which one hands over to the other
    assert [r["runs_training"] for r in rows].count("2") == 1 and {r["runs_training"] for r in rows} == {"1", "2"}
    handover = next(float(r["from_s"]) for r in rows if r["runs_training"] == "2")
    assert handover <= walls[tuned] < handover + 60  # the tuned run first, the short one after it
    last = float(rows[-1]["from_s"])
    assert last <= walls[tuned] + walls[short] < last + 60  # the short run started when the tuned one ended
    capsys.readouterr()
    for bad in (["--jobs", "2", "--summary", str(out)], ["--jobs", "2", "--legacy-order"]):
        with pytest.raises(SystemExit) as e:
            timeline.main([str(tmp_path / "back"), *bad])
        assert e.value.code == 2 and "--jobs is for a folder with no summary" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        timeline.main([str(tmp_path), "--jobs", "2"])  # no runs folder with a finished run
    assert e.value.code == 2 and "no finished run JSON" in capsys.readouterr().err


def test_packing_timeline_plots_timelines_on_one_clock(tmp_path, capsys):
    """--plot draws each --csv timeline (as packing_timeline.csv has them) into one PNG; docs/gpu.md shows the
    committed figure of GPU sessions 1, 3 and 4 with the command that draws it."""
    timeline = load_benchmark("packing_timeline")
    rows = [{"from_s": 0, "runs_training": 2, "full_ex_per_s": 10, "heads_only_ex_per_s": 0,
             "full_step_equivalents_per_s": 10}, {"from_s": 30, "runs_training": 1, "full_ex_per_s": 5,
                                                 "heads_only_ex_per_s": 3, "full_step_equivalents_per_s": 6}]
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    for path, part in ((a, rows), (b, rows[:1])):  # a one-row timeline too
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(part)
    fig = timeline.plot({"a": list(csv.DictReader(a.open())), "b": list(csv.DictReader(b.open()))})
    top, bottom = fig.axes
    assert [t.get_text() for t in top.get_legend().get_texts()] == ["a", "b"]
    stairs = top.patches  # one StepPatch a timeline, its values the rows'
    assert [list(p.get_data().values) for p in stairs] == [[10.0, 6.0], [10.0]]
    assert [list(p.get_data().edges) for p in stairs] == [[0.0, 30.0, 60.0], [0.0, 30.0]]
    assert [list(p.get_data().values) for p in bottom.patches] == [[2.0, 1.0], [2.0]]
    out = tmp_path / "fig" / "timelines.png"
    assert timeline.main(["--plot", str(out), "--csv", f"a=b={a}", "--csv", f"b={b}"]) == 0  # labels may hold "="
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    for bad in (["--plot", str(out)], ["--plot", str(out), "--csv", f"a={a}", str(tmp_path)]):
        with pytest.raises(SystemExit) as e:
            timeline.main(bad)
        assert e.value.code == 2 and "--plot draws --csv" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        timeline.main(["--plot", str(out), "--csv", str(a)])  # no label
    assert "LABEL=PATH" in str(e.value.code)
    doc = " ".join((ROOT / "docs" / "gpu.md").read_text().replace("\\\n", " ").split())
    assert "](../figures/bench/packing_timelines.png)" in doc and (ROOT / "figures" / "bench" / "packing_timelines.png").exists()
    for csv_path in ("results/gpu-minilm/gpu_run/packing_timeline.csv",
                     "results/gpu-minilm/gpu_run-3-graphs/packing_timeline.csv",
                     "results/gpu-minilm/gpu_run-4-mps/packing_timeline.csv"):
        assert f"={csv_path}\"" in doc


def test_mps_starts_checks_and_stops_or_falls_back(tmp_path, monkeypatch):
    """--mps with a stand-in nvidia-cuda-mps-control that logs its calls: missing, it is reported and nothing
    changes; when the CUDA check fails (as on this CPU) the daemon is stopped again and the environment restored;
    when it passes, the clients' environment names the daemon's pipe folder, and stop_mps quits it."""
    gpu_run = load_benchmark("gpu_run")
    calls, bin_dir = tmp_path / "calls.txt", tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / gpu_run.MPS_CONTROL
    fake.write_text(f'#!/bin/sh\necho "args=$* stdin=$(cat -) pipe=$CUDA_MPS_PIPE_DIRECTORY" >> {calls}\n')
    fake.chmod(0o755)
    log_dir = tmp_path / "logs"
    log_dir.mkdir()

    env, steps = {"PATH": "/usr/bin:/bin"}, []
    assert gpu_run.start_mps(env, tmp_path, log_dir, steps).startswith("not available")
    assert env == {"PATH": "/usr/bin:/bin"} and steps == []

    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    before = dict(env)
    if not torch.cuda.is_available():
        status = gpu_run.start_mps(env, tmp_path, log_dir, steps)
        assert status.startswith("failed at mps-check") and env == before
        assert [s["step"] for s in steps] == ["mps-start", "mps-check"]
        assert calls.read_text().splitlines()[-1].startswith("args= stdin=quit")  # stopped again
    monkeypatch.setattr(gpu_run, "CUDA_CHECK", "print('ok')")
    steps.clear()
    assert gpu_run.start_mps(env, tmp_path, log_dir, steps) == "on"
    assert env["CUDA_MPS_PIPE_DIRECTORY"] == str(tmp_path / "mps-pipe") and (tmp_path / "mps-pipe").is_dir()
    gpu_run.stop_mps(env)
    assert calls.read_text().splitlines()[-2:] == [f"args=-d stdin= pipe={tmp_path / 'mps-pipe'}",
                                                   f"args= stdin=quit pipe={tmp_path / 'mps-pipe'}"]


def gpu_run_argv(line: str) -> list[str]:
    """The arguments of the `benchmarks/gpu_run.py` call in a shell line (a comment, the shell's redirections and
    pipes left out)."""
    return shlex.split(line.split("benchmarks/gpu_run.py", 1)[1].split(" #")[0].split("2>&1")[0].split("|")[0])


def gpu_run_commands(text: str):
    """The argument lists of every `benchmarks/gpu_run.py` call in a text's ```bash blocks."""
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.lstrip().startswith("#") or "benchmarks/gpu_run.py" not in line:
                continue
            yield gpu_run_argv(line)


def test_the_gpu_run_commands_in_the_docs_parse():
    """A GPU session pastes docs/gpu.md's commands as they are: a flag renamed in gpu_run.py must not leave a
    command there that stops at its first word, minutes of device time later."""
    from mtbert_utils.reproduce import parse_override
    gpu_run = load_benchmark("gpu_run")
    calls = [c for doc in ("docs/gpu.md", "README.md") for c in gpu_run_commands((ROOT / doc).read_text())]
    assert len(calls) >= 6 and any("--jobs" in c for c in calls), calls
    for argv in calls:
        args = gpu_run.build_parser().parse_args(argv)  # argparse exits (SystemExit) on an unknown flag
        for item in getattr(args, "set", []):
            parse_override(item)  # KEY=VALUE, as reproduce --set reads it


def test_the_gpu_sessions_to_come_are_the_ones_the_docs_show():
    """gpu_run.SESSIONS is the one home of the GPU sessions to come; docs/gpu.md shows every call word for word, in
    order, with its timeout and carry, and each fits the device tool: under 2,000 characters and 600 s, its
    --budget 20 s under its timeout (the archive is written before the tool stops the command), and a session's
    two calls within its 15 minutes with a 2-minute start. The plan they carry out: paper-minilm's seed 0 and then
    the short runs of seeds 1 and 2, twice (the second call, on the warm machine and carrying nothing, so that the
    first call's runs and checkpoints stay, resumes what the budget stopped); its tuned runs of seed 1, then of
    seed 2, 3 at once, again in two such calls; then gpu-minilm with all 18 runs at once."""
    gpu_run = load_benchmark("gpu_run")
    from mtbert_utils.reproduce import parse_override
    flat = lambda text: " ".join(text.replace("\\\n", " ").split())
    docs = flat((ROOT / "docs" / "gpu.md").read_text())
    calls = [c for session in gpu_run.SESSIONS for c in session["calls"]]
    at = [docs.find(flat(c["command"])) for c in calls]
    assert -1 not in at and at == sorted(at), "docs/gpu.md must show gpu_run.SESSIONS' calls in order"
    sessions = []
    for session in gpu_run.SESSIONS:
        parsed = []
        assert len(session["calls"]) == 2 and sum(c["timeout_s"] for c in session["calls"]) + 120 <= 15 * 60
        for c in session["calls"]:
            assert f"timeout_s {c['timeout_s']}" in docs and c["kind"] == "nvidia-h200"
            args = gpu_run.build_parser().parse_args(gpu_run_argv(c["command"]))
            assert args.budget + 20 <= c["timeout_s"] and len(c["command"]) <= 2000 and c["timeout_s"] <= 600
            assert args.bench_max == 0 and args.pytest == gpu_run.CUDA_TESTS  # the CUDA-only tests, with the time left
            assert args.log_name is None  # a folder named by the call's start: a session made again adds its own
            parsed.append((args, dict(parse_override(s) for s in args.set)))
        sessions.append(parsed)
    assert "`kind` nvidia-h200" in docs and "`carry` nothing" in docs  # the card of sessions 1-4: rates compare
    a, b1, b2, c = sessions
    expected = [(x, [0], None, 6) for x in a] + [(x, [1], gpu_run.TUNED, 3) for x in b1] \
        + [(x, [2], gpu_run.TUNED, 3) for x in b2]
    for (args, overrides), seed, only, jobs in expected:
        assert args.profile == "paper-minilm" and args.root == str(ROOT)  # the profile's own runs, to commit
        assert overrides["speed"]["cuda_graphs"] and overrides["speed"]["fuse_tasks"] and args.mps
        assert overrides["seeds"] == seed and args.only == only and args.jobs == jobs and not args.no_train
    for args, _ in a:  # seed 0, then the short runs of seeds 1 and 2: the second call does what the first left
        assert (args.then, args.then_seeds, args.then_jobs, args.then_only) == ("paper-minilm", "1,2", 6, gpu_run.SHORT)
    assert all(args.then == "" for args, _ in b1 + b2)
    (c1, _), (c2, _) = c
    assert c1.profile == "gpu-minilm" and c1.jobs == 18 and c1.mps and c1.root == "/tmp/fresh"  # retrained apart
    assert c2.no_train and c2.no_accuracy
    carries = [[call["carry"] for call in session["calls"]] for session in gpu_run.SESSIONS]
    assert carries == [[[".gpu"], []]] * 3 + [[[".gpu"], [".gpu"]]]  # carrying .gpu again replaces its state
    assert [only for session in gpu_run.SESSIONS for _, only, _ in session["runs"]] == [
        None, gpu_run.SHORT, gpu_run.TUNED, gpu_run.TUNED]
    assert gpu_run.CUDA_TESTS[0].endswith("test_cuda_graphs_with_fused_tasks_record_two_graphs_per_step_shape")


def test_command_prints_the_first_gpu_session_whose_runs_are_not_all_there(tmp_path, data_dir, monkeypatch, capsys):
    """With no paper-minilm run in the repository, session A; once its runs are all there (finished run files of
    exactly its configs), session B1; then B2; once B2's are there too, session C, which has no runs of its own.
    A session's calls are refused here if one breaks the device tool's limits, not on the GPU."""
    from mtbert_utils.data import file_digests
    from mtbert_utils.packing import stage_runs, training_notebooks
    from mtbert_utils.reproduce import resolve
    gpu_run = load_benchmark("gpu_run")
    monkeypatch.setenv("MTBERT_DATA_DIR", str(data_dir))
    names = [session["name"] for session in gpu_run.SESSIONS]
    assert gpu_run.next_session(tmp_path)["name"] == names[0]
    for done, session in enumerate(gpu_run.SESSIONS[:3]):
        for profile, only, overrides in session["runs"]:
            _, results_dir, _, plan = resolve(profile, only and only.split(","), overrides, tmp_path)
            for nb, params in training_notebooks(plan).items():
                for _, cfg in stage_runs(nb, params, 0, [], results_dir / "runs"):
                    path = Path(cfg.out_dir) / f"{cfg.run_name}.json"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps({"status": "finished", "fingerprint": cfg.fingerprint(),
                                                "data": {"sha256": file_digests(cfg.data_dir)}}))
        assert gpu_run.next_session(tmp_path)["name"] == names[done + 1]
    assert gpu_run.command(tmp_path) == gpu_run.SESSIONS[3]["calls"]
    assert f"next GPU session: {names[3]}" in capsys.readouterr().err
    monkeypatch.setitem(gpu_run.SESSIONS[3]["calls"][0], "timeout_s", 700)
    with pytest.raises(AssertionError):
        gpu_run.command(tmp_path)  # a call over the tool's 600 s


def test_only_and_then_only_select_notebooks_and_then_takes_the_speed_overrides(tmp_path, monkeypatch):
    """--only goes to the training's reproduce call, --then-only to --then's, and --then's profile takes the
    `speed` overrides (execution-only: its runs keep their names) but not the others (seeds, max_train). With
    --then the same profile (other seeds or notebooks), its step, log and summary copy are named apart, so
    neither replaces the other's."""
    gpu_run = load_benchmark("gpu_run")
    root = tmp_path / "root"

    def fake_step(name, cmd, *rest):  # as reproduce --train-only does: (re)writes the profile's summary
        summary = root / "results" / "smoke" / "executed" / "train-only.json"
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text(json.dumps({"step": name}))
        calls.append((name, cmd))
        return {"step": name, "status": "ok"}

    monkeypatch.setattr(gpu_run, "run_step", fake_step)
    monkeypatch.setattr(gpu_run, "start_monitors", lambda log_dir: [])
    speed = 'speed={"pad_to_multiple": 16}'
    (tmp_path / "pack").mkdir()
    after = lambda cmd, flag: [cmd[i + 1] for i, a in enumerate(cmd) if a == flag]
    for then, then_step in (("smoke-best", "train-smoke-best"), ("smoke", "train-smoke-then")):
        calls = []
        args = gpu_run.build_parser().parse_args([
            "run", "--profile", "smoke", "--set", "seeds=[0]", "--set", speed, "--set", "max_dev=8",
            "--only", "01_sequential", "--then", then, "--then-only", "08_best", "--then-min", "0",
            "--bench-max", "0", "--pytest", "--pack-dir", str(tmp_path / "pack"), "--root", str(root),
            "--tmp", str(tmp_path / "tmp"), "--out", str(tmp_path / "out"), "--log-name", f"log-{then}"])
        assert gpu_run.run(args) == 0
        names = [name for name, _ in calls]
        assert names[-2:] == ["train-smoke", then_step], names
        train, then_cmd = dict(calls)["train-smoke"], dict(calls)[then_step]
        assert after(train, "--only") == ["01_sequential"] and after(then_cmd, "--only") == ["08_best"]
        assert after(train, "--set") == ["seeds=[0]", speed, "max_dev=8"]
        assert after(then_cmd, "--set") == ["seeds=[1,2]", speed]
    logs = root / "results" / "smoke" / "log-smoke"
    assert json.loads((logs / "smoke-train-only.json").read_text()) == {"step": "train-smoke"}
    assert json.loads((logs / "smoke-then-train-only.json").read_text()) == {"step": "train-smoke-then"}
    assert gpu_run.speed_sets(["seeds=[0]", "max_dev=8"]) == []


def test_the_compile_cache_measurement_is_the_one_the_docs_quote():
    """results/bench/compile_cache_cpu.json (benchmarks/compile_cache.py, behind --warm-compile): each compiled
    run's compiling is its training time less the eager run's, and docs/gpu.md quotes those seconds."""
    data = json.loads((ROOT / "results" / "bench" / "compile_cache_cpu.json").read_text())
    eager, cold, warm = (r["train_time_s"] for r in data["runs"])
    assert [(r["compile"], r["seed"]) for r in data["runs"]] == [(False, 0), (True, 0), (True, 1)]
    assert data["compiling_s"] == {"empty_cache": round(cold - eager, 1),
                                   "cache_of_the_run_before": round(warm - eager, 1)}
    docs = " ".join((ROOT / "docs" / "gpu.md").read_text().split())
    cut = f"from {data['compiling_s']['empty_cache']:.0f} s to {data['compiling_s']['cache_of_the_run_before']:.0f} s"
    assert cut in docs and f"{data['cache']['files']} files, {data['cache']['mib']} MiB" in docs
    script = "python benchmarks/compile_cache.py"
    assert data["command"].startswith(script) and script in docs


def test_the_activation_memory_the_docs_quote():
    """results/bench/activation_memory_cpu.json (benchmarks/activation_memory.py): a fused step's 192 rows keep
    about three times a task batch's 64 for the backward, longer rows more; docs/gpu.md quotes the 128-token
    figures."""
    rows = json.loads((ROOT / "results" / "bench" / "activation_memory_cpu.json").read_text())["rows"]
    gib = {(r["rows"], r["length"], r["attention_dropout"] > 0): r["saved_gib"] for r in rows}
    assert len(gib) == 8
    for dropout in (True, False):
        assert 2.5 < gib[192, 128, dropout] / gib[64, 128, dropout] < 3.5  # rows scale it, about linearly
        assert gib[64, 128, dropout] > gib[64, 64, dropout] and gib[192, 128, dropout] > gib[192, 64, dropout]
    assert all(gib[n, length, True] > gib[n, length, False] for n, length, _ in gib)  # attention probabilities kept
    docs = " ".join((ROOT / "docs" / "gpu.md").read_text().split())
    assert (f"{gib[192, 128, False]} GiB for 192 rows against {gib[64, 128, False]} for 64 without attention dropout"
            in docs and f"{gib[192, 128, True]} against {gib[64, 128, True]} with it" in docs)


def test_compare_runs_sets_what_came_back_against_the_committed_twins(tmp_path, capsys):
    """benchmarks/compare_runs.py on committed gpu-minilm run files altered by hand: three runs come back with
    graphs and fusion on, their scores raised by 0.01, 0.02 and 0.03 and trained in half the time; one has no
    committed twin (a subsample run); the call's summary names a crashed-then-eager run and a failed one."""
    compare_runs = load_benchmark("compare_runs")
    src = ROOT / "results" / "gpu-minilm" / "runs"
    names = [f"rr_under-baseline-b66b3d54-seed{s}" for s in range(3)]
    old_dir, new_dir = tmp_path / "old", tmp_path / "back" / "results" / "gpu-minilm"
    (old_dir / "runs").mkdir(parents=True)
    (new_dir / "runs").mkdir(parents=True)
    for i, name in enumerate(names + ["rr_under-baseline-54172dee-seed0"]):
        run = json.loads((src / f"{names[min(i, 2)]}.json").read_text())
        if i < 3:
            (old_dir / "runs" / f"{name}.json").write_text(json.dumps(run))
        run["run_name"] = name
        run["dev"] = {m: v + 0.01 * (i + 1) for m, v in run["dev"].items()}
        run["config"].update(cuda_graphs=True, fuse_tasks=True)
        run["train_time_s"] /= 2
        for h in run["history"]:  # cumulative: the last epoch's count is the run's
            h["cuda_graphs_recorded"] = [20, 30, 40, 9][i] // (1 if h is run["history"][-1] else 2)
        (new_dir / "runs" / f"{name}.json").write_text(json.dumps(run))
    log_dir = new_dir / "gpu_run-3"
    log_dir.mkdir()
    (log_dir / "gpu-minilm-train-only.json").write_text(json.dumps({
        "profile": "gpu-minilm", "jobs": 10, "minutes": 4.2, "trained": 4, "failed": 1, "runs": [
            {"run_name": names[2], "status": "trained", "eager_retry": {"error": "worker died", "seconds": 80.0}},
            {"run_name": "sequential-baseline-96aa0014-seed0", "status": "failed", "error": "CUDA out of memory"}]}))
    predicted = tmp_path / "graph_trees.json"
    predicted.write_text(json.dumps({"runs": {names[0]: {"nodes": 22}, names[1]: {"nodes": 24},
                                              names[2]: {"nodes": 22}}}))

    out = log_dir / "compare.md"
    assert compare_runs.main([str(new_dir), "--against", str(old_dir), "--predicted", str(predicted),
                              "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    for m in compare_runs.METRICS:
        assert result["paired"][m]["n"] == 3
        assert result["paired"][m]["mean_diff"] == pytest.approx(0.02, abs=1e-12)
        # differences 0.01, 0.02, 0.03: sd 0.01, t(0.975, 2 df) = 4.3027, so 0.0248 > 0.02 and 0 is inside
        assert result["paired"][m]["ci95"] == pytest.approx(4.3027 * 0.01 / 3 ** 0.5, rel=1e-4)
        assert result["paired"][m]["verdict"] == "not resolved"
    assert result["train_time_s"]["committed"] == pytest.approx(2 * result["train_time_s"]["new"])
    assert result["train_time_s"]["runs"] == 3
    rows = {r["run_name"]: r for r in result["runs"]}
    assert [rows[n]["cuda_graphs_recorded"] for n in names] == [20, 30, 40]  # the last epoch's count
    assert result["graphs"] == {"runs": 3, "at_most_predicted": 1, "recorded": 90, "predicted": 68}
    assert result["eager_retries"] == [names[2]]
    assert result["failed"] == ["sequential-baseline-96aa0014-seed0"]
    assert rows["sequential-baseline-96aa0014-seed0"]["error"] == "CUDA out of memory"
    lonely = rows["rr_under-baseline-54172dee-seed0"]
    assert lonely["cuda_graphs_recorded"] == 9 and "committed_dev" not in lonely and "predicted_graphs" not in lonely
    assert rows[names[0]]["switches"]["cuda_graphs"] is True
    text = out.read_text()
    assert "1 of 3 runs recorded at most the predicted count (90 recorded, 68 predicted" in text
    assert "sst: new - committed +0.0200 ± 0.0248 over 3 runs" in text and "no change beyond the spread" in text
    assert "2.00x" in text
    assert "cuda_graphs=True" in text and "fuse_tasks=True" in text and "tf32=True" in text
    assert "profile gpu-minilm, 10 jobs, 4 trained, 1 failed, 4.2 min" in text
    assert f"| {names[2]} | finished (eager retry) |" in text

    # a call stopped by its budget: its summary, last written after a run ended, names the runs not ended then
    (log_dir / "gpu-minilm-train-only.json").write_text(json.dumps({
        "profile": "gpu-minilm", "jobs": 9, "minutes": 7.2, "trained": 3, "failed": 0, "complete": False,
        "unfinished": ["rr_over-baseline-b314632f-seed0", names[1]], "runs": [
            {"run_name": n, "status": "trained"} for n in names]}))
    assert compare_runs.main([str(new_dir), "--against", str(old_dir), "--out", str(out)]) == 0
    stopped = json.loads(out.with_suffix(".json").read_text())
    # a run listed as not ended whose file came back finished anyway is not cut off: its run file says finished
    assert stopped["cut_off"] == ["rr_over-baseline-b314632f-seed0"] and stopped["failed"] == []
    assert {r["run_name"]: r["status"] for r in stopped["runs"]}["rr_over-baseline-b314632f-seed0"] == "cut off"
    text = out.read_text()
    assert "- cut off by the call's stop (training or waiting for a slot): rr_over-baseline-b314632f-seed0" in text
    assert "profile gpu-minilm, 9 jobs, 3 trained, 0 failed, 7.2 min when last written (the call was stopped)" in text

    with pytest.raises(SystemExit) as e:  # a folder that is not there: argparse's one-line error
        compare_runs.main([str(tmp_path / "nowhere"), "--against", str(old_dir)])
    assert e.value.code == 2 and "no results folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:  # a folder with no run and no summary: nothing came back
        compare_runs.main([str(tmp_path / "empty"), "--against", str(old_dir)])
    assert e.value.code == 2 and "no finished run and no train-only summary" in capsys.readouterr().err


def test_a_call_that_retrains_apart_sets_its_runs_against_the_committed_ones(tmp_path, monkeypatch, capsys):
    """With --root elsewhere (the next GPU session's first call), gpu_run compares the retrained runs with the
    repository's committed runs and with the graph counts committed for exactly those overrides; the comparison
    comes back in the archive, and a comparison that cannot be made costs nothing else."""
    gpu_run = load_benchmark("gpu_run")
    sets = [f"speed={gpu_run.GRAPHS_SPEED}"]  # GPU sessions 3 and 4's first call
    check = ["seeds=[0]", 'max_train={"sst": 2048, "para": 2048, "sts": 2048}', "max_dev=512", sets[0]]
    assert gpu_run.graph_prediction("gpu-minilm", sets).name == "graph_trees-gpu-minilm.json"
    assert gpu_run.graph_prediction("gpu-minilm", check).name == "graph_trees-gpu-minilm-check.json"
    assert gpu_run.graph_prediction("gpu-minilm", []) is None  # eager, no prediction
    assert gpu_run.graph_prediction("paper-minilm", sets) is None

    repo, root = tmp_path / "repo", tmp_path / "fresh"
    for d in (repo / "results" / "gpu-minilm" / "runs", repo / "results" / "bench", root / "results" / "gpu-minilm" / "runs"):
        d.mkdir(parents=True)
    shutil.copy2(ROOT / "results" / "bench" / "graph_trees-gpu-minilm.json", repo / "results" / "bench")
    names = [f"rr_under-baseline-b66b3d54-seed{s}" for s in (0, 1)]
    for name, graphs in zip(names, (20, 30)):
        run = json.loads((ROOT / "results" / "gpu-minilm" / "runs" / f"{name}.json").read_text())
        (repo / "results" / "gpu-minilm" / "runs" / f"{name}.json").write_text(json.dumps(run))
        run["config"].update(cuda_graphs=True, fuse_tasks=True)
        run["history"][-1]["cuda_graphs_recorded"] = graphs
        (root / "results" / "gpu-minilm" / "runs" / f"{name}.json").write_text(json.dumps(run))
    monkeypatch.setattr(gpu_run, "ROOT", repo)
    log_dir = root / "results" / "gpu-minilm" / "gpu_run-3-graphs"
    log_dir.mkdir()
    record = gpu_run.compare_step("gpu-minilm", "gpu-minilm", sets, root, log_dir)
    assert record["status"] == "ok" and record["predicted"] == "graph_trees-gpu-minilm.json", record
    result = json.loads((log_dir / "compare.json").read_text())
    assert [r["predicted_graphs"] for r in result["runs"]] == [22, 24]  # seeds 0 and 1 in the committed prediction
    assert result["graphs"]["at_most_predicted"] == 1 and result["paired"]["sst"]["mean_diff"] == 0
    out = capsys.readouterr().out
    assert "[gpu_run] compare: against the committed runs" in out and "1 of 2 runs recorded at most" in out
    assert str(tmp_path) not in (log_dir / "compare.json").read_text()  # no machine folder in what comes back

    assert gpu_run.compare_step("smoke", "smoke", [], root, log_dir)["status"].startswith("skipped")
    (repo / "results" / "empty" / "runs").mkdir(parents=True)
    (root / "results" / "empty").mkdir()
    failed = gpu_run.compare_step("empty", "empty", [], root, log_dir)  # nothing came back to compare
    assert failed["status"].startswith("failed: SystemExit") and "no finished run" in failed["status"]
