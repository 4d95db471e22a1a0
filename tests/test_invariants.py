"""What a training run actually does, read from the optimizer and the weights, never from recorded flags.

Each test names the bug it exists for. They go through `train(config)` and its checkpoint file
only, so they hold whatever shape the loop inside takes.
"""

from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from mtbert_utils.training import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _checkpoint_model(config) -> dict:
    """The model weights of the run's last checkpoint (written at the end of every epoch)."""
    path = Path(config.out_dir) / "checkpoints" / config.run_name / "last.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_optimizer_learning_rates_follow_the_step_decay_in_every_epoch(tiny_config, tmp_path):
    """Invariant: every optimizer step of epoch e (0-based) uses lr[group] * decay ** (milestones <= e).

    Kills: the decay applied one epoch late (or early), applied to some groups only, or applied to
    the recorded multiplier but not to the optimizer.
    """
    decay, milestones = 0.5, [1, 2]
    config = tiny_config(tmp_path, phases=[[3, True]], lr_decay=decay, lr_decay_epochs=milestones)
    used = []  # one {group name: lr} per optimizer step, read at the moment the step runs

    def record(optimizer, args, kwargs):
        used.append({g["name"]: g["lr"] for g in optimizer.param_groups})

    handle = register_optimizer_step_pre_hook(record)  # every optimizer, whoever builds it
    try:
        result = train(config)
    finally:
        handle.remove()
    ends = [r["steps"] for r in result["history"]]  # cumulative optimizer steps after each epoch
    assert len(used) == ends[-1] and len(ends) == 3
    starts = [0] + ends[:-1]
    for epoch, (a, b) in enumerate(zip(starts, ends)):
        factor = decay ** sum(epoch >= m for m in milestones)
        assert b > a
        for step in used[a:b]:
            assert {"encoder", "shared", "sst", "para"} <= set(step) <= set(config.lr)  # cosine STS: no sts head
            for name, lr in step.items():
                # float64 products of at most 3 factors: a few ulps apart at most
                assert lr == pytest.approx(config.lr[name] * factor, rel=8 * 2.0**-52), (epoch, name)


def test_encoder_weights_do_not_move_in_a_heads_only_epoch(tiny_config, tmp_path):
    """Invariant: across a heads-only epoch the encoder's weights are bit-identical, the heads' move.

    The heads-only epoch follows a full one, so AdamW holds momentum for the encoder: zeroed (instead
    of absent) gradients, weight decay, or an encoder left requiring grad would all move it.
    """
    phases = [[1, True], [1, False], [1, True]]
    # the weights after epoch 1, from a run stopped there (runs are deterministic: test_training)
    first = tiny_config(tmp_path / "one", phases=phases, weight_decay=0.01)
    assert train(first, max_epochs=1)["status"] == "interrupted"
    before = _checkpoint_model(first)
    # epochs 1 and 2 in one process, so the optimizer's state and any leftover .grad carry over
    config = tiny_config(tmp_path / "two", phases=phases, weight_decay=0.01)
    assert train(config, max_epochs=2)["status"] == "interrupted"
    after = _checkpoint_model(config)
    encoder = [k for k in before if k.startswith("encoder.")]
    heads = [k for k in before if k.startswith(("sst_head.", "para_head.", "shared."))]
    assert encoder and heads
    moved = {k: float((after[k].float() - before[k].float()).abs().max()) for k in encoder
             if not torch.equal(after[k], before[k])}
    assert not moved, f"encoder weights moved in a heads-only epoch: {moved}"
    assert any(not torch.equal(after[k], before[k]) for k in heads), "the heads did not train"
    # and the next full epoch trains the encoder again (the freeze is undone)
    assert train(config, resume=True)["status"] == "finished"
    third = _checkpoint_model(config)
    assert any(not torch.equal(third[k], after[k]) for k in encoder)


def test_encoder_weights_do_not_move_in_the_first_heads_only_phase(tiny_config, tmp_path):
    """Invariant: the default tuned shape (heads only first) leaves the freshly built encoder untouched."""
    from mtbert_utils.training import build_model
    config = tiny_config(tmp_path, phases=[[1, False], [1, True]])
    initial = build_model(config).state_dict()
    assert train(config, max_epochs=1)["status"] == "interrupted"
    after = _checkpoint_model(config)
    encoder = [k for k in initial if k.startswith("encoder.")]
    assert encoder and all(torch.equal(after[k], initial[k]) for k in encoder)
    assert not all(torch.equal(after[k], initial[k]) for k in initial if k.startswith("sst_head."))
