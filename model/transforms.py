"""Clip tensors from the dataset's uint8 `[B, T, S, S, 3]` to the model's normalised `[B, 3, T, H, W]`, batched on
whatever device the clips are on (augmentation runs on the training device, not in the data loader)."""

from __future__ import annotations

import torch

from model.uniformerv2 import CLIP_MEAN, CLIP_STD


def normalize(clips: torch.Tensor) -> torch.Tensor:
    """uint8 `[B, T, H, W, 3]` -> CLIP-normalised float `[B, 3, T, H, W]`."""
    mean = torch.tensor(CLIP_MEAN, device=clips.device) * 255.0
    inv_std = 1.0 / (torch.tensor(CLIP_STD, device=clips.device) * 255.0)
    x = (clips.float() - mean) * inv_std
    return x.permute(0, 4, 1, 2, 3).contiguous()


def center_crop(clips: torch.Tensor, size: int) -> torch.Tensor:
    """Central `size` x `size` window of `[B, T, H, W, 3]`."""
    height, width = clips.shape[2:4]
    if size > min(height, width):
        raise ValueError(f"crop size {size} exceeds the stored {height}x{width} frames")
    top, left = (height - size) // 2, (width - size) // 2
    return clips[:, :, top : top + size, left : left + size]


def random_crop_flip(
    clips: torch.Tensor, size: int, generator: torch.Generator | None = None, flip: bool = True
) -> torch.Tensor:
    """An independent random `size` window and (with `flip`) horizontal flip per clip of `[B, T, H, W, 3]`, the
    same for all frames of a clip, gathered in one indexing op (no loop over clips). Turn flipping off for classes
    that depend on left/right (Something-Something's "pushing left to right", motion direction)."""
    batch, _, height, width, _ = clips.shape
    if size > min(height, width):
        raise ValueError(f"crop size {size} exceeds the stored {height}x{width} frames")
    device = clips.device
    tops = torch.randint(0, height - size + 1, (batch,), generator=generator, device="cpu").to(device)
    lefts = torch.randint(0, width - size + 1, (batch,), generator=generator, device="cpu").to(device)
    flips = (torch.rand(batch, generator=generator, device="cpu") < 0.5).to(device) & flip
    offsets = torch.arange(size, device=device)
    rows = tops[:, None] + offsets  # [B, size]
    cols = torch.where(flips[:, None], lefts[:, None] + size - 1 - offsets, lefts[:, None] + offsets)
    index = torch.arange(batch, device=device)[:, None, None]
    # [B, T, H, W, 3] -> [B, size, size, T, 3] by advanced indexing on (B, H, W), then back to [B, T, size, size, 3]
    cropped = clips.permute(0, 2, 3, 1, 4)[index, rows[:, :, None], cols[:, None, :]]
    return cropped.permute(0, 3, 1, 2, 4)


def train_transform(
    clips: torch.Tensor, size: int, generator: torch.Generator | None = None, flip: bool = True
) -> torch.Tensor:
    return normalize(random_crop_flip(clips, size, generator, flip))


def eval_transform(clips: torch.Tensor, size: int) -> torch.Tensor:
    return normalize(center_crop(clips, size))
