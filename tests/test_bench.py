"""The benchmark end to end in quick mode (tiny encoder, a few steps): it runs and reports every key.

No timing asserts: speed depends on the machine; this checks the report is complete and sane.
"""
import json
import math
import time

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
