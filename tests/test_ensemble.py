"""Snapshot ensembles chosen on validation, and pair-order augmentation / symmetric inference for paraphrase."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mtbert_utils.batching import EncodedTask, TaskBatchStream, collate, eval_batches
from mtbert_utils.evaluation import combine_outputs, ensemble_prediction, predict, score, select_members
from mtbert_utils.training import TrainConfig, train

from conftest import TINY_FORWARD, float32_tol


# -- combining outputs ------------------------------------------------------------------

def test_combine_outputs_averages_probabilities_by_hand():
    # sst: mean of softmax probabilities, returned as log-probabilities
    a, b = np.log([[0.7, 0.1, 0.1, 0.05, 0.05]]), np.log([[0.1, 0.5, 0.2, 0.1, 0.1]])
    # in float32: a softmax over 5 classes, a mean of 2, a log and an exp
    assert np.exp(combine_outputs("sst", [a, b])) == pytest.approx(np.array([[0.4, 0.3, 0.15, 0.075, 0.075]]),
                                                                  rel=float32_tol(5 + 2 + 2), abs=0)
    # para: mean probability, back as a logit: p = (0.9 + 0.2) / 2 = 0.55 -> logit 0.2007
    la, lb = np.log(0.9 / 0.1), np.log(0.2 / 0.8)
    # in float32: a cast, a sigmoid, a mean of 2 and a logit, whose slope 1 / (p (1 - p)) scales p's rounding
    assert combine_outputs("para", [np.array([la]), np.array([lb])]) == pytest.approx(
        [np.log(0.55 / 0.45)], rel=0, abs=float32_tol(1 + 2 + 2 + 2) / (0.55 * 0.45))
    # a confident wrong member and an unsure right one: the probability average is not the logit average
    assert combine_outputs("para", [np.array([-4.0]), np.array([0.5])])[0] < 0 < (-4.0 + 0.5 * 9)
    assert combine_outputs("sts", [np.array([0.2, 0.4]), np.array([0.6, 0.0])]) == pytest.approx([0.4, 0.2], rel=float32_tol(3))
    with pytest.raises(ValueError, match="at least one member"):
        combine_outputs("sts", [])


def test_ensemble_prediction_checks_the_examples_match():
    m1 = {"ids": ["x", "y"], "raw": np.array([2.0, -1.0]), "pred": None, "gold": np.array([1, 0])}
    m2 = {"ids": ["x", "y"], "raw": np.array([-1.0, -3.0]), "pred": None, "gold": np.array([1, 0])}
    out = ensemble_prediction("para", [m1, m2])
    assert out["ids"] == ["x", "y"] and list(out["pred"]) == [1, 0] and list(out["gold"]) == [1, 0]
    with pytest.raises(ValueError, match="different examples"):
        ensemble_prediction("para", [m1, {**m2, "ids": ["y", "x"]}])


def test_select_members_by_hand():
    gold = np.array([1, 1, 1, 0, 0])
    # e1 right on 4/5, e2 and e3 on 3/5 each; e1 + e2 (probabilities averaged) on 5/5
    cands = {1: np.array([3.0, 3.0, -0.5, -3.0, -3.0]),
             2: np.array([-0.2, 3.0, 3.0, 0.3, -3.0]),
             3: np.array([-3.0, -3.0, 3.0, -3.0, -3.0])}
    c = select_members("para", cands, gold)
    assert c["single"] == {1: 0.8, 2: 0.6, 3: 0.6}
    assert c["members"] == [1, 2] and c["val"] == 1.0 and c["val_by_k"][:2] == [0.8, 1.0]
    # k capped at 1: the best single epoch; a tie between 2 and 3 goes to the earlier one
    assert select_members("para", cands, gold, max_members=1)["members"] == [1]
    assert select_members("para", {3: cands[3], 2: cands[2]}, gold, max_members=1)["members"] == [3]
    # when no ensemble beats the top-1 on validation, k = 1
    assert select_members("para", {1: cands[1], 3: cands[3]}, gold)["members"] == [1]
    with pytest.raises(ValueError, match="no candidates"):
        select_members("para", {}, gold)


# -- pair order --------------------------------------------------------------------------

def pair_task():
    # [CLS]=101, [SEP]=102; a = 5 6, b = 7 8 9; the third pair was truncated jointly
    return EncodedTask("para", ids=["p0", "p1", "p2"], labels=torch.tensor([1.0, 0.0, 1.0]),
                       joint=[[101, 5, 6, 102, 7, 8, 9, 102], [101, 11, 102, 12, 102], [101, 5, 102, 7, 102]],
                       joint_types=[[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 1, 1]],
                       a=[[101, 5, 6, 102], [101, 11, 102], [101, 5, 6, 102]],
                       b=[[101, 7, 8, 9, 102], [101, 12, 102], [101, 7, 8, 9, 102]])


def test_collate_swaps_the_pair_order():
    enc = pair_task()
    assert enc.swapped_joint(0) == ([101, 7, 8, 9, 102, 5, 6, 102], [0, 0, 0, 0, 0, 1, 1, 1])
    assert enc.swapped_joint(2) is None  # truncated: the two orders would not hold the same tokens
    b = collate(enc, [0, 1, 2], "joint", swap=[True, False, True])
    assert b["input_ids"][0].tolist() == [101, 7, 8, 9, 102, 5, 6, 102]
    assert b["token_type_ids"][0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert b["input_ids"][1].tolist()[:5] == [101, 11, 102, 12, 102]  # not swapped
    assert b["input_ids"][2].tolist()[:5] == [101, 5, 102, 7, 102]  # truncated: kept as it was
    assert collate(enc, [0], "joint")["input_ids"][0].tolist() == enc.joint[0]
    with pytest.raises(ValueError, match="2 flags for 3 examples"):
        collate(enc, [0, 1, 2], "joint", swap=[True, False])


def test_stream_swaps_about_half_and_resumes_exactly(small_data_dir):
    from mtbert_utils.batching import encode_task
    from mtbert_utils.data import load_task
    from mtbert_utils.model import load_tokenizer
    enc = encode_task(load_task("para", small_data_dir).train[:200], load_tokenizer("tiny"), "para")
    s = TaskBatchStream(enc, 16, seed=3, swap_pairs=True)
    batches = [next(s) for _ in range(12)]
    swapped = sum(row != enc.joint[i][:len(row)] for b in batches
                  for row, i in zip([r[m.bool()].tolist() for r, m in zip(b["input_ids"], b["attention_mask"])],
                                    b["index"].tolist()))
    n = sum(len(b["ids"]) for b in batches)
    assert 0.35 * n < swapped < 0.65 * n, (swapped, n)
    # a stream restored mid-pass swaps exactly as the uninterrupted one
    a = TaskBatchStream(enc, 16, seed=3, swap_pairs=True)
    for _ in range(5):
        next(a)
    b = TaskBatchStream(enc, 16, seed=3, swap_pairs=True)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(15):  # across the pass boundary (13 batches a pass)
        x, y = next(a), next(b)
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["token_type_ids"], y["token_type_ids"])
    # without swap_pairs every pair comes in file order; swapping needs a joint pair task
    plain = TaskBatchStream(enc, 16, seed=3)
    for _ in range(3):
        b = next(plain)
        rows = [r[m.bool()].tolist() for r, m in zip(b["input_ids"], b["attention_mask"])]
        assert rows == [enc.joint[i] for i in b["index"].tolist()]
    assert not TaskBatchStream(enc, 16, seed=3, pair_mode="separate", swap_pairs=True).swap_pairs


def test_symmetric_prediction_averages_both_orders(tiny_config, tmp_path):
    from mtbert_utils.model import load_tokenizer
    from mtbert_utils.batching import prepare_data
    from mtbert_utils.training import build_model
    config = tiny_config(tmp_path)
    model = build_model(config).eval()
    enc, _ = prepare_data(config, load_tokenizer("tiny"))
    para = enc["dev"]["para"]
    plain = predict(model, para)["raw"]
    with torch.no_grad():
        outs, index = [], []
        for batch in eval_batches(para, 32, swap=True):
            outs.append(model.forward_task("para", batch))
            index.append(batch["index"])
        swapped = torch.cat(outs)[torch.cat(index).argsort()].numpy()
    assert not np.allclose(plain, swapped)  # the joint encoder sees order
    # predict batches by 128, the loop above by 32: the forward sums in another order
    tol = float32_tol(TINY_FORWARD + 2) * float(np.abs(plain).max())
    assert predict(model, para, symmetric=True)["raw"] == pytest.approx((plain + swapped) / 2, rel=0, abs=tol)
    # other tasks (and embedded pairs) are unchanged by symmetric=True
    for t in ("sst", "sts"):
        assert np.array_equal(predict(model, enc["dev"][t])["raw"], predict(model, enc["dev"][t], symmetric=True)["raw"])


# -- training ----------------------------------------------------------------------------

def test_snapshot_ensemble_config_is_checked(tiny_config, tmp_path):
    with pytest.raises(ValueError, match="set val_fraction"):
        tiny_config(tmp_path, snapshot_ensemble=2)
    with pytest.raises(ValueError, match="snapshot_ensemble must be an int"):
        tiny_config(tmp_path, val_fraction=0.2, snapshot_ensemble=True)
    with pytest.raises(ValueError, match="para_swap"):
        tiny_config(tmp_path, para_swap=1)
    base = TrainConfig(encoder="tiny")
    assert TrainConfig(encoder="tiny", snapshot_ensemble=0, para_swap=False).run_name == base.run_name
    assert TrainConfig(encoder="tiny", para_swap=True).run_name != base.run_name


@pytest.fixture(scope="module")
def snapshot_run(tiny_config, tmp_path_factory, one_thread):
    config = tiny_config(tmp_path_factory.mktemp("snap"), val_fraction=0.3, max_train=64, snapshot_ensemble=2,
                         para_swap=True, phases=[[3, True]], write_predictions=True)
    return config, train(config)


def test_snapshot_ensemble_is_chosen_on_validation_and_predicts_dev(snapshot_run):
    from mtbert_utils.model import load_tokenizer
    from mtbert_utils.batching import prepare_data
    from mtbert_utils.training import build_model
    config, result = snapshot_run
    assert all("dev" not in h for h in result["history"])
    chosen = result["selection"]["snapshot_ensemble"]
    enc, _ = prepare_data(config, load_tokenizer("tiny"))
    ckpt_dir = Path(config.out_dir) / "checkpoints" / result["run_name"]
    model = build_model(config)
    for t in ("sst", "para", "sts"):
        c = chosen[t]
        assert 1 <= len(c["epochs"]) <= 2 and c["val"] == max(c["val_by_k"])
        assert c["val_single"][str(c["epochs"][0])] == max(c["val_single"].values())  # top-1 first
        # each epoch's validation score is the one in the history
        for e, v in c["val_single"].items():
            assert v == pytest.approx(result["history"][int(e) - 1]["val"][t])
        # dev = the chosen epochs' saved weights, predicted (both pair orders) and averaged
        members = []
        for e in c["epochs"]:
            model.load_state_dict(torch.load(ckpt_dir / f"epoch{e}.pt", weights_only=True))
            members.append(predict(model, enc["dev"][t], config.eval_batch_size, symmetric=True))
        ens = ensemble_prediction(t, members, model.sts_head_kind)
        assert score(t, ens["pred"], enc["dev"][t]) == pytest.approx(result["dev"][t])
        assert c["dev_single"][str(c["epochs"][0])] == pytest.approx(score(t, members[0]["pred"], enc["dev"][t]))
    # the prediction files hold the ensemble's predictions
    lines = (Path(result["predictions_dir"]) / "para-dev-output.csv").read_text().splitlines()[1:]
    assert len(lines) == len(enc["dev"]["para"])


def test_snapshot_ensemble_run_resumes_exactly(snapshot_run, tmp_path):
    config, full = snapshot_run
    part = TrainConfig(**{**config.to_dict(), "out_dir": str(tmp_path), "write_predictions": False})
    assert train(part, max_epochs=2)["status"] == "interrupted"
    resumed = train(part, resume=True)
    assert resumed["dev"] == full["dev"] and resumed["selection"] == full["selection"]
