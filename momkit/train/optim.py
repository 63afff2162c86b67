"""AdamW with weight-decay groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from momkit.config import OptimConfig


def no_decay(name: str, param: nn.Parameter) -> bool:
    """No weight decay on norms, biases and gate parameters (vectors, anything inside a rule's gate
    module, and parameters marked ``_no_weight_decay`` such as A_log and dt_bias)."""
    return param.dim() < 2 or getattr(param, "_no_weight_decay", False) or ".gates." in f".{name}."


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, keep = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (keep if no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> tuple[torch.optim.Optimizer, LambdaLR]:
    groups = param_groups(model, cfg.weight_decay)
    # on a GPU, one fused kernel updates every parameter (a small model's step is bound by its launches); on the
    # CPU the default (per-op over lists of tensors) implementation, whose numbers the CPU runs were made with
    on_gpu = all(p.is_cuda for g in groups for p in g["params"])
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                            **({"fused": True} if on_gpu else {}))

    def factor(step: int) -> float:  # multiplies lr; step = optimizer steps taken so far
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return opt, LambdaLR(opt, factor)
