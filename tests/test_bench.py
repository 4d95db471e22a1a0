"""The benchmark end to end in quick mode (tiny encoder, a few steps): it runs and reports every key.

No timing asserts: speed depends on the machine; this checks the report is complete and sane.
"""
import json
import math
import time
from pathlib import Path

import pytest
import torch

from mtbert_utils.bench import main as bench_main, speed_module

bench = speed_module()  # benchmarks/speed.py

from conftest import TINY_FORWARD, float32_tol

REQUIRED = ("train_plain_examples_per_s", "train_examples_per_s", "train_speedup", "mfu", "matmul_peak_gflops",
            "pcgrad_step_ratio", "pcgrad_extra_bytes", "eval_plain_examples_per_s", "eval_examples_per_s",
            "eval_speedup", "peak_rss_bytes")
# a difference of two sampled heap peaks (PCGrad step minus plain step): with the tiny encoder the PCGrad
# buffer (about 1 MB) is below what a 2 ms sampler resolves, so its sign is noise (CI once measured -132 kB)
DIFFERENCES = ("pcgrad_extra_bytes",)


@pytest.fixture(scope="module")
def report(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    result = bench_main(["--quick", "--levers", "--accuracy", "--data-dir", str(data_dir), "--out", str(out)])
    return result, json.loads(out.read_text())


def test_report_has_every_key_and_positive_finite_values(report):
    result, saved = report
    for key in REQUIRED:
        assert key in saved, key
        assert isinstance(saved[key], (int, float)) and math.isfinite(saved[key]), (key, saved[key])
        assert key in DIFFERENCES or saved[key] > 0, (key, saved[key])
    peaks = saved["pcgrad_detail"]["step_peak_bytes"]
    if bench._HEAP is not None:  # glibc: the heap is sampled, and the extra bytes are the measured difference
        assert peaks["plain"] > 0 and peaks["pcgrad"] > 0
        assert saved["pcgrad_extra_bytes"] == peaks["pcgrad"] - peaks["plain"]
    assert saved["train_speedup"] == pytest.approx(saved["train_examples_per_s"] / saved["train_plain_examples_per_s"])
    assert 0 < saved["mfu"] < 1
    assert saved["quick"] is True and saved["encoder"] == "tiny"
    assert set(saved) >= set(result) - {"environment"}  # what was printed is what was written


def test_both_eval_loops_compute_the_same_outputs(report):
    _, saved = report
    # the plain loop and evaluation.predict run one model on the same dev examples
    # other batch sizes, so other summation orders; untrained heads' outputs are well below 1 in size
    assert saved["eval_detail"]["max_abs_output_diff"] <= float32_tol(TINY_FORWARD)


def test_levers_and_accuracy_check_are_reported(report):
    _, saved = report
    levers = saved["levers"]
    for name in ("group_by_length", "freeze_word_embeddings", "sdpa_vs_eager", "encoder_dropout_0",
                 "fused_vs_foreach_adamw", "bf16_autocast", "torch_compile", "cached_tokenization",
                 "eval_sort_by_length"):
        assert name in levers, name
    for lever in levers.values():
        if "speedup" in lever:
            assert math.isfinite(lever["speedup"]) and lever["speedup"] > 0
    acc = saved["accuracy_check"]
    assert {r["config"] for r in acc["runs"]} == set(bench.ACCURACY_CONFIGS)
    assert all(0 <= r["sst_dev_acc"] <= 1 for r in acc["runs"])


def test_matmul_peak_and_flops_formula():
    assert bench.matmul_peak_gflops(torch.float32, n=128, min_time=0.01) > 0
    encoder = bench.plain_encoder("tiny")
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0  # 16 real tokens, padded length 10
    cfg = encoder.config
    expected = 6 * bench.per_token_params(encoder) * 16 + 12 * cfg.num_hidden_layers * cfg.hidden_size * 10 * 16
    assert bench.train_flops(encoder, mask) == expected
    # per-token parameters: the transformer layers only (no embeddings, pooler)
    assert bench.per_token_params(encoder) == sum(p.numel() for p in encoder.encoder.parameters())


def test_memory_sampler_sees_a_large_allocation():
    with bench.MemSampler() as m:
        x = torch.ones(8_000_000)  # 32 MB
        time.sleep(0.05)  # the sampler reads every 2 ms
        del x
    if m.step_bytes is not None:  # glibc only
        assert m.step_bytes >= 30_000_000
    assert m.rss_peak > 0


# ----------------------------------------------------------------------------- what the speed rests on


def _two_task_losses(shared_trunk: bool):
    torch.manual_seed(0)
    trunk, h1, h2 = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
    x1, x2 = torch.randn(3, 4), torch.randn(3, 4)
    if shared_trunk:  # both tasks read the same activations
        z = trunk(x1).relu()
        return trunk, h1(z).sum(), h2(z).sum()
    return trunk, h1(trunk(x1).relu()).sum(), h2(trunk(x2).relu()).sum()


def test_pcgrad_frees_disjoint_graphs_and_writes_grads_into_one_buffer():
    from mtbert_utils.pcgrad import pcgrad_backward
    trunk, l1, l2 = _two_task_losses(shared_trunk=False)
    pcgrad_backward({"a": l1, "b": l2}, list(trunk.parameters()))
    # each task's graph was freed after its backward, as in a plain step (no retained activations)
    with pytest.raises(RuntimeError):
        l1.backward()
    # the combined .grad are views of one buffer: no per-parameter copies
    storages = {p.grad.untyped_storage().data_ptr() for p in trunk.parameters()}
    assert len(storages) == 1 and all(p.grad._base is not None for p in trunk.parameters())


def test_pcgrad_keeps_shared_graphs_until_the_last_task():
    from mtbert_utils.pcgrad import pcgrad_backward
    trunk, l1, l2 = _two_task_losses(shared_trunk=True)
    ref = [g.clone() for g in torch.autograd.grad(l1 + l2, list(trunk.parameters()), retain_graph=True)]
    pcgrad_backward({"a": l1, "b": l2}, list(trunk.parameters()), reduction="sum", project=False)
    for p, g in zip(trunk.parameters(), ref):
        # Linear(4, 4), a relu, Linear(4, 1), a sum of 3 and the 2 tasks added
        assert (p.grad - g).abs().max() <= float32_tol(4 + 4 + 3 + 2) * g.abs().max()


# the top-level keys of a CPU report (--levers --accuracy), as before the CUDA benchmark was added
CPU_KEYS = {"machine", "encoder", "quick", "matmul_peak_gflops", "matmul_peak_gflops_bf16",
            "train_plain_examples_per_s", "train_plain_tokens_per_s", "train_examples_per_s", "train_tokens_per_s",
            "train_speedup", "mfu", "mfu_plain", "train_plain_peak_bytes", "train_peak_bytes", "train_detail",
            "pcgrad_step_ratio", "pcgrad_extra_bytes", "pcgrad_detail", "eval_plain_examples_per_s",
            "eval_examples_per_s", "eval_speedup", "eval_plain_peak_bytes", "eval_peak_bytes", "eval_detail",
            "levers", "accuracy_check", "matmul_peak_gflops_start_end", "peak_rss_bytes", "bench_seconds",
            "targets_met", "load_average", "environment"} | ({"cuda_bert_base"} if torch.cuda.is_available() else set())


def test_cpu_report_keys_are_unchanged(report):
    _, saved = report
    assert set(saved) == CPU_KEYS


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_cuda_without_a_gpu_exits_with_a_clear_message(tmp_path):
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit, match="--device cuda: no CUDA device here"):
        bench_main(["--device", "cuda", "--quick", "--out", str(out)])
    assert not out.exists()


@pytest.fixture(scope="module")
def device_report(data_dir, one_thread):
    """The CUDA benchmark's code path, run on CPU with the quick sizes (what --device cuda runs on a GPU)."""
    import dataclasses
    sizes = dataclasses.replace(bench.QUICK, device="cpu", time_cap_s=600.0)
    return bench.run_cuda(str(data_dir), sizes, levers=True, accuracy=True)


def test_device_benchmark_reports_the_cpu_keys_plus_device_and_precision(device_report, report):
    _, cpu = report
    r = device_report
    assert set(r) >= set(REQUIRED) | {"device", "precision", "train_detail", "pcgrad_detail", "eval_detail",
                                      "levers", "accuracy_check", "targets_met"}
    assert r["device"] == "cpu" and r["precision"] in ("fp32", "bf16")
    by = r["train_by_precision"]
    assert set(by) == {"plain_fp32", "plain_bf16", "repo_fp32", "repo_bf16"}
    assert r["train_examples_per_s"] == max(by["repo_fp32"], by["repo_bf16"])  # the faster precision is named
    assert r["train_speedup"] == pytest.approx(r["train_examples_per_s"] / by["plain_fp32"])
    for key in REQUIRED:
        assert math.isfinite(r[key]), key
    assert r["targets_met"].keys() == bench.CUDA_TARGETS.keys()
    assert r["task_fusion_step_ratio"] > 0 and r["task_fusion_detail"]["levers"] == bench.CUDA_SPEED


def test_device_benchmark_levers_skip_cleanly_on_cpu(device_report):
    levers = device_report["levers"]
    assert set(levers) == set(bench.CUDA_LEVERS)
    for name in ("cuda_graphs", "cuda_graphs_bf16"):  # CUDA only: skipped with the config's reason
        assert "needs CUDA" in levers[name]["skipped"], levers[name]
    assert "inductor on CPU" in levers["torch_compile"]["skipped"]  # minutes of compiling in the tests
    for name in set(levers) - {"cuda_graphs", "cuda_graphs_bf16", "torch_compile"}:
        assert math.isfinite(levers[name]["speedup"]) and levers[name]["speedup"] > 0, levers[name]
    acc = device_report["accuracy_check"]
    assert {r["config"] for r in acc["runs"]} == set(bench.CUDA_ACCURACY_CONFIGS)


def test_each_cuda_lever_gets_the_compiler_settings_the_benchmark_found(monkeypatch):
    """use_cuda_graphs sets inductor's fallback_random and dynamo's cache limit for the rest of its process; the
    levers measured after the graphs levers (torch_compile) must not inherit them."""
    import torch._dynamo.config
    import torch._inductor.config
    seen = {}

    def lever_pair(sizes, sst_enc, name, base, lever):
        seen[name] = (torch._inductor.config.fallback_random, torch._dynamo.config.cache_size_limit)
        if lever.get("sets"):  # what use_cuda_graphs does
            torch._inductor.config.fallback_random = not torch._inductor.config.fallback_random
            torch._dynamo.config.cache_size_limit += 64
        return {"lever": name}

    monkeypatch.setattr(bench, "_lever_pair", lever_pair)
    monkeypatch.setattr(bench, "CUDA_LEVERS", {"graphs_like": ({}, {"sets": True}), "after": ({}, {})})
    found = (torch._inductor.config.fallback_random, torch._dynamo.config.cache_size_limit)
    out = bench.bench_cuda_levers(bench.QUICK, None, deadline=float("inf"))
    assert set(out) == {"graphs_like", "after"}
    assert seen == {"graphs_like": found, "after": found}
    assert (torch._inductor.config.fallback_random, torch._dynamo.config.cache_size_limit) == found


def test_task_fusion_alone_times_both_steps_on_length_grouped_batches(data_dir, tmp_path, one_thread):
    """--task-fusion: the three-task step with and without fuse_tasks, on steps drawn as training draws them (each
    task grouped by length, so the tasks' lengths differ), and the summary's row for it."""
    out = tmp_path / "fusion.json"
    r = bench_main(["--task-fusion", "--quick", "--data-dir", str(data_dir), "--out", str(out)])
    assert json.loads(out.read_text())["task_fusion_step_ratio"] == r["task_fusion_step_ratio"] > 0
    d = r["task_fusion_detail"]
    assert d["fused_step_s"] > 0 and d["apart_step_s"] > 0 and len(d["encoder_input_lengths"]) == d["steps_per_round"]
    assert any(len(set(step.values())) > 1 for step in d["encoder_input_lengths"])  # the shared call pads some ...
    assert d["encoder_positions"]["fused"] > d["encoder_positions"]["apart"] > 0  # ... so it runs on more positions
    assert r["device"] == "cpu" and r["machine"]["cores"] >= 1


def test_pcgrad_alone_times_a_pcgrad_step_against_a_plain_step(data_dir, tmp_path, one_thread):
    """--pcgrad: bench_pcgrad alone (a PCGrad step and a plain step on the same three batches, time and memory),
    nothing else of the benchmark."""
    out = tmp_path / "pcgrad.json"
    r = bench_main(["--pcgrad", "--quick", "--data-dir", str(data_dir), "--out", str(out)])
    assert json.loads(out.read_text())["pcgrad_step_ratio"] == r["pcgrad_step_ratio"] > 0
    d = r["pcgrad_detail"]
    assert d["tasks"] == ["sst", "para", "sts"] and set(d["step_peak_bytes"]) == {"plain", "pcgrad"}
    assert d["plain_step_s"] > 0 and d["pcgrad_step_s"] > 0
    assert "train_speedup" not in r and "task_fusion_step_ratio" not in r
    assert r["device"] == "cpu" and r["machine"]["cores"] >= 1


def test_a_part_alone_writes_its_own_file_by_default():
    """Without --out, --pcgrad or --task-fusion once wrote results/bench/bench.json over the whole CPU benchmark;
    each now goes to the file its committed measurement is in (the names docs/speed.md links)."""
    default_out = speed_module().default_out
    root = Path(__file__).resolve().parents[1]
    assert default_out(False, True, "cpu") == "results/bench/pcgrad_cpu.json"
    assert default_out(True, False, "cpu") == "results/bench/task_fusion_cpu.json"
    assert default_out(False, False, "cpu") == default_out(False, False, "cuda") == "results/bench/bench.json"
    for part in ("pcgrad_cpu.json", "task_fusion_cpu.json"):
        assert (root / "results" / "bench" / part).is_file() and f"results/bench/{part}" in (
            root / "docs" / "speed.md").read_text() + (root / "docs" / "gpu.md").read_text()


def test_docs_pcgrad_memory_is_the_committed_cpu_measurement():
    """docs/speed.md quotes results/bench/pcgrad_cpu.json, not typed numbers; and there a PCGrad step, one task's
    activations at a time, peaks below a plain step, which holds all three tasks' at once."""
    root = Path(__file__).resolve().parents[1]
    r = json.loads((root / "results" / "bench" / "pcgrad_cpu.json").read_text())
    peak = r["pcgrad_detail"]["step_peak_bytes"]
    doc = (root / "docs" / "speed.md").read_text()
    assert f"**{peak['pcgrad'] / 1e6:,.0f} MB against {peak['plain'] / 1e6:,.0f} MB**" in doc
    assert f"takes {r['pcgrad_step_ratio']:.2f}x the plain step's time" in doc
    assert peak["pcgrad"] < peak["plain"]


def test_trainer_step_moves_each_task_batch_to_the_device(monkeypatch):
    """Trainer.step gets {task: batch}: every task's tensors go to the device, not the outer dict (whose values
    are dicts, which a CPU run cannot tell apart; on CUDA the first embedding lookup failed)."""
    from types import SimpleNamespace
    moved = []
    monkeypatch.setattr(bench, "to_device", lambda b, d: moved.append((b, d)) or {k: ("moved", v) for k, v in b.items()})
    monkeypatch.setattr(bench, "training_step",
                        lambda model, opt, batches, config, **kw: {"losses": None, "batches": batches})
    tr = object.__new__(bench.Trainer)
    tr.config, tr.device = SimpleNamespace(tf32=False), torch.device("cpu")
    tr.model = tr.opt = tr.shared = tr.amp_dtype = tr.gen = tr.pending = None
    batches = {t: {"ids": torch.zeros(2, 3, dtype=torch.long), "labels": torch.zeros(2)} for t in ("sst", "para")}
    out = tr.step(batches)
    assert [b for b, _ in moved] == list(batches.values()) and {d for _, d in moved} == {tr.device}
    assert out["batches"] == {t: {k: ("moved", v) for k, v in b.items()} for t, b in batches.items()}


def test_summary_of_the_committed_cuda_benchmark_names_its_device_target_and_precisions():
    """The GPU benchmark that gpu_run brought back (an H200) summarizes with the CUDA target (3x), not the CPU's."""
    path = Path(__file__).resolve().parents[1] / "results" / "gpu-minilm" / "gpu_run-bench" / "bench_cuda.json"
    r = json.loads(path.read_text())
    text = bench.summary_markdown(r)
    assert text.startswith(f"Device: {r['device']}.")
    assert f"| training speedup b/a | {r['train_speedup']:.2f}x | target >= 3.0x |" in text
    assert f"faster repo precision: {r['precision']}" in text
    by = r["train_by_precision"]
    assert r["precision"] == max(("fp32", "bf16"), key=lambda p: by[f"repo_{p}"])
    assert r["train_speedup"] == pytest.approx(by[f"repo_{r['precision']}"] / by["plain_fp32"])


@pytest.mark.parametrize("folder,measured", [("gpu_run-2-bench-tests", 11), ("gpu_run-3-bench", 8)])
def test_docs_speed_tables_are_the_cuda_benchmarks_summaries(folder, measured):
    """docs/speed.md's lever and precision tables of GPU sessions 2 and 3 are their committed benchmarks', not typed
    (session 3's cap was spent before its last four levers)."""
    root = Path(__file__).resolve().parents[1]
    r = json.loads((root / "results" / "gpu-minilm" / folder / "bench_cuda.json").read_text())
    doc = (root / "docs" / "speed.md").read_text()
    levers = [line for line in bench.summary_markdown(r).splitlines() if line.startswith("| ") and line.endswith("x |")
              and line.split("|")[1].strip() in r["levers"]]
    assert len(levers) == measured and len(r["levers"]) >= measured
    assert "\n".join(levers) in doc
    by = r["train_by_precision"]
    for loop in ("plain", "repo"):
        assert f"| {by[loop + '_fp32']:,.0f} ex/s | {by[loop + '_bf16']:,.0f} ex/s |" in doc


def test_docs_task_fusion_numbers_are_the_committed_cpu_measurement():
    """docs/gpu.md and docs/speed.md quote results/bench/task_fusion_cpu.json, not typed numbers."""
    root = Path(__file__).resolve().parents[1]
    r = json.loads((root / "results" / "bench" / "task_fusion_cpu.json").read_text())
    pos = r["task_fusion_detail"]["encoder_positions"]
    gpu, speed = (root / "docs" / "gpu.md").read_text(), (root / "docs" / "speed.md").read_text()
    assert f"**{r['task_fusion_step_ratio']:.2f}x**" in gpu
    assert f"{pos['fused'] / pos['apart']:.2f}x the token positions ({pos['fused']:,} against {pos['apart']:,}" in gpu
    assert f"{r['task_fusion_step_ratio']:.2f}x slower ({pos['fused'] / pos['apart']:.2f}x the token positions" in speed


def test_docs_quote_the_third_cuda_benchmark_and_packed_rate():
    """The figures docs/speed.md and docs/gpu.md draw from GPU session 3's files: the graphs step against the plain
    loop, task fusion's step ratio, and the steady rate of nine graphed runs in packing_timeline.csv."""
    import csv
    root = Path(__file__).resolve().parents[1]
    folder = root / "results" / "gpu-minilm"
    r = json.loads((folder / "gpu_run-3-bench" / "bench_cuda.json").read_text())
    speed = " ".join((root / "docs" / "speed.md").read_text().split())
    gpu = " ".join((root / "docs" / "gpu.md").read_text().split())
    plain, graphs = r["train_by_precision"]["plain_fp32"], r["levers"]["cuda_graphs"]["on_examples_per_s"]
    assert f"{graphs:,.0f} ex/s against the plain fp32 loop's {plain:,.0f}, **{graphs / plain:.2f}x**" in speed
    fusion = r["task_fusion_detail"]
    pos = fusion["encoder_positions"]
    quoted = (f"took {r['task_fusion_step_ratio']:.2f}x the time of a call per task "
              f"({1000 * fusion['fused_step_s']:.1f} ms against {1000 * fusion['apart_step_s']:.1f} ms, eager, batch 32)")
    assert quoted in speed and f"{pos['fused'] / pos['apart']:.2f}x the token positions" in speed
    assert f"took 0.53x as long as a call per task ({1000 * fusion['fused_step_s']:.1f} ms" in gpu
    with open(folder / "gpu_run-3-graphs" / "packing_timeline.csv") as f:
        rows = list(csv.DictReader(f))
    steady = [int(row["full_ex_per_s"]) for row in rows  # nine tuned runs in their full epochs, compiled
              if row["runs_training"] == "9" and row["heads_only_ex_per_s"] == "0" and float(row["from_s"]) >= 150]
    assert len(steady) >= 4 and all(abs(v - 13_200) <= 0.015 * 13_200 for v in steady), steady
    assert "13,200 full examples a second" in gpu and "13,200 full examples a second" in speed
