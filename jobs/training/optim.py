"""The paper's recipe, from timm: AdamW without weight decay on 1-D parameters (norms, biases, scales), linear warmup
then cosine decay, per optimizer step."""

from __future__ import annotations

import torch
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler


def build_optimizer(net: torch.nn.Module, lr: float, weight_decay: float, fused: bool = False) -> torch.optim.AdamW:
    """`fused` (CUDA) updates every parameter in a few kernels instead of several per parameter tensor. Build it
    after the model sits on its device: a fused optimizer needs its parameters there, and `load_state_dict` places
    the loaded state next to each parameter as it is at that moment."""
    groups = param_groups_weight_decay(net, weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=fused or None)


def build_scheduler(optimizer, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> CosineLRScheduler:
    """From lr / warmup_steps up to lr over the warmup steps, then a cosine down to min_lr at `total_steps`. It sets
    the optimizer's rate for an optimizer step: `step_update(n)` once n steps are done (a checkpoint keeps its
    state, so a resumed run continues the same curve)."""
    return CosineLRScheduler(
        optimizer, t_initial=max(1, total_steps - warmup_steps), lr_min=min_lr, warmup_t=warmup_steps,
        warmup_lr_init=lr / max(1, warmup_steps), warmup_prefix=True, t_in_epochs=False,
    )
