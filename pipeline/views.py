"""Multi-view test-time sampling of one video: temporal clips x spatial crops, as in the paper's "8x3x4" testing
(8 frames, 3 crops, 4 clips).

Temporal views: K clips at spread offsets (`sample_frame_indices` with `clips_per_video=K`; with uniform sampling
each clip takes one frame of each of the T segments at fraction (k + 0.5) / K of it, the official sparse test).
Spatial views: as the official test (SlowFast `uniform_crop`), each frame is scaled so that its short side equals
the crop size, and S square crops are taken along the long side at evenly spread offsets: for S = 3 left, centre,
right of a landscape frame (top, centre, bottom of a portrait one); S = 1 is the centre crop. A `short_side` larger
than the crop scales to that side first (the training clips' scale, e.g. 256 for 224 crops) and centres the crops
across the short side.

The scaling is torch's bilinear uint8 kernel with antialiasing (as `pipeline.decode.resize_center_crop`), so large
frames shrink without aliasing. Views come out temporal-major: view `k * S + s` is clip k, crop s.
"""

from __future__ import annotations

import os
import re

import numpy as np

from pipeline.decode import ClipInfo, DecodeLimits, Decoder, read_sampled_frames

_VIEWS = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


# Views per video that any test protocol uses are far below these (the paper's most is 4x3, MMAction2's 10x3):
# more only multiply decoding and memory (the views of a batch are decoded and held at once).
MAX_TEMPORAL_VIEWS, MAX_SPATIAL_VIEWS = 32, 10


def parse_views(text: str) -> tuple[int, int]:
    """`"4x3"` -> (4 temporal clips, 3 spatial crops)."""
    match = _VIEWS.match(text)
    if not match or min(int(match.group(1)), int(match.group(2))) < 1:
        raise ValueError(f"views must be TEMPORALxSPATIAL with both >= 1, e.g. '4x3', not {text!r}")
    temporal, spatial = int(match.group(1)), int(match.group(2))
    if temporal > MAX_TEMPORAL_VIEWS or spatial > MAX_SPATIAL_VIEWS:
        raise ValueError(f"views {text!r} exceed {MAX_TEMPORAL_VIEWS}x{MAX_SPATIAL_VIEWS}: test protocols use up to "
                         "10x3, and each view is decoded and held in memory with the others")
    return temporal, spatial


def crop_offsets(length: int, crop: int, count: int) -> list[int]:
    """Start offsets of `count` windows of `crop` pixels spread evenly over `length` (first at 0, last at the end);
    a single window is centred."""
    if crop > length:
        raise ValueError(f"crop {crop} is larger than the side {length}")
    if count == 1:
        return [(length - crop) // 2]
    return [(length - crop) * k // (count - 1) for k in range(count)]


def resize_short_side(frames: np.ndarray, short_side: int) -> np.ndarray:
    """`[N, H, W, 3]` uint8 -> `[N, H', W', 3]` with min(H', W') = short_side and the aspect ratio kept."""
    import torch

    _, height, width, _ = frames.shape
    scale = short_side / min(height, width)
    size = (max(short_side, round(height * scale)), max(short_side, round(width * scale)))
    if size == (height, width):
        return frames
    channels_first = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(
        channels_first, size=size, mode="bilinear", antialias=True, align_corners=False
    )
    return resized.permute(0, 2, 3, 1).contiguous().numpy()


def spatial_crops(frames: np.ndarray, crop: int, count: int) -> np.ndarray:
    """`[N, H, W, 3]` -> `[count, N, crop, crop, 3]`: windows spread along the long side, centred across the short."""
    _, height, width, _ = frames.shape
    if height > width:
        tops, lefts = crop_offsets(height, crop, count), crop_offsets(width, crop, 1) * count
    else:
        tops, lefts = crop_offsets(height, crop, 1) * count, crop_offsets(width, crop, count)
    return np.stack([frames[:, top : top + crop, left : left + crop] for top, left in zip(tops, lefts)])


def decode_views(
    video: bytes | str | os.PathLike,
    frames: int,
    crop: int,
    temporal_views: int = 4,
    spatial_views: int = 3,
    short_side: int | None = None,
    sampling: str = "uniform",
    stride: int = 16,
    num_threads: int = 1,
    limits: DecodeLimits = DecodeLimits(),
    decoder: Decoder | None = None,
    segment: tuple[float, float] | None = None,
) -> tuple[np.ndarray, ClipInfo]:
    """`[temporal_views * spatial_views, T, crop, crop, 3]` uint8 views of one video (bytes or a local path), or of
    its `segment` (start, end seconds) only.

    `short_side` defaults to `crop` (the official test scale). Only the distinct frames the clips need are decoded
    (within `limits`, in `decoder`'s child process when given: see `read_sampled_frames`) and scaled once each.
    Raises VideoDecodeError with a one-line reason for anything that is not a decodable video within the limits.
    """
    short_side = crop if short_side is None else short_side
    if short_side < crop:
        raise ValueError(f"short_side ({short_side}) must be >= crop ({crop})")
    decoded, wanted, info = read_sampled_frames(
        video, frames, sampling, stride, temporal_views, num_threads, limits=limits, min_short_side=short_side,
        decoder=decoder, segment=segment,
    )
    crops = spatial_crops(resize_short_side(decoded, short_side), crop, spatial_views)  # [S, U, c, c, 3]
    rows = np.searchsorted(wanted, info.frame_indices)  # [K, T] rows of the decoded frames
    views = crops[:, rows]  # [S, K, T, c, c, 3]
    views = views.transpose(1, 0, 2, 3, 4, 5).reshape(-1, frames, crop, crop, 3)  # view k * S + s
    return np.ascontiguousarray(views), info
