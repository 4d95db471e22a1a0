"""Optimisation: the optimizer's parameter groups (one learning rate per module, optionally decayed layer by
layer in the encoder), the AdamW implementation, and the step decay of every learning rate between epochs."""

from __future__ import annotations

import re

import torch
from torch import nn

from mtbert_utils.config import TrainConfig
from mtbert_utils.model import MultitaskBert


def lr_multiplier(epoch: int, decay: float, milestones) -> float:
    """Step decay: multiply by `decay` once for every milestone epoch already reached."""
    return decay ** sum(epoch >= m for m in milestones)


def encoder_depths(encoder: nn.Module) -> dict[str, int]:
    """Each encoder parameter's distance from the top, by name: 0 for the last transformer layer (and the
    pooler above it), L - 1 - i for layer i of L, L for the embeddings."""
    names = [n for n, _ in encoder.named_parameters()]
    layer = {n: int(m.group(1)) for n in names if (m := re.search(r"(?:^|\.)layer\.(\d+)\.", n))}
    if not layer:
        raise ValueError("layer_lr_decay needs an encoder with numbered layers (.layer.<i>.)")
    top = max(layer.values())
    return {n: top - layer[n] if n in layer else (top + 1 if "embeddings" in n else 0) for n in names}


def param_groups(model: MultitaskBert, config: TrainConfig) -> list[dict]:
    """Optimizer groups: one per module with its own learning rate (config.lr); with layer_lr_decay != 1
    the encoder is split further, one group per depth (see encoder_depths)."""
    groups = []
    for name, ps in model.module_groups().items():
        if not ps:
            continue
        if name == "encoder" and config.layer_lr_decay != 1.0:
            depth = encoder_depths(model.encoder)
            by_depth = {}
            for n, p in model.encoder.named_parameters():
                by_depth.setdefault(depth[n], []).append(p)
            for d in sorted(by_depth):
                lr = config.lr[name] * config.layer_lr_decay ** d
                groups.append({"params": by_depth[d], "lr": lr, "base_lr": lr, "name": f"encoder.depth{d}"})
            continue
        groups.append({"params": ps, "lr": config.lr[name], "base_lr": config.lr[name], "name": name})
    return groups


def build_optimizer(model: MultitaskBert, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, config)
    # auto: foreach on CPU, fused on CUDA (one kernel over all tensors instead of a Python loop)
    kind = config.optimizer if config.optimizer != "auto" else ("fused" if device.type == "cuda" else "foreach")
    kw = {"fused": {"fused": True}, "foreach": {"foreach": True}, "forloop": {"foreach": False}}[kind]
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay, **kw)
