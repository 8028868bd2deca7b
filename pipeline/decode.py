"""Decoding sampled clips from one video: frame-index sampling, decord decoding of only those frames, resize+crop.

Everything here works on one video without Ray; the ingest pipeline wraps it in Ray Data tasks and the scoring job
reuses it.

Short videos are padded, not refused: when a video has fewer frames than a clip needs, the missing positions repeat
the last frame and the clip is marked `padded` (a 1-second clip of a 2-second action is still a usable example;
readers that want only full clips filter on the column).

Huge videos are refused, not decoded: before decord opens a video, PyAV reads its container and stream headers (no
frame is decoded) and a video that declares more than `DecodeLimits` allow is a `VideoTooLarge` error. A video much
larger than the clips need is decoded scaled down to their short side by the decoder itself, so that its frames never
exist at full size and need no resizing after.
What a header cannot bound (a decoder crash, a lying header, a pathological stream) is bounded by decoding in a child
process with a time limit (`decoder=`, pipeline.isolation).
"""

from __future__ import annotations

import io
import math
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol

import numpy as np

SAMPLINGS = ("uniform", "dense")
# What ingest keeps of each frame: the centre square of the short side, or the frame at its aspect ratio up to a
# maximum (`stored_width`).
KEEPS = ("square", "aspect")


class Decoder(Protocol):
    """Where decoding runs instead of this process: pipeline.isolation.DecoderProcess, a child process."""

    def call(self, timeout_s: float, function: Callable, *args, **kwargs) -> Any:
        """`function(*args, **kwargs)` run there, stopped after `timeout_s`."""


class VideoDecodeError(RuntimeError):
    """This video cannot be turned into clips; the message says why in one line."""


class VideoTooLarge(VideoDecodeError):
    """The video's header declares more pixels, frames or seconds than the limits allow; nothing was decoded."""


class DecoderCrashed(VideoDecodeError):
    """The decoding process died on this video, in a fresh process as well (pipeline.isolation)."""


class DecodeTimeout(VideoDecodeError):
    """Decoding this video ran past its time limit; the decoding process was stopped (pipeline.isolation)."""


@dataclass(frozen=True)
class DecodeLimits:
    """What one video may cost. The defaults admit any action dataset's videos (4K, an hour at 60 fps) and refuse
    what only a broken or hostile file declares. The jobs take these fields as options, with each field's `help`."""

    max_frame_side: int = field(default=4096, metadata={"help": "Refuse videos with a longer frame side (pixels)."})
    # an hour at 60 fps
    max_frames: int = field(default=216_000, metadata={"help": "Refuse videos that declare more frames."})
    max_seconds: float = field(
        default=3600.0, metadata={"help": "Refuse videos that declare a longer duration (seconds)."}
    )
    # Per video, when decoded in a child process: an hour of 4K with long key-frame intervals and dozens of sampled
    # frames decodes well within it.
    decode_timeout: float = field(
        default=600.0, metadata={"help": "Seconds one video's decoding may take before it is stopped."}
    )

    def __post_init__(self):
        for name, value in vars(self).items():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be > 0, got {value}")


@dataclass(frozen=True)
class VideoHeader:
    """What a video declares about itself before any frame is decoded; 0 where it does not say."""

    width: int
    height: int
    frames: int  # declared, or estimated from duration x frame rate
    seconds: float


@dataclass(frozen=True)
class ClipInfo:
    frame_indices: np.ndarray  # [K, T] int32, indices into the video's frames
    fps: float
    num_video_frames: int
    width: int  # the source's frame size, whatever size it was decoded at
    height: int
    padded: bool
    # keep="aspect": the width of the stored frames that holds the video's pixels, centred in the stored width
    valid_width: int | None = None


def sample_frame_indices(
    num_video_frames: int,
    frames: int,
    sampling: str = "uniform",
    stride: int = 16,
    clips_per_video: int = 1,
    frames_per_segment: int = 1,
) -> tuple[np.ndarray, bool]:
    """Frame indices `[K, T * M]` for K clips of T frames with M candidates each, and whether the video was too
    short (last frame repeated).

    uniform: TSN sparse sampling. The video is cut into T equal segments; clip k owns the k-th of K equal parts of
    every segment and takes M candidate frames spread over that part (position t * M + j is candidate j of segment
    t). With M = 1 a single clip takes segment centres, several clips are spread evenly across every segment.
    Training picks one candidate per segment per epoch (temporal jitter without decoding again); the middle one,
    j = M // 2, is the deterministic pick (the segment centre for M = 1 and any odd M).
    dense: T frames `stride` apart, M = 1. K clip windows are spread evenly over the video (a single one is centred).
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, not {sampling!r}")
    if frames < 1 or clips_per_video < 1 or stride < 1 or frames_per_segment < 1:
        raise ValueError("frames, clips_per_video, stride and frames_per_segment must be >= 1")
    if sampling == "dense" and frames_per_segment != 1:
        raise ValueError("frames_per_segment applies to uniform sampling only")
    if num_video_frames < 1:
        raise VideoDecodeError("video has no frames")
    n, t_steps, k_clips = num_video_frames, np.arange(frames), np.arange(clips_per_video)
    if sampling == "uniform":
        m = frames_per_segment
        if n < frames:
            row = np.repeat(np.minimum(t_steps, n - 1), m)
            return np.tile(row, (clips_per_video, 1)).astype(np.int32), True
        segment = n / frames
        offsets = (np.arange(clips_per_video * m) + 0.5) / (clips_per_video * m)  # clip k: offsets k*M .. k*M+M-1
        indices = np.floor(segment * (t_steps[None, :] + offsets[:, None])).astype(np.int64)  # [K*M, T]
        indices = indices.reshape(clips_per_video, m, frames).transpose(0, 2, 1).reshape(clips_per_video, frames * m)
        return np.minimum(indices, n - 1).astype(np.int32), False
    span = (frames - 1) * stride + 1
    if n < span:
        row = np.minimum(t_steps * stride, n - 1)
        return np.tile(row, (clips_per_video, 1)).astype(np.int32), True
    starts = np.floor((n - span) * (k_clips + 0.5) / clips_per_video).astype(np.int64)
    return (starts[:, None] + t_steps[None, :] * stride).astype(np.int32), False


def resize_center_crop(frames: np.ndarray, short_side: int) -> np.ndarray:
    """`[T, H, W, 3]` uint8 -> `[T, S, S, 3]`: scale so the short side is S, then take the centre square.

    Crops the centre square first and scales only that (the same pixels as scaling then cropping, less work), with
    torch's uint8 bilinear kernel with antialiasing: its filter widens when shrinking, so 720p -> 256 does not
    alias, and it is several times faster than PIL on the same frames.
    """
    import torch

    _, height, width, _ = frames.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    channels_first = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # a view, no copy
    square = channels_first[:, :, top : top + side, left : left + side]
    if side == short_side:
        resized = square
    else:
        resized = torch.nn.functional.interpolate(
            square, size=(short_side, short_side), mode="bilinear", antialias=True, align_corners=False
        )
    return resized.permute(0, 2, 3, 1).contiguous().numpy()


def parse_aspect(text: str) -> tuple[int, int]:
    """"16:9" -> (16, 9): a landscape (or square) aspect ratio WIDTH:HEIGHT of positive integers."""
    width, sep, height = str(text).partition(":")
    try:
        ratio = (int(width), int(height))
    except ValueError:
        ratio = None
    if not sep or ratio is None or min(ratio) < 1 or ratio[0] < ratio[1]:
        raise ValueError(f"max_aspect must be WIDTH:HEIGHT with WIDTH >= HEIGHT >= 1 (e.g. 16:9), not {text!r}")
    return ratio


def stored_width(short_side: int, max_aspect: str) -> int:
    """The stored frame width of keep="aspect": `short_side` x the maximum aspect ratio, rounded to an even number as
    `decode_size` rounds decoded sides, so that a source at exactly that ratio, decoded at the short side, needs
    neither crop nor resize (1280x720 -> 456x256 for 16:9 at 256)."""
    across, down = parse_aspect(max_aspect)
    return max(short_side, round(short_side * across / down / 2) * 2)


def resize_keep_aspect(frames: np.ndarray, short_side: int, width: int) -> tuple[np.ndarray, int]:
    """`[T, H, W, 3]` uint8 -> (`[T, S, width, 3]`, valid width): the frame scaled so its short side is S, keeping as
    much of its width as `width` holds.

    - Landscape at least `width / S` wide: centre-cropped on the long side to `width` (nothing is padded).
    - Narrower landscape (4:3) and square: the whole frame, `round(W * S / H)` wide (rounded to even, so that it
      centres exactly), centred in `width` with black columns either side.
    - Portrait: the centre square (as keep="square" stores it), centred in `width` the same way. A portrait frame
      has no landscape region wider than its square, and its height beyond the square does not fit the fixed S.

    The valid width is what training crops from and what a centre crop of the stored frame falls inside (the padding
    is centred), so the black columns never reach the model. Crops before it scales and scales with the antialiased
    bilinear kernel, as `resize_center_crop`.
    """
    import torch

    _, height, source_width, _ = frames.shape
    if height > source_width:  # portrait: its centre square
        top = (height - source_width) // 2
        frames, height = frames[:, top : top + source_width], source_width
    scaled = max(short_side, min(width, round(source_width * short_side / height / 2) * 2))
    keep = source_width if scaled < width else min(source_width, round(width * height / short_side))
    left = (source_width - keep) // 2
    channels_first = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # a view, no copy
    region = channels_first[:, :, :, left : left + keep]
    if (height, keep) != (short_side, scaled):
        region = torch.nn.functional.interpolate(
            region, size=(short_side, scaled), mode="bilinear", antialias=True, align_corners=False
        )
    out = torch.zeros((frames.shape[0], 3, short_side, width), dtype=torch.uint8)
    pad = (width - scaled) // 2
    out[:, :, :, pad : pad + scaled] = region
    return out.permute(0, 2, 3, 1).contiguous().numpy(), scaled


_DECORD_NOISE = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*")
_NO_VIDEO_STREAM = "no video stream in the container (audio-only, or a damaged header)"
# decord's and PyAV's messages for common bad inputs, said plainly (decord's own are C++ checks or "Error reading N
# bytes...").
_KNOWN_FAILURES = (
    ("cannot find video stream", _NO_VIDEO_STREAM),
    ("Error reading", "not a readable video container (truncated, corrupt, or not a video at all)"),
    ("Invalid data found", "not a readable video container (truncated, corrupt, or not a video at all)"),
    ("av_read_frame failed", "the frame data is cut short or damaged (truncated or corrupt file)"),
    ("broken metadata", "no frame count or duration (an image or other non-video file, or damaged metadata)"),
)


def describe_decoder_error(error: Exception) -> str:
    """One plain line for a decord error: a known cause when recognised, else decord's message without the C++
    source positions and stack traces."""
    text = str(error)
    for pattern, meaning in _KNOWN_FAILURES:
        if pattern in text:
            return meaning
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if _DECORD_NOISE.match(line):
            return _DECORD_NOISE.sub("", line)
    return lines[0] if lines else type(error).__name__


def reader_source(video: bytes | str | os.PathLike):
    return io.BytesIO(video) if isinstance(video, (bytes, bytearray, memoryview)) else os.fspath(video)


def probe_video(video: bytes | str | os.PathLike) -> VideoHeader:
    """The first video stream's declared size, frame count and duration, read by PyAV from the container and stream
    headers without decoding a frame. Raises VideoDecodeError when there is no readable video stream."""
    import av

    try:
        # FFmpeg decodes a frame or two while it reads stream information (an H.264 frame at 720p costs ~17 ms, a
        # bomb's at full size); skipping every frame still reads the sizes from the headers (SPS included).
        with av.open(reader_source(video), options={"skip_frame": "all"}) as container:
            if not container.streams.video:
                raise VideoDecodeError(f"cannot open as a video: {_NO_VIDEO_STREAM}")
            stream = container.streams.video[0]
            if stream.duration and stream.time_base:
                seconds = float(stream.duration * stream.time_base)
            else:
                seconds = container.duration / av.time_base if container.duration else 0.0
            frames = stream.frames
            if not frames and seconds and stream.average_rate:
                frames = round(seconds * stream.average_rate)
            return VideoHeader(stream.width, stream.height, frames, seconds)
    except av.FFmpegError as error:
        raise VideoDecodeError(f"cannot open as a video: {describe_decoder_error(error)}") from None


def check_limits(header: VideoHeader, limits: DecodeLimits) -> None:
    """Raise VideoTooLarge when the header declares more than the limits allow."""
    if max(header.width, header.height) > limits.max_frame_side:
        raise VideoTooLarge(
            f"declares {header.width}x{header.height} pixels, above the limit of {limits.max_frame_side} pixels a "
            "side (--max-frame-side)"
        )
    if header.frames > limits.max_frames:
        raise VideoTooLarge(f"declares {header.frames} frames, above the limit of {limits.max_frames} (--max-frames)")
    if header.seconds > limits.max_seconds:
        raise VideoTooLarge(
            f"declares {header.seconds:.0f} s, above the limit of {limits.max_seconds:g} s (--max-seconds)"
        )


def decode_size(header: VideoHeader, min_short_side: int | None) -> dict[str, int]:
    """decord's `width`/`height` to decode a source larger than `min_short_side` scaled down to it (aspect kept, even
    sides); empty to decode at the source's size.

    Scaling in the decoder (FFmpeg's scaler, bicubic, its filter widened when shrinking) costs less than converting
    full-size frames to RGB: a fifth less decoding CPU for 720p scaled to 256, a tenth over benchmarks/ingest.py's
    mix of 240p to 720p, and the frames need no resize after, only a crop. Its pixels differ from torch's
    antialiased bilinear resize of full frames by about one level in 255 on average."""
    short = min(header.width, header.height)
    if min_short_side is None or short <= min_short_side:
        return {}
    scale = min_short_side / short
    return {"width": max(2, round(header.width * scale / 2) * 2),
            "height": max(2, round(header.height * scale / 2) * 2)}


def frame_start_times(reader) -> tuple[np.ndarray, float]:
    """Each frame's start in seconds from the first frame's, and the video's duration, from the container's
    timestamps (variable frame rates included); from the average frame rate where the timestamps are missing."""
    import decord

    try:
        count = len(reader)
        if count < 1:
            raise VideoDecodeError("video has no frames")
        stamps = np.asarray(reader.get_frame_timestamp(np.arange(count)), np.float64).reshape(count, 2)
    except (decord.DECORDError, RuntimeError) as error:
        raise VideoDecodeError(f"cannot open as a video: {describe_decoder_error(error)}") from None
    starts = stamps[:, 0] - stamps[0, 0]
    duration = float(stamps[-1, 1] - stamps[0, 0])
    if not duration > 0:
        fps = float(reader.get_avg_fps()) or 1.0
        starts, duration = np.arange(count) / fps, count / fps
    return starts, duration


def segment_frames(reader, segment: tuple[float, float]) -> tuple[int, int]:
    """The frames `[first, stop)` that start inside `segment` (seconds); an annotation running past the video's end
    keeps the frames up to it (annotators round up), one holding no frame is a VideoDecodeError."""
    starts, duration = frame_start_times(reader)
    start, end = segment
    first, stop = np.searchsorted(starts, [start, end], side="left").tolist()
    if stop <= first:
        raise VideoDecodeError(f"the segment {start:g}-{end:g} s holds no frame of this {duration:.2f} s video")
    return first, stop


def read_sampled_frames(
    video: bytes | str | os.PathLike,
    frames: int,
    sampling: str = "uniform",
    stride: int = 16,
    clips_per_video: int = 1,
    num_threads: int = 1,
    frames_per_segment: int = 1,
    limits: DecodeLimits = DecodeLimits(),
    min_short_side: int | None = None,
    decoder: Decoder | None = None,
    segment: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, ClipInfo]:
    """The distinct frames that K sampled clips need, at decoded size: `(frames [U, H, W, 3] uint8, their sorted
    frame indices [U], ClipInfo)`. `np.searchsorted(indices, info.frame_indices)` maps clip positions to rows.

    Only those frames are decoded (decord `get_batch` seeks to the nearest key frame). `num_threads` is decord's
    decoder threads; one per task is right when every CPU runs its own task. A video whose header declares more than
    `limits` is refused before decoding; with `min_short_side`, a source much larger than that is decoded scaled down
    (`decode_size`), so the frames come back smaller than the source. With `decoder`, all of it runs in that child
    process, stopped after `limits.decode_timeout` (pipeline.isolation). With `segment` (start, end seconds in the
    video's own time), the clips are sampled from the frames that start inside it, as from a video of those frames.
    Raises VideoDecodeError (VideoTooLarge, DecoderCrashed, DecodeTimeout) with a one-line reason for anything that is
    not a decodable video within the limits.
    """
    if decoder is not None:
        return decoder.call(
            limits.decode_timeout, read_sampled_frames, video, frames, sampling, stride, clips_per_video, num_threads,
            frames_per_segment, limits, min_short_side, None, segment,
        )
    import decord

    if isinstance(video, (bytes, bytearray, memoryview)):
        if len(video) == 0:
            raise VideoDecodeError("empty file (0 bytes)")
    elif os.path.getsize(video) == 0:
        raise VideoDecodeError("empty file (0 bytes)")
    header = probe_video(video)
    check_limits(header, limits)

    def open_reader(**size):
        source = reader_source(video)
        try:
            return decord.VideoReader(source, num_threads=num_threads, **size)
        except (decord.DECORDError, RuntimeError) as error:
            raise VideoDecodeError(f"cannot open as a video: {describe_decoder_error(error)}") from None

    reader = open_reader(**decode_size(header, min_short_side))
    num_video_frames = len(reader)
    fps = float(reader.get_avg_fps())
    first, stop = (0, num_video_frames) if segment is None else segment_frames(reader, segment)
    indices, padded = sample_frame_indices(stop - first, frames, sampling, stride, clips_per_video,
                                           frames_per_segment)
    indices += first
    wanted = np.unique(indices).tolist()
    try:
        decoded = reader.get_batch(wanted).asnumpy()
    except (decord.DECORDError, RuntimeError, IndexError) as error:
        if "DECORDArrayCopyFromTo" not in str(error):
            raise VideoDecodeError(f"cannot decode frames {wanted}: {describe_decoder_error(error)}") from None
        decoded = None
    if decoded is None or decoded.ndim != 4 or decoded.shape[-1] != 3:
        # decord mistakes the row padding of some narrow frames (e.g. 16 or 48 pixels wide) for extra channels.
        # Height and width of its output are still right; let its scaler produce a width that is a multiple of 64,
        # which it copies correctly, and resize from there.
        height, width = reader[wanted[0]].shape[:2]  # as decoded: scaled when decode_size asked for it
        scaled_width = -(-width // 64) * 64
        scaled_height = max(2, round(height * scaled_width / width / 2) * 2)
        del reader
        reader = open_reader(width=scaled_width, height=scaled_height)
        try:
            decoded = reader.get_batch(wanted).asnumpy()
        except (decord.DECORDError, RuntimeError, IndexError) as error:
            raise VideoDecodeError(f"cannot decode frames {wanted}: {describe_decoder_error(error)}") from None
    del reader
    if decoded.ndim != 4 or decoded.shape[0] != len(wanted) or decoded.shape[-1] != 3:
        raise VideoDecodeError(f"decoder returned frames of shape {decoded.shape}, expected [{len(wanted)}, H, W, 3]")
    info = ClipInfo(indices, fps, num_video_frames, header.width, header.height, padded)
    return decoded, np.asarray(wanted), info


def decode_clips(
    video: bytes | str | os.PathLike,
    frames: int,
    short_side: int,
    sampling: str = "uniform",
    stride: int = 16,
    clips_per_video: int = 1,
    num_threads: int = 1,
    frames_per_segment: int = 1,
    limits: DecodeLimits = DecodeLimits(),
    decoder: Decoder | None = None,
    segment: tuple[float, float] | None = None,
    width: int | None = None,
) -> tuple[np.ndarray, ClipInfo]:
    """Decode K clips `[K, T * M, S, S, 3]` uint8 (M = `frames_per_segment`) from one video given as bytes (decoded
    from memory) or a local path: the sampled frames (`read_sampled_frames`, within `limits`, in `decoder`'s child
    process when given), each scaled so its short side is S and centre-cropped to a square; with `segment` (seconds),
    sampled inside it. With `width` (keep="aspect"), `[K, T * M, S, width, 3]` from `resize_keep_aspect`, and
    `info.valid_width` says how much of the width holds the video.

    Raises VideoDecodeError with a one-line reason for anything that is not a decodable video within the limits.
    """
    decoded, wanted, info = read_sampled_frames(video, frames, sampling, stride, clips_per_video, num_threads,
                                                frames_per_segment, limits, short_side, decoder, segment)
    if width is None:
        resized = resize_center_crop(decoded, short_side)
    else:
        resized, valid_width = resize_keep_aspect(decoded, short_side, width)
        info = replace(info, valid_width=valid_width)
    clips = resized[np.searchsorted(wanted, info.frame_indices)]  # [K, T * M, S, W, 3]
    return clips, info
