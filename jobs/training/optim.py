"""The paper's recipe: AdamW without weight decay on 1-D parameters, linear warmup then cosine decay."""

from __future__ import annotations

import math

import torch


def build_optimizer(net: torch.nn.Module, lr: float, weight_decay: float, fused: bool = False) -> torch.optim.AdamW:
    """`fused` (CUDA) updates every parameter in a few kernels instead of several per parameter tensor. Build it
    after the model sits on its device: a fused optimizer needs its parameters there, and `load_state_dict` places
    the loaded state next to each parameter as it is at that moment."""
    decay, no_decay = [], []
    for param in net.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=fused or None)


def warmup_cosine(total_steps: int, warmup_steps: int, lr: float, min_lr: float):
    """Multiplier of the base lr at optimizer step `step` (0-based)."""
    floor = min_lr / lr

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_scheduler(optimizer, total_steps: int, warmup_steps: int, lr: float, min_lr: float):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup_steps, lr, min_lr))
