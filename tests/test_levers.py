"""The GPU speed levers as TrainConfig switches (issue 12): what each may and may not change, on CPU.

pad_to_multiple and cache_frozen_encoder are checked against the plain path within float tolerances;
tf32 and cuda_graphs are CUDA-only: on CPU tf32 is a no-op and cuda_graphs stops train() early.
"""
import math
import warnings

import pytest
import torch

from conftest import TINY_FORWARD, float32_tol, load_benchmark
from mtbert_utils import TASKS, packing
from mtbert_utils.config import TrainConfig
from mtbert_utils.data import load_tasks
from mtbert_utils.batching import collate, encode_task, eval_batches
from mtbert_utils.evaluation import predict
from mtbert_utils.model import load_tokenizer
from mtbert_utils.training import build_model, pick_amp, tf32_matmuls, train


# -- run names ------------------------------------------------------------------------------------------


def test_execution_levers_leave_the_run_name_alone():
    base = TrainConfig()
    fast = TrainConfig(pad_to_multiple=16, tf32=True, cuda_graphs=True, fuse_tasks=True)
    assert fast.run_name == base.run_name  # the same profile names its runs alike on CPU and GPU
    assert fast.to_dict()["tf32"] is True  # ... and the result JSON still records how it ran


def test_cache_frozen_encoder_changes_the_run_name_only_when_on():
    assert TrainConfig(cache_frozen_encoder=False).run_name == TrainConfig().run_name
    assert TrainConfig(cache_frozen_encoder=True).run_name != TrainConfig().run_name


@pytest.mark.parametrize("bad, match", [
    (dict(pad_to_multiple=0), "pad_to_multiple"), (dict(pad_to_multiple=True), "pad_to_multiple"),
    (dict(pad_to_multiple="16"), "pad_to_multiple"), (dict(tf32="yes"), "tf32"),
    (dict(cache_frozen_encoder=1), "cache_frozen_encoder"), (dict(fuse_tasks="on"), "fuse_tasks"),
    (dict(cuda_graphs=True), "pad_to_multiple"),  # without buckets every length records a graph
    (dict(cuda_graphs=True, pad_to_multiple=16, device="cpu"), "cuda_graphs"),
])
def test_invalid_lever_values_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad)


def test_auto_precision_is_fp32_on_cuda_and_cpu():
    # measured on an H100 (issue 12): train() 1,702 examples/s in fp32, 198 in bf16 autocast
    for device in ("cpu", "cuda"):
        assert pick_amp(TrainConfig(), torch.device(device)) == (None, False)
    assert pick_amp(TrainConfig(precision="bf16"), torch.device("cuda")) == (torch.bfloat16, False)


# -- CUDA-only switches on CPU ----------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_cuda_graphs_on_cpu_fails_fast_naming_the_switch(tmp_path):
    # device auto on a machine without CUDA: refused before any data is read (the data folder does not exist)
    config = TrainConfig(encoder="tiny", cuda_graphs=True, pad_to_multiple=16, data_dir=str(tmp_path / "none"),
                         out_dir=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="cuda_graphs=True needs CUDA"):
        train(config)


def test_tf32_sets_the_flags_for_the_block_and_restores_them():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        with pytest.raises(RuntimeError):
            with tf32_matmuls(True, torch.device("cuda")):  # the flags exist without a GPU
                assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
                raise RuntimeError("the run fails")
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        with tf32_matmuls(True, torch.device("cpu")):  # no effect on CPU
            assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# -- pad_to_multiple: a shape change, not a numbers change -----------------------------------------------


@pytest.fixture(scope="module")
def encoded(small_data_dir):
    tasks = load_tasks(small_data_dir, max_train=40, max_dev=40, seed=0)
    tok = load_tokenizer("tiny")
    return {t: encode_task(td.train, tok, t, max_length=64) for t, td in tasks.items()}


def test_collate_pads_to_the_multiple_and_masks_the_extra(encoded):
    for t, enc in encoded.items():
        for mode in ("joint", "separate") if t != "sst" else ("joint",):
            plain, padded = collate(enc, range(7), mode), collate(enc, range(7), mode, pad_to_multiple=16)
            for k in [k for k in plain if k.startswith(("input_ids", "attention_mask", "token_type_ids"))]:
                assert padded[k].shape[1] % 16 == 0 and padded[k].shape[1] >= plain[k].shape[1]
                w = plain[k].shape[1]
                assert torch.equal(padded[k][:, :w], plain[k])  # the real tokens where they were
                if k.startswith("attention_mask"):
                    assert padded[k][:, w:].sum() == 0  # ... and the extra positions masked out


@pytest.mark.parametrize("para_input", ["joint", "separate"])
def test_padding_to_a_multiple_leaves_outputs_and_losses_unchanged(encoded, para_input, one_thread):
    model = build_model(TrainConfig(encoder="tiny", para_input=para_input, sts_head="linear", sts_loss=None))
    model.eval()
    # per output value: one tiny forward pass (TINY_FORWARD sequential roundings), then the heads (<= 2 x 64)
    tol = float32_tol(TINY_FORWARD + 128)
    with torch.no_grad():
        for t, enc in encoded.items():
            idx = list(range(len(enc)))
            mode = model.pair_mode(t)
            a = model.forward_task(t, collate(enc, idx, mode))
            b = model.forward_task(t, collate(enc, idx, mode, pad_to_multiple=16))
            scale = a.abs().max().item() + 1
            assert (a - b).abs().max().item() <= tol * scale, t
            la = TrainConfig(encoder="tiny")
            from mtbert_utils.training import task_loss
            labels = enc.labels[idx]
            assert abs(task_loss(t, a, labels, la).item() - task_loss(t, b, labels, la).item()) <= tol * scale * 4


def test_predict_with_padding_to_a_multiple_matches(encoded, one_thread):
    model = build_model(TrainConfig(encoder="tiny", para_input="separate"))
    for t, enc in encoded.items():
        assert all(b["input_ids" if "input_ids" in b else "input_ids_a"].shape[1] % 8 == 0
                   for b in eval_batches(enc, 16, model.pair_mode(t), pad_to_multiple=8))
        a, b = predict(model, enc, 16), predict(model, enc, 16, pad_to_multiple=8)
        assert abs(a["raw"] - b["raw"]).max() <= float32_tol(TINY_FORWARD + 128) * (abs(a["raw"]).max() + 1)


def test_predict_refuses_a_task_with_no_examples_by_name():
    from mtbert_utils.batching import EncodedTask
    empty = EncodedTask("sts", [], None, joint=[], joint_types=[], a=[], b=[])
    with pytest.raises(ValueError, match=r"^predict: task 'sts' has no examples$"):  # was torch.cat's own error
        predict(build_model(TrainConfig(encoder="tiny")), empty, 16)


# -- cache_frozen_encoder --------------------------------------------------------------------------------


def _count_encoder_calls(model):
    calls = []
    model.encoder.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_heads_only_step_with_cache_skips_the_encoder_once_filled(encoded, one_thread):
    model = build_model(TrainConfig(encoder="tiny", dropout=0.0, encoder_dropout=0.0, para_input="joint"))
    model.set_encoder_trainable(False)
    model.train()
    model.embed_cache = {}
    calls = _count_encoder_calls(model)
    first = model({t: collate(enc, range(8), model.pair_mode(t)) for t, enc in encoded.items()})
    assert len(calls) == len(TASKS)  # one encoder call per task fills the cache
    perm = [7, 3, 0, 5, 1, 2, 6, 4]
    again = model({t: collate(enc, perm, model.pair_mode(t)) for t, enc in encoded.items()})
    assert len(calls) == len(TASKS)  # the same examples in another order: no encoder call ...
    for t in TASKS:  # ... and the outputs of those examples (heads only: <= 2 x 64 roundings per value)
        assert torch.allclose(again[t], first[t][perm], rtol=float32_tol(128), atol=float32_tol(128))
    model.eval()  # evaluation never reads the cache (its indices are another split's)
    model({t: collate(enc, range(8), model.pair_mode(t)) for t, enc in encoded.items()})
    assert len(calls) == 2 * len(TASKS)


def test_the_cache_owns_its_outputs(encoded, one_thread):
    """With cls pooling the pooled output is a view into the encoder's output, which a CUDA graph (cuda_graphs)
    overwrites at its next replay: the cache must hold copies, not views."""
    model = build_model(TrainConfig(encoder="tiny", pooling="cls"))
    model.set_encoder_trainable(False)
    model.train()
    model.embed_cache = {}
    outputs = []
    model.encoder.register_forward_hook(
        lambda m, i, o: outputs.append(o.last_hidden_state.untyped_storage().data_ptr()))
    model({"sst": collate(encoded["sst"], range(8), "joint")})
    assert len(model.embed_cache) == 8 and len(outputs) == 1
    assert all(v.untyped_storage().data_ptr() != outputs[0] for v in model.embed_cache.values())


def test_cached_frozen_epochs_train_like_the_uncached_run(tiny_config, tmp_path, one_thread, monkeypatch):
    """With no encoder dropout the cache changes nothing but speed: the same losses and dev scores, with
    fewer encoder calls (the second epoch of each heads-only phase reads the cache)."""
    import mtbert_utils.training as training
    calls, build = [], training.build_model

    def counted(config):
        model = build(config)
        model.encoder.register_forward_hook(lambda m, i, o: calls.append(m.training))
        return model
    monkeypatch.setattr(training, "build_model", counted)
    common = dict(phases=[[2, False], [1, True], [2, False]], lr_decay_epochs=[2], encoder_dropout=0.0)
    plain = train(tiny_config(tmp_path / "plain", **common))
    n_plain, calls[:] = len(calls), []
    cached = train(tiny_config(tmp_path / "cached", cache_frozen_encoder=True, **common))
    steps_per_epoch = plain["history"][0]["steps"]
    # epochs 2 and 5 (the second of each frozen phase) call the encoder for no training step
    assert len(calls) <= n_plain - steps_per_epoch
    assert plain["steps"] == cached["steps"]
    # heads trained by Adam over every step of the run: each step's rounding (TINY_FORWARD per value)
    # may carry into the next, so the tolerance grows with the number of steps
    tol = float32_tol(TINY_FORWARD * plain["steps"])
    for t in TASKS:
        assert abs(plain["dev"][t] - cached["dev"][t]) <= max(tol, 1e-6) * 10, t
    for p_rec, c_rec in zip(plain["history"], cached["history"]):
        for t, v in p_rec["train_loss"].items():
            assert abs(v - c_rec["train_loss"][t]) <= tol * (abs(v) + 1), (p_rec["epoch"], t)


def test_each_epoch_sets_the_encoders_mode_and_each_frozen_phase_starts_an_empty_cache(tiny_config, tmp_path,
                                                                                        one_thread, monkeypatch,
                                                                                        training_steps):
    """A pretrained encoder arrives in eval mode (from_pretrained's), yet every training step runs it in train
    mode, dropout on, except the heads-only epochs of cache_frozen_encoder, which run it in eval mode so that its
    outputs can be reused. Each heads-only phase starts with an empty cache: the full epoch before the second one
    changed the encoder, so the first phase's outputs are stale there. (With no dropout, as in the test above, a
    stale or noisy cache changes losses by less than a tolerance can tell.)"""
    import mtbert_utils.training as training
    build, calls, now = training.build_model, [], training_steps

    def pretrained_like(config):
        model = build(config).eval()
        model.encoder.register_forward_hook(lambda m, i, o: calls.append((now.epoch, m.training)) if now.in_step else None)
        return model
    monkeypatch.setattr(training, "build_model", pretrained_like)

    modes = {}  # cache on/off -> per epoch, the encoder's mode at each call in a training step
    for cache in (False, True):
        calls[:] = []
        train(tiny_config(tmp_path / f"cache{cache}", phases=[[2, False], [1, True], [2, False]], lr_decay_epochs=[2],
                          cache_frozen_encoder=cache))
        modes[cache] = [[train_mode for e, train_mode in calls if e == epoch] for epoch in range(5)]
    assert all(epoch and all(epoch) for epoch in modes[False])  # every epoch, heads-only ones too: train mode
    first, second, full, first_again, second_again = modes[True]
    assert first and not any(first) and first_again and not any(first_again)  # eval mode, the cache filling
    assert second == second_again == []  # all read from the cache
    assert full == modes[False][2]  # the full epoch: train mode, every step through the encoder


# -- fuse_tasks: one encoder call per step ----------------------------------------------------------------


def _step_batches(encoded, model, rows, tasks=None):
    """One batch per task of `rows` (each task a different slice and length), padded to a multiple of 16."""
    return {t: collate(enc, rows[i % len(rows)], model.pair_mode(t), pad_to_multiple=16)
            for i, (t, enc) in enumerate(encoded.items()) if tasks is None or t in tasks}


@pytest.mark.parametrize("para_input, sts_head", [("joint", "cosine"), ("separate", "linear"), ("sbert", "cosine")])
def test_fused_tasks_share_one_encoder_call_and_keep_each_tasks_outputs(encoded, para_input, sts_head, one_thread):
    """fuse=True encodes a step's task batches (sst, joint or separate Quora pairs, STS pairs) in one encoder call,
    padded to the longest; each row's outputs are those of its task's own call (eval mode: no dropout). Each task
    in turn gets its shortest examples and the others their longest, so that every task's rows are padded."""
    model = build_model(TrainConfig(encoder="tiny", para_input=para_input, sts_head=sts_head)).eval()
    calls = _count_encoder_calls(model)
    tol = float32_tol(TINY_FORWARD + 128)  # one tiny forward per value, then the heads (<= 2 x 64)
    for short in TASKS:
        batches = {}
        for t, enc in encoded.items():
            mode = model.pair_mode(t)
            by_length = sorted(range(len(enc)), key=enc.lengths(mode).__getitem__)
            batches[t] = collate(enc, by_length[:8] if t == short else by_length[-8:], mode)
        longest = {t: max(v.shape[1] for k, v in b.items() if k.startswith("input_ids")) for t, b in batches.items()}
        assert longest[short] < max(longest.values())  # its rows are padded in the shared call
        with torch.no_grad():
            apart, fused = model(batches), model(batches, fuse=True)
        for t in TASKS:
            assert apart[t].shape == fused[t].shape
            assert (apart[t] - fused[t]).abs().max().item() <= tol * (apart[t].abs().max().item() + 1), (short, t)
    assert len(calls) == len(TASKS) * (len(TASKS) + 1)  # a call per task, then one shared call, per step


def test_fused_tasks_fall_back_to_a_call_per_task_where_it_cannot_pay(encoded, one_thread):
    """One task, and the cached heads-only steps (cache_frozen_encoder looks each task's rows up on its own)."""
    model = build_model(TrainConfig(encoder="tiny", dropout=0.0, encoder_dropout=0.0)).train()
    calls = _count_encoder_calls(model)
    model(_step_batches(encoded, model, [range(8)], tasks=("sts",)), fuse=True)
    assert len(calls) == 1
    model.set_encoder_trainable(False)
    model.embed_cache = {}
    model(_step_batches(encoded, model, [range(8)]), fuse=True)
    assert len(calls) == 1 + len(TASKS)  # filled task by task
    model(_step_batches(encoded, model, [range(8)]), fuse=True)
    assert len(calls) == 1 + len(TASKS)  # ... and read


def test_fused_tasks_take_one_encoder_call_for_two_tasks_and_for_a_frozen_encoder_not_cached(encoded, one_thread):
    """A call per task without fuse; one shared call with it, from two tasks up, also while the encoder is frozen
    but its outputs are not cached (only the cache looks each task's rows up on its own)."""
    model = build_model(TrainConfig(encoder="tiny", dropout=0.0, encoder_dropout=0.0)).train()
    calls = _count_encoder_calls(model)
    model(_step_batches(encoded, model, [range(8)]))
    assert len(calls) == len(TASKS)  # sst, joint Quora pairs, STS pairs (a and b in one call)
    model(_step_batches(encoded, model, [range(8)], tasks=("sst", "sts")), fuse=True)
    assert len(calls) == len(TASKS) + 1
    model.set_encoder_trainable(False)
    model(_step_batches(encoded, model, [range(8)]), fuse=True)
    assert len(calls) == len(TASKS) + 2


@pytest.mark.parametrize("method", [dict(), dict(pcgrad=True), dict(record_grad_cosines=True)])
def test_fuse_tasks_trains_like_a_call_per_task(encoded, one_thread, method):
    """training_step with fuse_tasks: the summed loss's step trains as one call per task does, within roundings
    (dropout off: with dropout the masks are drawn in another order). Steps that take each task's gradient on its
    own (PCGrad, the gradient cosines) keep one call per task: a backward through a shared call would run through
    every task's rows."""
    import copy
    from mtbert_utils.training import training_step
    cfgs = [TrainConfig(encoder="tiny", dropout=0.0, encoder_dropout=0.0, progress=False, fuse_tasks=fuse, **method)
            for fuse in (False, True)]
    models = [build_model(cfgs[0]).train()]
    models.append(copy.deepcopy(models[0]))
    calls = _count_encoder_calls(models[1])
    opts = [torch.optim.SGD(m.parameters(), lr=0.01) for m in models]
    gens = [torch.Generator().manual_seed(0) for _ in models]
    losses = [[], []]
    plan = [None, None, ("sst",), None, ("para", "sts"), None]
    for step, tasks in enumerate(plan):
        batches = _step_batches(encoded, models[0], [range(8 * step % 32, 8 * step % 32 + 8), range(4, 16)], tasks)
        for i, m in enumerate(models):
            out = training_step(m, opts[i], batches, cfgs[i], device=torch.device("cpu"), generator=gens[i],
                                shared=[p for p in m.parameters() if p.requires_grad])
            losses[i].append(out["losses"].read())
    per_task = sum(len(t) if t else len(TASKS) for t in plan)
    assert len(calls) == (per_task if method else len(plan))
    _assert_trained_alike(models, losses, steps=len(plan))


# -- PCGrad and the gradient cosines: each task's forward just before its backward ------------------------


@pytest.mark.parametrize("method", [dict(pcgrad=True), dict(record_grad_cosines=True)])
def test_per_task_gradient_steps_run_each_forward_just_before_its_backward(encoded, one_thread, method):
    """A step that takes each task's gradient on its own runs, while the encoder trains, each task's forward just
    before that task's backward (one task's activations alive at a time), and trains exactly as the step that runs
    every forward first (dropout on: the forwards run in the same order and draw the same masks). A frozen
    encoder's step runs its forwards at once (they keep no activations; cosine STS then has nothing to train)."""
    import copy
    from mtbert_utils.gradients import GRAD_METHODS
    from mtbert_utils.training import task_loss, training_step
    config = TrainConfig(encoder="tiny", progress=False, **method)
    model = build_model(config).train()
    upfront = copy.deepcopy(model)  # the reference: every forward first, then the method on the losses
    events = []
    task_output = model.task_output

    def logged(task, embs):
        out = task_output(task, embs)
        events.append(("forward", task))
        if out.requires_grad:
            out.register_hook(lambda g: events.append(("backward", task)))
        return out

    model.task_output = logged
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, upfront)]
    losses_by_step, plan = [[], []], [True, True, False, True]
    for step, trains in enumerate(plan):
        batches = _step_batches(encoded, model, [range(8 * step, 8 * step + 8), range(3, 11)])
        for m in (model, upfront):
            m.set_encoder_trainable(trains)
        events.clear()
        torch.manual_seed(step)
        out = training_step(model, opts[0], batches, config, device=torch.device("cpu"),
                            generator=torch.Generator().manual_seed(step),
                            shared=[p for p in model.parameters() if p.requires_grad])
        if trains:
            assert events == [(e, t) for t in TASKS for e in ("forward", "backward")]
        else:
            assert events[:len(TASKS)] == [("forward", t) for t in TASKS]
        torch.manual_seed(step)
        outs = upfront(batches)
        raw = {t: task_loss(t, outs[t], batches[t]["labels"], config) for t in TASKS}
        losses = {t: config.task_weights[t] * loss for t, loss in raw.items() if loss.requires_grad}
        GRAD_METHODS[config.grad_method](losses, [p for p in upfront.parameters() if p.requires_grad], config=config,
                                         generator=torch.Generator().manual_seed(step))
        opts[1].step()
        opts[1].zero_grad(set_to_none=True)
        losses_by_step[0].append(out["losses"].read())
        losses_by_step[1].append({t: loss.item() for t, loss in raw.items()})
    _assert_trained_alike([model, upfront], losses_by_step, steps=len(plan))  # dropout masks unlike would show


# -- cuda_graphs: the compiled training path, traced on CPU ----------------------------------------------


@pytest.fixture
def compile_config():
    """use_cuda_graphs sets dynamo's recompile limit and inductor's random numbers for the whole process: put them
    back after the test, with torch's config.patch (pytest's monkeypatch undoes a torch config entry by deleting it,
    which hides it from every later reader: use_cuda_graphs itself would then fail)."""
    import torch._dynamo
    import torch._inductor.config
    with torch._dynamo.config.patch(cache_size_limit=torch._dynamo.config.cache_size_limit), \
            torch._inductor.config.patch(fallback_random=torch._inductor.config.fallback_random):
        yield


# steps as (encoder trains, tasks or None for all, an eval-mode forward after it): full steps, then heads-only ones
FULL_THEN_HEADS = [(True, None, False)] * 4 + [(False, None, False)] * 2
# as a tuned run goes (heads only, full, heads only), with a sequential run's one-task steps and an eval between
# steps: what the gpu-minilm runs that segfaulted with cuda_graphs on an H200 did and the test above did not
AS_THE_RUNS_GO = ([(False, None, True)] * 2 + [(True, None, True), (True, ("sst",), True), (True, ("para",), True)]
                  + [(False, None, True)])


def _eager_and_graphed(encoded, device, *, pcgrad=False, plan=FULL_THEN_HEADS, fuse=False, on_step=None):
    """Two copies of one tiny model trained side by side on the same batches, one eager and one through
    use_cuda_graphs (with fuse_tasks if `fuse`): batch sizes 8 and 16, several padded lengths, the steps of `plan`,
    on_step(batches, encoder trains) before each. SGD, so
    that a rounding difference in a gradient stays as small in the weights (Adam's first steps would turn a
    near-zero gradient's rounding into a step of +-lr). Returns (models, each one's losses by step, the distinct
    encoder inputs: (name, shape) of each tensor argument, and the grad mode)."""
    import copy
    from mtbert_utils.device import use_cuda_graphs
    from mtbert_utils.evaluation import to_device
    from mtbert_utils.training import training_step
    common = dict(encoder="tiny", dropout=0.0, encoder_dropout=0.0, pad_to_multiple=16, pcgrad=pcgrad,
                  progress=False)
    cfgs = TrainConfig(**common), TrainConfig(cuda_graphs=True, fuse_tasks=fuse, **common)
    eager = build_model(cfgs[0]).to(device)
    graphed = copy.deepcopy(eager)
    use_cuda_graphs(graphed, cfgs[1], torch.device("cuda"))  # on CPU a stand-in device: the model stays there
    assert graphed.graphed_encoder is not None
    inputs = set()
    eager.encoder.register_forward_pre_hook(lambda m, args, kw: inputs.add((
        tuple((k, tuple(v.shape)) for k, v in kw.items() if v is not None), torch.is_grad_enabled())),
        with_kwargs=True)
    models = eager, graphed
    opts = [torch.optim.SGD(m.parameters(), lr=0.01) for m in models]
    gens = [torch.Generator(device=device).manual_seed(0) for _ in models]  # PCGrad's task orders, alike
    losses = [[], []]
    for step, (trains, tasks, then_eval) in enumerate(plan):
        start, size = 8 * (step % 3), 8 * (1 + step % 2)
        batches = {t: to_device(collate(enc, range(start, start + size), eager.pair_mode(t), pad_to_multiple=16),
                                device) for t, enc in encoded.items() if tasks is None or t in tasks}
        if on_step is not None:
            on_step(batches, trains)
        for i, m in enumerate(models):
            m.train()
            m.set_encoder_trainable(trains)
            out = training_step(m, opts[i], batches, cfgs[i], device=device, generator=gens[i],
                                shared=[p for p in m.parameters() if p.requires_grad])
            losses[i].append(out["losses"].read())
            if then_eval:  # evaluation runs the eager encoder (model.eval()) between the graphed steps
                m.eval()
                with torch.no_grad():
                    m(batches)
    return models, losses, inputs


def _assert_trained_alike(models, losses, steps=6):
    # each value after TINY_FORWARD sequential roundings per step, steps in a row
    tol = float32_tol(TINY_FORWARD * steps)
    for a, b in zip(*losses):
        assert a.keys() == b.keys() and all(abs(a[t] - b[t]) <= tol * (abs(a[t]) + 1) for t in a), (a, b)
    states = [m.state_dict() for m in models]
    assert list(states[0]) == list(states[1])  # the compiled encoder adds no keys (test below)
    for k, a in states[0].items():
        assert (a - states[1][k]).abs().max().item() <= tol * (a.abs().max().item() + 1), k


def test_cuda_graphs_path_compiles_once_per_kind_of_input_and_trains_like_eager(encoded, one_thread, monkeypatch,
                                                                                 compile_config):
    """use_cuda_graphs compiles the encoder for training steps. A CPU has no CUDA graphs, so torch.compile
    gets dynamo's aot_eager backend here: it traces what reduce-overhead would compile, but runs eager
    kernels. Over batch sizes, padded lengths, full and heads-only steps: no graph break, one compile per
    kind of input with dynamic shapes (CUDA graphs are then recorded per shape, without compiling again),
    and the steps give the eager model's losses and weights."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, mode=None, dynamic=None: compile_(m, backend="aot_eager",
                                                                                      dynamic=dynamic))
    torch._dynamo.reset()
    counters.clear()
    models, losses, inputs = _eager_and_graphed(encoded, torch.device("cpu"))
    assert not counters["graph_break"], dict(counters["graph_break"])
    # one compile per kind of input (which tensors are passed, grad on or off), however many shapes:
    # a full-data run at batch 64 and pad_to_multiple=16 feeds 24 shapes (results/bench/graph_shapes.json)
    kinds = {(tuple(name for name, _ in shapes), grad) for shapes, grad in inputs}
    assert len(inputs) > 2 * len(kinds)  # the steps above do vary the shapes
    assert 0 < counters["stats"]["unique_graphs"] <= len(kinds)
    _assert_trained_alike(models, losses)
    for pcgrad in (True, False):  # PCGrad: one backward pass per task through the compiled forward
        for plan in (FULL_THEN_HEADS, AS_THE_RUNS_GO) if pcgrad else (AS_THE_RUNS_GO,):
            torch._dynamo.reset()
            _assert_trained_alike(*_eager_and_graphed(encoded, torch.device("cpu"), pcgrad=pcgrad, plan=plan)[:2])
    for plan in (FULL_THEN_HEADS, AS_THE_RUNS_GO):  # fuse_tasks: a step's tasks through one compiled call
        torch._dynamo.reset()
        _assert_trained_alike(*_eager_and_graphed(encoded, torch.device("cpu"), plan=plan, fuse=True)[:2])
    torch._dynamo.reset()


def _assert_backward_thread(encoded, device: torch.device, pcgrad: bool) -> None:
    """With cuda_graphs a step's backward runs with autograd's multithreading off, on the thread that called it;
    without graphs the step leaves autograd as it is (and puts the setting back after the step)."""
    import threading
    from mtbert_utils.evaluation import to_device
    from mtbert_utils.training import training_step
    for graphs in (False, True):
        config = TrainConfig(encoder="tiny", dropout=0.0, encoder_dropout=0.0, pad_to_multiple=16, pcgrad=pcgrad,
                             cuda_graphs=graphs, progress=False)
        model = build_model(config).to(device).train()  # eager: the switch is what is checked, not the graphs
        batches = {t: to_device(collate(enc, range(8), model.pair_mode(t), pad_to_multiple=16), device)
                   for t, enc in encoded.items()}
        seen = []
        shared = [p for p in model.parameters() if p.requires_grad]
        shared[0].register_hook(lambda g: seen.append((threading.get_ident(), torch._C._is_multithreading_enabled())))
        training_step(model, torch.optim.SGD(model.parameters(), lr=0.01), batches, config, device=device,
                      shared=shared)["losses"].read()
        assert seen and all(multithreaded is not graphs for _, multithreaded in seen), (graphs, seen)
        if graphs:
            assert {ident for ident, _ in seen} == {threading.get_ident()}
        assert torch._C._is_multithreading_enabled()


@pytest.mark.parametrize("pcgrad", [False, True])
def test_cuda_graphs_steps_run_their_backward_on_the_calling_thread(encoded, pcgrad):
    """cuda_graphs steps keep their backward off autograd's CUDA worker thread, where the graphs runs segfaulted
    (device.graphs_backward_thread). On CPU the backward runs on the calling thread anyway: the setting is checked."""
    _assert_backward_thread(encoded, torch.device("cpu"), pcgrad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: autograd's CUDA worker thread (gpu_run.py runs it)")
def test_cuda_graphs_steps_run_their_backward_on_the_calling_thread_on_cuda(encoded):
    for pcgrad in (False, True):
        _assert_backward_thread(encoded, torch.device("cuda"), pcgrad)


def test_graph_tree_model_predicts_each_run_of_a_profile(data_dir, monkeypatch, tmp_path):
    """graph_shapes.py --profile: the model's count for every first-stage run of a profile, keyed by the names the
    runs will have (as results/bench/graph_trees-gpu-minilm-check.json does for the GPU check), each run's steps
    replayed as train() draws them. With fuse_tasks a three-task step is one call, so the fused runs' trees hold no
    more than a call per task would; a PCGrad run's chains are one task long, so its nodes are its distinct calls.
    A run's kind of step is training_step's: gradient cosines keep a run task by task whatever fuse_tasks says (the
    prediction before GPU session 3 called the tuned runs, which record them, fused)."""
    monkeypatch.setenv("MTBERT_DATA_DIR", str(data_dir))
    gs = load_benchmark("graph_shapes")
    fused = gs.profile_predictions("smoke", {"speed": {"pad_to_multiple": 16, "fuse_tasks": True}})
    apart = gs.profile_predictions("smoke", {"speed": {"pad_to_multiple": 16}})
    listed = packing.train_only("smoke", out_root=tmp_path, list_only=True)
    assert set(fused) == set(apart) == {r["run_name"] for r in listed["runs"] if r["stage"] == 1}
    for name, r in fused.items():
        assert 0 < r["distinct_calls"] <= r["nodes"] <= apart[name]["nodes"], (name, r, apart[name])
        if "pcgrad" in name:
            assert r["step_kind"] == apart[name]["step_kind"] == "task by task" and r["nodes"] == r["distinct_calls"]
    assert any(r["nodes"] < apart[n]["nodes"] for n, r in fused.items())  # fusion does shrink some trees
    for fuse in (False, True):
        kinds = {(pcgrad, cosines): gs.step_kind(TrainConfig(fuse_tasks=fuse, pcgrad=pcgrad,
                                                             record_grad_cosines=cosines))
                 for pcgrad in (False, True) for cosines in (False, True)}
        assert kinds == {(False, False): "fused" if fuse else "a call per task", (False, True): "task by task",
                         (True, False): "task by task", (True, True): "task by task"}
    # docs/gpu.md quotes the committed prediction for the GPU check's six runs, in the order of the file
    from pathlib import Path
    import json
    import re
    root = Path(__file__).resolve().parents[1]
    check = json.loads((root / "results" / "bench" / "graph_trees-gpu-minilm-check.json").read_text())["runs"]
    doc = " ".join((root / "docs" / "gpu.md").read_text().split())
    quoted = re.search(r"the model predicts (\d+), (\d+), (\d+), (\d+), (\d+) and (\d+) graphs", doc)
    assert quoted and [int(x) for x in quoted.groups()] == [r["nodes"] for r in check.values()]
    # and the prediction for gpu-minilm itself with graphs and fusion: keyed by the names of the committed runs (the
    # switches are execution-only), its ranges quoted in docs/gpu.md
    full = json.loads((root / "results" / "bench" / "graph_trees-gpu-minilm.json").read_text())["runs"]
    committed = {p.stem for p in (root / "results" / "gpu-minilm" / "runs").glob("*.json")}
    assert set(full) == {n for n in committed if not n.startswith("zero-shot")} and len(full) == 18
    by_kind = {k: [r["nodes"] for r in full.values() if r["step_kind"] == k] for k in ("fused", "task by task")}
    assert len(by_kind["fused"]) == 9 and len(by_kind["task by task"]) == 9  # the nine tuned runs: gradient cosines
    quoted = re.search(r"(\d+) to (\d+) graphs for each of the 9 runs with fused steps and (\d+) to (\d+) for the "
                       r"nine tuned runs", doc)
    assert quoted and [int(x) for x in quoted.groups()] == [min(by_kind["fused"]), max(by_kind["fused"]),
                                                            min(by_kind["task by task"]), max(by_kind["task by task"])]


def test_graph_tree_model_counts_a_node_per_distinct_chain_of_calls():
    """benchmarks/graph_shapes.py's model of torch's graph trees ("trees" in results/bench/graph_shapes.json): with a
    call per task a full step is one chain (three forwards, three backwards), so a step that differs in its last
    task's shape adds four nodes; fuse_tasks makes a step one call (here both steps pad to one shape); PCGrad's
    chains are one task long; heads-only calls keep nothing, one chain each. docs/gpu.md and docs/speed.md quote
    the committed counts."""
    import json
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    gs = load_benchmark("graph_shapes")
    a = {"sst": ("no_types", 64, 32), "para": ("types", 64, 48), "sts": ("no_types", 128, 32)}
    b = dict(a, sts=("no_types", 128, 48))

    def nodes(how, trains=True):
        return gs.tree_nodes([c for step in (a, a, b) for c in gs.step_chains(step, trains, how)])
    assert nodes("a call per task") == 6 + 4
    assert nodes("fused") == 2 and nodes("task by task") == 2 * 4  # sst, para and both STS shapes, fwd and bwd each
    assert nodes("a call per task", trains=False) == nodes("task by task", trains=False) == 4
    assert nodes("fused", trains=False) == 1
    # token positions: a call per task pads each task to its own length, fusion every row to the step's longest
    per_task, fused = 64 * 32 + 64 * 48 + 128 * 32 + 64 * 32 + 64 * 48 + 128 * 48, 2 * 256 * 48
    assert gs.encoder_positions([(a, True), (b, False)]) == {"a call per task": per_task, "fused": fused,
                                                             "fused_ratio": round(fused / per_task, 3)}
    trees = json.loads((root / "results" / "bench" / "graph_shapes.json").read_text())["trees"]
    doc = " ".join((root / "docs" / "gpu.md").read_text().split())
    quoted = re.search(r"model of the trees gives (\d+) graphs with a call per task, (\d+) with `fuse_tasks` and (\d+) "
                       r"for PCGrad", doc)
    assert quoted and [int(x) for x in quoted.groups()] == [trees["nodes"][k] for k in ("a call per task", "fused",
                                                                                      "task by task")]
    speed = " ".join((root / "docs" / "speed.md").read_text().split())
    quoted = re.search(r"model of them counts (\d+) for a tuned run with a call per task and (\d+) with `fuse_tasks`",
                       speed)
    assert quoted and [int(x) for x in quoted.groups()] == [trees["nodes"][k] for k in ("a call per task", "fused")]
    positions = trees["encoder_positions"]
    assert positions["fused"] >= positions["a call per task"] > 0
    assert positions["fused_ratio"] == round(positions["fused"] / positions["a call per task"], 3)
    assert f"processes {positions['fused_ratio']} times the token positions" in speed
    assert f"pads to {positions['fused_ratio']}x the token positions" in speed
    assert f"{positions['fused_ratio']}x the token positions of a call per task" in doc


def _tiny_graphed(device=torch.device("cpu")):
    """(config, a tiny model with its default dropout on `device`, after use_cuda_graphs). On CPU the CUDA device is
    a stand-in: the encoder is compiled lazily, and reduce-overhead runs inductor's kernels without graphs."""
    import dataclasses
    from mtbert_utils.device import use_cuda_graphs
    cfg = TrainConfig(encoder="tiny", pad_to_multiple=16, progress=False)
    model = build_model(cfg).to(device)
    use_cuda_graphs(model, dataclasses.replace(cfg, cuda_graphs=True), torch.device("cuda"))
    return cfg, model


def test_cuda_graphs_leave_the_state_dict_as_eager(one_thread, compile_config):
    """The compiled encoder is not a submodule: a cuda_graphs model's state_dict (what its checkpoints and kept
    epochs hold) has the eager model's keys, and each loads into the other, so a run resumes with the switch
    on or off (it is execution-only: the run name and checkpoint are the same) and keeps the encoder once."""
    cfg, graphed = _tiny_graphed()
    eager = build_model(cfg)
    assert graphed.graphed_encoder is not None  # on CPU a stand-in device: compiled lazily, never run here
    assert list(graphed.state_dict()) == list(eager.state_dict())
    eager.load_state_dict(graphed.state_dict())  # strict: no key missing or unexpected
    graphed.load_state_dict(eager.state_dict())
    assert [n for n, _ in graphed.named_modules()] == [n for n, _ in eager.named_modules()]


def test_recorded_cuda_graphs_counts_every_node_of_the_graph_trees(monkeypatch):
    """Each epoch of a cuda_graphs run records how many graphs its trees hold (a step's second and third task forward
    grow them by sequence of shapes); counted over a stand-in tree here, as CUDA has none on CPU."""
    from types import SimpleNamespace
    from torch._inductor import cudagraph_trees
    from mtbert_utils.device import recorded_cuda_graphs

    def node(**children):
        return SimpleNamespace(children=children)
    roots = [node(f1=[node(f2=[node()]), node()]), node()]  # 5 nodes: two roots, a root's two children, a grandchild
    asked = []
    monkeypatch.setattr(cudagraph_trees, "get_manager", lambda index, create_if_none_exists=True: asked.append(
        (index, create_if_none_exists)) or SimpleNamespace(get_roots=lambda: iter(roots)))
    assert recorded_cuda_graphs(torch.device("cuda", 1)) == 5 and asked == [(1, False)]  # never creates a tree
    monkeypatch.setattr(cudagraph_trees, "get_manager", lambda index, create_if_none_exists=True: None)
    assert recorded_cuda_graphs(torch.device("cuda")) == 0
    monkeypatch.setattr(cudagraph_trees, "get_manager", lambda *a, **kw: SimpleNamespace())  # another torch's API
    assert recorded_cuda_graphs(torch.device("cuda")) is None


def _with_dropout(device):
    """The tiny encoder with dropout (0.1) in training, after use_cuda_graphs, and a batch for it."""
    model = _tiny_graphed(device)[1].train()
    ids = torch.randint(1000, 2000, (4, 16), generator=torch.Generator().manual_seed(0)).to(device)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _assert_same_draws(model, batch):
    """From one seed, the compiled encoder's hidden states and the generator's next draw are eager's."""
    def draw(encoder):
        torch.manual_seed(123)
        hidden = encoder(**batch).last_hidden_state.detach().clone()  # clone: a graph's output is reused
        return hidden, torch.rand(3, device=hidden.device)
    (eager, eager_next), (graphed, graphed_next) = draw(model.encoder), draw(model.graphed_encoder)
    assert torch.equal(eager_next, graphed_next)  # the generator is where eager's draws leave it
    tol = float32_tol(TINY_FORWARD)
    assert (eager - graphed).abs().max().item() <= tol * (eager.abs().max().item() + 1)


def test_cuda_graphs_draw_eagers_dropout_masks(one_thread, compile_config):
    """inductor (what reduce-overhead compiles with) draws dropout's random numbers its own way: hidden states off by
    units, and the eager generator left elsewhere, so a graphs run was a run with other masks under the same name.
    use_cuda_graphs makes it draw eager's. On CPU reduce-overhead gives inductor's kernels without graphs (the
    real compiler, no stand-in backend: ~20 s); the test below checks graph replays on a GPU."""
    _assert_same_draws(*_with_dropout(torch.device("cpu")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: real CUDA graphs (gpu_run.py runs it)")
def test_cuda_graphs_on_cuda_draw_eagers_dropout_masks(compile_config):
    import torch._dynamo
    torch._dynamo.reset()
    model, batch = _with_dropout(torch.device("cuda"))
    for _ in range(4):  # cudagraph trees run a new graph eagerly first, then record it, then replay it
        torch.compiler.cudagraph_mark_step_begin()
        _assert_same_draws(model, batch)
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: real CUDA graphs (gpu_run.py runs it)")
def test_cuda_graphs_on_cuda_train_like_eager(encoded, compile_config):
    """The same on a GPU, with torch.compile(mode="reduce-overhead") as training uses it: CUDA graphs replayed
    over the steps, with the summed task losses and with PCGrad (one backward pass per task), full and
    heads-only steps in either order, one-task steps and evaluation between steps, give the eager model's losses
    and weights."""
    import torch._dynamo
    for pcgrad, fuse in ((False, False), (True, False), (False, True)):
        for plan in (FULL_THEN_HEADS, AS_THE_RUNS_GO):
            torch._dynamo.reset()
            models, losses, _ = _eager_and_graphed(encoded, torch.device("cuda"), pcgrad=pcgrad, plan=plan, fuse=fuse)
            _assert_trained_alike(models, losses)
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: real CUDA graph trees (gpu_run.py runs it)")
def test_cuda_graphs_with_fused_tasks_record_two_graphs_per_step_shape(encoded, compile_config):
    """torch's graph trees record a step's second and third task call as children of the first (its activations
    wait for the backward), so with a call per task they grow by sequence of shapes within a step. With fuse_tasks
    a step is one call: at most a forward and a backward graph per (shape of the shared call, grad mode). PCGrad
    steps keep a call per task, each task's forward just before its backward: their count is reported, not bounded.
    The counts go to pytest's warnings summary, in the GPU command's log."""
    import torch._dynamo
    from mtbert_utils.device import recorded_cuda_graphs
    device = torch.device("cuda")
    plan = [(True, None, False)] * 12 + [(False, None, False)] * 4 + [(True, None, False)] * 4
    model, counts, shapes = build_model(TrainConfig(encoder="tiny")), {}, set()

    def shape_of(batches, trains):  # the shared call's input: the tasks' rows stacked, padded to the longest
        parts = [p for t, b in batches.items() for p in model.encoder_inputs(t, b)]
        shapes.add((sum(p[0].shape[0] for p in parts), max(p[0].shape[1] for p in parts), trains))

    for name, fuse, pcgrad in [("a call per task", False, False), ("fused", True, False), ("pcgrad", False, True)]:
        torch._dynamo.reset()
        before = recorded_cuda_graphs(device) or 0
        _eager_and_graphed(encoded, device, plan=plan, fuse=fuse, pcgrad=pcgrad, on_step=shape_of if fuse else None)
        now = recorded_cuda_graphs(device)
        assert now is not None, "this torch's graph trees cannot be counted (device.recorded_cuda_graphs)"
        counts[name] = now - before
    torch._dynamo.reset()
    warnings.warn(f"CUDA graphs recorded over {len(plan)} three-task steps: {counts}; "
                  f"{len(shapes)} shapes of the shared call", stacklevel=1)
    assert 0 < counts["fused"] <= 2 * len(shapes), (counts, sorted(shapes))  # a forward and a backward each


# -- host reads: a training step queues its work and reads nothing back; the loop reads its losses a step later --


HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__")


def refuse_host_reads(m: pytest.MonkeyPatch) -> None:
    """Tensor methods that bring a value to the host raise (on CUDA each one waits for the GPU to finish).

    One read is not ours and is let be: the eager encoder's forward asks transformers whether a batch has padding
    (`padding_mask.all()`, to drop the mask for SDPA's flash kernel). Under CUDA graphs it is traced away, and the
    eager step is bound by kernel launches (the GPU's queue stays short, so that sync waits for little)."""
    from transformers import masking_utils
    m.setattr(masking_utils, "_ignore_bidirectional_mask_sdpa", lambda *args, **kw: False, raising=False)

    def refuse(name):
        def read(self, *args, **kw):
            raise AssertionError(f"Tensor.{name}() in a training step: a host sync on CUDA")
        return read
    for name in HOST_READS:
        m.setattr(torch.Tensor, name, refuse(name))


@pytest.mark.parametrize("task_set", ["all three", "sst alone"])
def test_a_training_step_reads_nothing_back_and_its_losses_come_later(encoded, one_thread, monkeypatch, task_set):
    """Summed losses: forward, losses, backward and optimizer step are all queued, nothing is read back; the loop
    reads the step's losses later (PendingLosses.read), and they are the losses of the weights before the step."""
    import copy
    from mtbert_utils.training import task_loss, training_step
    config = TrainConfig(encoder="tiny", dropout=0.0, encoder_dropout=0.0, progress=False)
    model = build_model(config).train()
    tasks = list(encoded) if task_set == "all three" else ["sst"]
    batches = {t: collate(encoded[t], range(8), model.pair_mode(t)) for t in tasks}
    with torch.no_grad():
        outs = copy.deepcopy(model)(batches)
    expected = {t: float(task_loss(t, outs[t], b["labels"], config)) for t, b in batches.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.01)  # (AdamW on CPU reads its step counters: .item())
    before = [p.detach().clone() for p in model.parameters()]
    with monkeypatch.context() as m:
        refuse_host_reads(m)
        out = training_step(model, opt, batches, config, device=torch.device("cpu"),
                            shared=[p for p in model.parameters() if p.requires_grad])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the step did train
    got = out["losses"].read()
    tol = float32_tol(TINY_FORWARD)
    assert list(got) == tasks and all(abs(got[t] - expected[t]) <= tol * (abs(expected[t]) + 1) for t in got), \
        (got, expected)


def test_a_cached_heads_only_step_reads_nothing_back(encoded, one_thread, monkeypatch):
    """cache_frozen_encoder: the cache's keys come from the batch's host-side ids, not from a tensor (on CUDA,
    reading the batch's index tensor after it was copied to the GPU waited for the GPU at every step)."""
    from mtbert_utils.training import training_step
    config = TrainConfig(encoder="tiny", dropout=0.0, encoder_dropout=0.0, progress=False)
    model = build_model(config)
    model.set_encoder_trainable(False)
    model.train()
    model.embed_cache = {}
    calls = _count_encoder_calls(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    with monkeypatch.context() as m:
        refuse_host_reads(m)
        for rows in (range(8), [7, 3, 0, 5, 1, 2, 6, 4]):  # fills the cache, then reads it
            batches = {t: collate(enc, rows, model.pair_mode(t)) for t, enc in encoded.items()}
            training_step(model, opt, batches, config, device=torch.device("cpu"), shared=[])
    assert len(calls) == len(TASKS) and len(model.embed_cache) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the GPU's own check of host syncs")
def test_cuda_training_steps_make_no_host_sync(encoded):
    """On a GPU, with fused AdamW, gradient clipping and the batches copied through pinned memory (to_device):
    torch's sync debug mode raises on any synchronizing call in the steps after the first, full steps and then
    cached heads-only ones."""
    from mtbert_utils.evaluation import to_device
    from mtbert_utils.optim import build_optimizer
    from mtbert_utils.training import training_step
    device = torch.device("cuda")
    config = TrainConfig(encoder="tiny", progress=False, max_grad_norm=1.0)
    model = build_model(config).to(device).train()
    opt = build_optimizer(model, config, device)  # "auto": fused on CUDA
    shared = [p for p in model.parameters() if p.requires_grad]
    batches = [{t: collate(enc, range(8 * i, 8 * i + 8), model.pair_mode(t)) for t, enc in encoded.items()}
               for i in range(4)]

    def step(b):
        return training_step(model, opt, {t: to_device(x, device) for t, x in b.items()}, config, device=device,
                             shared=shared)

    pending = [step(batches[0])]
    torch.cuda.synchronize()  # the first step allocates (optimizer state, pinned buffers)
    with pytest.MonkeyPatch.context() as m:
        refuse_host_reads(m)  # for its one exemption (transformers' padding check); CUDA's own check is below
        torch.cuda.set_sync_debug_mode("error")
        try:
            pending += [step(b) for b in batches[1:]]
            model.set_encoder_trainable(False)  # heads only, cache_frozen_encoder: fill the cache, then read it
            model.embed_cache = {}
            pending += [step(batches[0]), step(batches[0])]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(math.isfinite(v) for p in pending for v in p["losses"].read().values())


def test_predict_copies_its_outputs_to_the_host_once(encoded, one_thread, monkeypatch):
    """Evaluation keeps each batch's outputs on the device and copies them to the host once at the end (per pair
    order): on CUDA a copy per batch would make the GPU wait for the host between batches."""
    model = build_model(TrainConfig(encoder="tiny"))
    real_cpu, copies = torch.Tensor.cpu, []
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **kw: copies.append(self.shape) or real_cpu(self, *a, **kw))
    for t, enc in encoded.items():
        for symmetric in (False, True):
            copies.clear()
            n_batches = sum(1 for _ in eval_batches(enc, 8, model.pair_mode(t)))
            out = predict(model, enc, 8, symmetric=symmetric)
            orders = 2 if symmetric and model.pair_mode(t) == "joint" and enc.single is None else 1  # (b, a) too
            assert n_batches > 1 and len(out["raw"]) == len(enc)
            # the outputs' copies (one per order), and predictions_from_outputs' no-op .cpu() of the CPU result
            assert len(copies) == orders + 1, (t, symmetric, copies)
