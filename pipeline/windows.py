"""Long videos as timelines: each video cut into windows of a length and stride in seconds, each window sampled as one
model clip (its T frames at segment centres, the model's crop, S spatial crops, one temporal view per window).

Windows come from the video's frame timestamps, not frame counts: window i covers [i * stride, i * stride + length)
seconds, the last one ends at the video's end (it may be shorter), and a video shorter than one window is one window.
A window takes the frames whose start time falls in it (the nearest frame when none does, as in a variable frame rate
gap). Decoding walks the video once, in order: chunks of a few windows, each fetched with decord's `get_batch` over
increasing frame indices, so the reader only ever moves forward and memory holds a chunk, never the video. With a
decoding child (pipeline.isolation) the reader lives there (`open_frame_walk`, `fetch_walk_frames`, `close_frame_walk`)
and only each chunk's frames cross; resizing and cropping stay in the caller.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.decode import (
    DecodeLimits,
    Decoder,
    DecoderCrashed,
    DecodeTimeout,
    VideoDecodeError,
    VideoTooLarge,
    decode_size,
    describe_decoder_error,
    frame_start_times,
    probe_video,
    reader_source,
    sample_frame_indices,
)
from pipeline.views import resize_short_side, spatial_crops

_WINDOWS = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(?::\s*([0-9]*\.?[0-9]+)\s*)?$")
# windows decoded and held at once by a decoding task: a few, whatever the video's length
WINDOWS_PER_CHUNK = 8


@dataclass(frozen=True)
class WindowSpec:
    """Windows of `length` seconds, `stride` seconds apart."""

    length: float
    stride: float

    def describe(self) -> str:
        return f"{self.length:g} s windows every {self.stride:g} s"


def parse_windows(text: str) -> WindowSpec:
    """`"2"` -> 2 s windows every 2 s; `"2:1"` -> 2 s windows every 1 s (overlapping)."""
    match = _WINDOWS.match(str(text))
    if not match:
        raise ValueError(f"windows must be SECONDS or SECONDS:STRIDE, e.g. '2' or '2:1', not {text!r}")
    length = float(match.group(1))
    stride = float(match.group(2)) if match.group(2) is not None else length
    if not (length > 0 and stride > 0):
        raise ValueError(f"windows {text!r}: length and stride must be > 0 seconds")
    if stride > length:
        raise ValueError(f"windows {text!r}: a stride longer than the window leaves parts of each video unscored")
    return WindowSpec(length, stride)


def window_bounds(duration: float, spec: WindowSpec) -> np.ndarray:
    """`[W, 2]` (start, end) seconds of the windows of a video lasting `duration` seconds."""
    count = 1 if duration <= spec.length else math.ceil((duration - spec.length) / spec.stride - 1e-9) + 1
    starts = np.arange(count) * spec.stride
    return np.stack([starts, np.minimum(starts + spec.length, max(duration, 0.0))], axis=1)


def window_frame_indices(frame_starts: np.ndarray, bounds: np.ndarray, frames: int) -> np.ndarray:
    """`[W, T]` frame indices: each window's T frames at the centres of T equal segments of the frames in it."""
    n = len(frame_starts)
    first = np.searchsorted(frame_starts, bounds[:, 0] - 1e-6, side="left")
    last = np.searchsorted(frame_starts, bounds[:, 1] - 1e-6, side="left")  # exclusive
    indices = np.empty((len(bounds), frames), np.int64)
    for row, (lo, hi) in enumerate(zip(first, last)):
        lo = min(lo, n - 1)
        count = max(1, hi - lo)
        picked, _ = sample_frame_indices(count, frames, "uniform")
        indices[row] = np.minimum(lo + picked[0], n - 1)
    return indices


@dataclass
class WindowChunk:
    """Consecutive windows of one video: `views` uint8 `[W, S, T, crop, crop, 3]`."""

    first: int  # the window index of the chunk's first window
    bounds: np.ndarray  # [W, 2] seconds
    views: np.ndarray
    total: int  # windows in the video


def iter_windows(
    video: str | os.PathLike | bytes,
    spec: WindowSpec,
    frames: int,
    crop: int,
    spatial_views: int = 1,
    short_side: int | None = None,
    limits: DecodeLimits = DecodeLimits(),
    windows_per_chunk: int = WINDOWS_PER_CHUNK,
    num_threads: int = 1,
    on_fetch=None,
    decoder: Decoder | None = None,
) -> Iterator[WindowChunk]:
    """The windows of one video, in order, a chunk at a time (see the module docstring). The limits bound the frame
    size and each window (its seconds), not the video's duration: a three-hour archive is a normal input. With
    `decoder`, the reader lives in that child process (pipeline.isolation) and each chunk's frames come from it within
    `limits.decode_timeout`: a video that crashes or hangs the decoder ends as that video's error, not the worker's.
    `on_fetch(indices)`, when given, sees every frame-index list fetched from the reader (tests check the walk)."""
    short_side = crop if short_side is None else short_side
    video = video if isinstance(video, (bytes, bytearray, memoryview)) else os.fspath(video)
    if spec.length > limits.max_seconds:
        raise VideoTooLarge(f"windows of {spec.length:g} s exceed the limit of {limits.max_seconds:g} s (--max-seconds)")

    def run(function, *args):
        return function(*args) if decoder is None else decoder.call(limits.decode_timeout, function, *args)

    walk, opened = uuid.uuid4().hex, False
    try:
        bounds, indices = run(open_frame_walk, video, walk, spec, frames, short_side, limits, num_threads)
        opened = True
        total = len(bounds)
        # frames shared with the next chunk's windows (overlapping windows) are kept, not fetched again: every fetch
        # starts after the last one ended, so the reader never moves back
        kept_indices, kept_frames = np.zeros(0, np.int64), None
        for first in range(0, total, windows_per_chunk):
            chunk = indices[first : first + windows_per_chunk]
            needed = np.unique(chunk)
            wanted = needed[~np.isin(needed, kept_indices)]  # increasing, all after the last fetch
            if on_fetch is not None:
                on_fetch(wanted.tolist())
            fresh = None
            if len(wanted):
                decoded = run(fetch_walk_frames, video, walk, short_side, num_threads, wanted.tolist())
                fresh = resize_short_side(decoded, short_side)
            if kept_frames is not None and len(kept_indices):
                frames_now = kept_frames if fresh is None else np.concatenate([kept_frames, fresh])
            else:
                frames_now = fresh
            indices_now = np.concatenate([kept_indices, wanted])
            order = np.argsort(indices_now, kind="stable")
            indices_now, frames_now = indices_now[order], frames_now[order]
            crops = spatial_crops(frames_now, crop, spatial_views)  # [S, U, c, c, 3]
            rows = np.searchsorted(indices_now, chunk)  # [W, T]
            views = crops[:, rows].transpose(1, 0, 2, 3, 4, 5)  # [W, S, T, c, c, 3]
            later = indices[first + windows_per_chunk :]
            keep = indices_now >= later.min() if len(later) else np.zeros(len(indices_now), bool)
            kept_indices, kept_frames = indices_now[keep], frames_now[keep]
            yield WindowChunk(first, bounds[first : first + windows_per_chunk], np.ascontiguousarray(views), total)
    except (DecoderCrashed, DecodeTimeout):
        opened = False  # the child that held the walk is gone
        raise
    finally:
        if opened:  # the reader is released, also when the caller stops early
            with contextlib.suppress(VideoDecodeError):
                run(close_frame_walk, video, walk)


@dataclass
class _Walk:
    reader: object  # decord.VideoReader
    fetched: bool = False


# The walks in progress in this process (the decoding child, or the caller without one), by walk id.
_WALKS: dict[str, _Walk] = {}


def _open_reader(video, num_threads: int, **size):
    import decord

    try:
        return decord.VideoReader(reader_source(video), num_threads=num_threads, **size)
    except (decord.DECORDError, RuntimeError) as error:
        raise VideoDecodeError(f"cannot open as a video: {describe_decoder_error(error)}") from None


def open_frame_walk(
    video, walk: str, spec: WindowSpec, frames: int, short_side: int, limits: DecodeLimits, num_threads: int
) -> tuple[np.ndarray, np.ndarray]:
    """Opens `video` for walk `walk` in this process: its windows' bounds `[W, 2]` (seconds) and the frame indices of
    each window's clip `[W, T]`; the reader stays open for `fetch_walk_frames`."""
    if isinstance(video, (bytes, bytearray, memoryview)) and len(video) == 0 or (
        not isinstance(video, (bytes, bytearray, memoryview)) and os.path.getsize(video) == 0
    ):
        raise VideoDecodeError("empty file (0 bytes)")
    header = probe_video(video)
    if max(header.width, header.height) > limits.max_frame_side:
        raise VideoTooLarge(f"declares {header.width}x{header.height} pixels, above the limit of "
                            f"{limits.max_frame_side} pixels a side (--max-frame-side)")
    reader = _open_reader(video, num_threads, **decode_size(header, short_side))
    starts, duration = frame_start_times(reader)
    bounds = window_bounds(duration, spec)
    _WALKS[walk] = _Walk(reader)
    return bounds, window_frame_indices(starts, bounds, frames)


def fetch_walk_frames(video, walk: str, short_side: int, num_threads: int, wanted: list[int]) -> np.ndarray:
    """The frames `wanted` (increasing, after the walk's last fetch) at decoded size, `[U, H, W, 3]` uint8. A walk this
    process does not hold (its child died and this is the fresh one) is opened again: decord seeks to them."""
    import decord

    state = _WALKS.get(walk)
    if state is None:
        size = decode_size(probe_video(video), short_side)
        state = _WALKS[walk] = _Walk(_open_reader(video, num_threads, **size))
    try:
        decoded = state.reader.get_batch(wanted).asnumpy()
    except (decord.DECORDError, RuntimeError, IndexError) as error:
        if "DECORDArrayCopyFromTo" not in str(error) or state.fetched:
            raise VideoDecodeError(
                f"cannot decode frames {wanted[0]}..{wanted[-1]}: {describe_decoder_error(error)}") from None
        # decord mistakes the row padding of some narrow frames for channels (see read_sampled_frames): decode at a
        # width that is a multiple of 64, which it copies correctly, from the first fetch on (every frame one size)
        height, width = state.reader[0].shape[:2]
        scaled_width = -(-width // 64) * 64
        state.reader = _open_reader(video, num_threads, width=scaled_width,
                                    height=max(2, round(height * scaled_width / width / 2) * 2))
        decoded = state.reader.get_batch(wanted).asnumpy()
    state.fetched = True
    if decoded.ndim != 4 or decoded.shape[0] != len(wanted) or decoded.shape[-1] != 3:
        raise VideoDecodeError(f"decoder returned frames of shape {decoded.shape}")
    return decoded


def close_frame_walk(video, walk: str) -> None:
    _WALKS.pop(walk, None)
