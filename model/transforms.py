"""Clip tensors from the dataset's uint8 `[B, T, S, W, 3]` to the model's normalised `[B, 3, T, H, W]`, batched on
whatever device the clips are on (augmentation runs on the training device, not in the data loader).

A keep="aspect" dataset's frames are wider than the square (W > S): training's windows range over the whole width;
its narrower videos fill only a centred `valid_width` of it, which training's windows stay inside and which the
centre crop of evaluation (`center_crop`, the model's size <= S <= valid width) falls inside by construction.

Training augmentations: "recipe" is the official UniFormerV2 / MMAction2 Kinetics recipe (RandAugment with magnitude
7 and 4 ops, then RandomResizedCrop to the model's size, then horizontal flip), "crop" a random crop and flip. Every
random draw comes from the step's generator or torch's global RNG, which training reseeds every step, so a resumed
run augments exactly as an uninterrupted one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from model.uniformerv2 import NORMALIZATIONS


def normalize(clips: torch.Tensor, normalization: str = "clip") -> torch.Tensor:
    """uint8 `[B, T, H, W, 3]` (or 0..255 floats) -> float `[B, 3, T, H, W]` normalised as `normalization` says
    (model.uniformerv2.NORMALIZATIONS: the one the model's weights were trained with)."""
    mean, std = NORMALIZATIONS[normalization]
    mean = torch.tensor(mean, device=clips.device) * 255.0
    inv_std = 1.0 / (torch.tensor(std, device=clips.device) * 255.0)
    x = (clips.float() - mean) * inv_std
    return x.permute(0, 4, 1, 2, 3).contiguous()


def center_crop(clips: torch.Tensor, size: int) -> torch.Tensor:
    """Central `size` x `size` window of `[B, T, H, W, 3]`."""
    height, width = clips.shape[2:4]
    if size > min(height, width):
        raise ValueError(f"crop size {size} exceeds the stored {height}x{width} frames")
    top, left = (height - size) // 2, (width - size) // 2
    return clips[:, :, top : top + size, left : left + size]


def valid_columns(width: int, valid_width: int) -> tuple[int, int]:
    """(first, past-last) column of the valid region of a stored frame `width` wide whose `valid_width` columns of
    video are centred in it (a keep="aspect" dataset's narrower frames, pipeline.decode.resize_keep_aspect)."""
    first = (width - valid_width) // 2
    return first, first + valid_width


def _checked_valid_widths(valid_widths: torch.Tensor, size: int, width: int) -> torch.Tensor:
    valid_widths = valid_widths.to("cpu", torch.int64)
    if bool(((valid_widths < size) | (valid_widths > width)).any()):
        raise ValueError(f"valid widths {valid_widths.tolist()} must lie between the crop size {size} and the stored "
                         f"width {width}")
    return valid_widths


def random_crop_flip(
    clips: torch.Tensor, size: int, generator: torch.Generator | None = None, flip: bool = True,
    return_flips: bool = False, valid_widths: torch.Tensor | None = None,
):
    """An independent random `size` window and (with `flip`) horizontal flip per clip of `[B, T, H, W, 3]`, the
    same for all frames of a clip, gathered in one indexing op (no loop over clips). Turn flipping off for classes
    that depend on left/right (Something-Something's "pushing left to right", motion direction), or swap their labels
    for the flipped clips (`return_flips`: also the `[B]` bool mask of the clips flipped). With `valid_widths` (`[B]`,
    a keep="aspect" dataset's), each window lies inside its clip's centred valid columns (`valid_columns`)."""
    batch, _, height, width, _ = clips.shape
    if size > min(height, width):
        raise ValueError(f"crop size {size} exceeds the stored {height}x{width} frames")
    device = clips.device
    tops = torch.randint(0, height - size + 1, (batch,), generator=generator, device="cpu").to(device)
    if valid_widths is None:
        lefts = torch.randint(0, width - size + 1, (batch,), generator=generator, device="cpu").to(device)
    else:  # a uniform left edge per clip over its own range: randint takes one range for the whole batch
        valid_widths = _checked_valid_widths(valid_widths, size, width)
        spans = valid_widths - size + 1
        offsets = torch.minimum((torch.rand(batch, generator=generator, device="cpu") * spans).long(), spans - 1)
        lefts = ((width - valid_widths) // 2 + offsets).to(device)
    flips = (torch.rand(batch, generator=generator, device="cpu") < 0.5).to(device) & flip
    offsets = torch.arange(size, device=device)
    rows = tops[:, None] + offsets  # [B, size]
    cols = torch.where(flips[:, None], lefts[:, None] + size - 1 - offsets, lefts[:, None] + offsets)
    index = torch.arange(batch, device=device)[:, None, None]
    # [B, T, H, W, 3] -> [B, size, size, T, 3] by advanced indexing on (B, H, W), then back to [B, T, size, size, 3]
    cropped = clips.permute(0, 2, 3, 1, 4)[index, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2, 4)
    return (cropped, flips) if return_flips else cropped


AUGMENTATIONS = ("recipe", "crop")
# RandomResizedCrop's area fraction and aspect-ratio ranges (torchvision's and MMAction2's defaults)
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
RAND_AUGMENT_OPS, RAND_AUGMENT_MAGNITUDE = 4, 7


def resized_crop_box(
    height: int, width: int, generator: torch.Generator | None = None, scale=CROP_SCALE, ratio=CROP_RATIO
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a RandomResizedCrop window: torchvision's sampling (ten tries at a random area fraction
    and log-uniform aspect ratio, then a centre crop at the nearest allowed ratio), drawn from `generator`."""

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=generator).item()

    for _ in range(10):
        area = height * width * uniform(*scale)
        aspect = math.exp(uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def recipe_augment(
    clips: torch.Tensor, size: int, generator: torch.Generator | None = None, flip: bool = True,
    return_flips: bool = False, valid_widths: torch.Tensor | None = None,
):
    """uint8 `[B, T, H, W, 3]` -> float `[B, T, size, size, 3]` in 0..255: per clip, RandAugment (the same ops for every
    frame of a clip, torchvision's tensor implementation, which draws from torch's global RNG), a RandomResizedCrop
    window resized to `size` (bilinear, antialiased) and a horizontal flip with probability 0.5 when `flip`. A loop
    over the clips of a batch: each clip gets its own ops and window. With `valid_widths` (`[B]`, a keep="aspect"
    dataset's), both see only the clip's valid columns, so that neither a window nor a rotation brings in padding."""
    from torchvision.transforms import v2

    rand_augment = v2.RandAugment(num_ops=RAND_AUGMENT_OPS, magnitude=RAND_AUGMENT_MAGNITUDE)
    out = torch.empty((clips.shape[0], clips.shape[1], size, size, 3), device=clips.device)
    flips = torch.zeros(clips.shape[0], dtype=torch.bool, device=clips.device)
    if valid_widths is not None:
        valid_widths = _checked_valid_widths(valid_widths, size, clips.shape[3])
    for index, clip in enumerate(clips):
        if valid_widths is not None:
            first, last = valid_columns(clip.shape[2], int(valid_widths[index]))
            clip = clip[:, :, first:last]
        frames = rand_augment(clip.permute(0, 3, 1, 2))  # [T, 3, H, W] uint8, one op sequence for the clip
        top, left, h, w = resized_crop_box(frames.shape[-2], frames.shape[-1], generator)
        window = frames[:, :, top : top + h, left : left + w].float()
        window = F.interpolate(window, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        if flip and torch.rand((), generator=generator).item() < 0.5:
            window = window.flip(-1)
            flips[index] = True
        out[index] = window.clamp_(0, 255).permute(0, 2, 3, 1)
    return (out, flips) if return_flips else out


def train_transform(
    clips: torch.Tensor,
    size: int,
    generator: torch.Generator | None = None,
    flip: bool = True,
    augment: str = "crop",
    normalization: str = "clip",
    return_flips: bool = False,
    valid_widths: torch.Tensor | None = None,
):
    """uint8 `[B, T, H, W, 3]` -> the model's normalised `[B, 3, T, size, size]`, augmented as `augment` says (with
    `return_flips`, also the `[B]` bool mask of the clips flipped). Windows are drawn from the whole stored frame,
    the sides of a keep="aspect" dataset's wide frames included, within each clip's `valid_widths` when given."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, not {augment!r}")
    augmented = recipe_augment if augment == "recipe" else random_crop_flip
    windows, flips = augmented(clips, size, generator, flip, return_flips=True, valid_widths=valid_widths)
    inputs = normalize(windows, normalization)
    return (inputs, flips) if return_flips else inputs


def eval_transform(clips: torch.Tensor, size: int, normalization: str = "clip") -> torch.Tensor:
    return normalize(center_crop(clips, size), normalization)


def input_normalization(net: torch.nn.Module) -> str:
    """The normalisation a UniFormerV2 (bare, DDP-wrapped or compiled) expects: its config's."""
    while not hasattr(net, "config") and hasattr(net, "module"):
        net = net.module
    return getattr(net, "_orig_mod", net).config.input_normalization
