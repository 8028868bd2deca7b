"""Synthetic videos whose classes differ only in the direction of motion.

Each video shows a static textured background and, at a random place and size, a textured window whose texture
drifts in the class direction (left, right, up or down), like a conveyor belt seen through a hatch. The drifting
texture is a sum of a few 2-D cosines with random colours, phases and integer frequencies, all with non-zero
horizontal *and* vertical frequency, and it travels exactly one period over the video. Hence:

- the per-pixel time-average of a video is the static background plus a flat-coloured rectangle, whatever the
  direction: every cosine averages to zero over a full period along either axis;
- every single frame has the same distribution in every class (random phases), so a model that looks at frames one
  at a time and averages them sees no class information; only the order of frames, the motion, tells the class.

Speeds vary with the random texture period (the drift is one period per video). Every wave has one cycle per period
along each axis, so that a clip of 8 frames sampled from the video moves the texture by an eighth of a cycle per
step: no temporal aliasing flips the apparent direction. A wave along one diagonal moves the same way whether the
texture drifts along x or along y, so every video mixes waves along both diagonals: only then are the four
directions told apart by the video itself.

Videos are real H.264 mp4 files written with PyAV (libx264, yuv420p; yuv444p when a side is odd, which 4:2:0
cannot represent).
"""

from __future__ import annotations

import csv
import os
from fractions import Fraction
from pathlib import Path

import numpy as np

MOTION_CLASSES = ("left", "right", "up", "down")
_DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Random colour field: a coarse random grid bilinearly upsampled, shape [H, W, 3] in 0..1."""
    grid = rng.random((cells + 1, cells + 1, 3))
    ys = np.linspace(0, cells, height)
    xs = np.linspace(0, cells, width)
    y0 = np.minimum(ys.astype(int), cells - 1)
    x0 = np.minimum(xs.astype(int), cells - 1)
    wy = (ys - y0)[:, None, None]
    wx = (xs - x0)[None, :, None]
    top = grid[y0][:, x0] * (1 - wx) + grid[y0][:, x0 + 1] * wx
    bottom = grid[y0 + 1][:, x0] * (1 - wx) + grid[y0 + 1][:, x0 + 1] * wx
    return top * (1 - wy) + bottom * wy


def render_motion_frames(
    direction: str, width: int, height: int, num_frames: int, rng: np.random.Generator
) -> np.ndarray:
    """Frames `[T, H, W, 3]` uint8 of one video of class `direction`."""
    if direction not in _DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; expected one of {MOTION_CLASSES}")
    dx, dy = _DIRECTIONS[direction]

    background = _smooth_noise(rng, height, width, cells=int(rng.integers(3, 7))) * 160 + 40
    background += rng.normal(0, 8, (height, width, 1))  # static fine grain, same in every frame

    # The window: 40-70 % of each side, anywhere inside the frame.
    win_w = max(2, int(round(width * rng.uniform(0.4, 0.7))))
    win_h = max(2, int(round(height * rng.uniform(0.4, 0.7))))
    left = int(rng.integers(0, width - win_w + 1))
    top = int(rng.integers(0, height - win_h + 1))

    period = rng.uniform(0.5, 1.0) * min(width, height)  # pixels; the drift over the video equals one period
    base_colour = rng.uniform(70, 185, 3)
    num_waves = 3
    # (fx, fy) = (±1, ±1): never zero on either axis. A diagonal wave alone cannot tell a horizontal from a vertical
    # drift (moving along x by s looks like moving along y by ±s), so every video has waves of both diagonals.
    fx = rng.choice([-1, 1], size=num_waves)
    diagonal = np.array([1, -1, rng.choice([-1, 1])])
    freqs = np.stack([fx, fx * diagonal], axis=1)
    phases = rng.uniform(0, 2 * np.pi, num_waves)
    amplitudes = rng.uniform(-1, 1, (num_waves, 3)) * (80 / num_waves) + rng.choice([-1, 1], (num_waves, 1)) * 24

    ys, xs = np.mgrid[0:win_h, 0:win_w].astype(np.float64)
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        shift = period * t / num_frames
        window = np.broadcast_to(base_colour, (win_h, win_w, 3)).copy()
        for (fx, fy), phase, amplitude in zip(freqs, phases, amplitudes):
            angle = 2 * np.pi * (fx * (xs - dx * shift) + fy * (ys - dy * shift)) / period + phase
            window += np.cos(angle)[..., None] * amplitude
        frame = background.copy()
        frame[top : top + win_h, left : left + win_w] = window
        frames[t] = np.clip(frame, 0, 255).astype(np.uint8)
    return frames


def encode_mp4(
    path: str | os.PathLike,
    frames: np.ndarray,
    fps: float,
    pix_fmt: str | None = None,
    gop: int | None = None,
    frame_times: list[float] | None = None,
) -> None:
    """Write `[T, H, W, 3]` uint8 frames as H.264 mp4. `frame_times` (seconds) gives a variable frame rate."""
    import av

    height, width = frames.shape[1:3]
    if pix_fmt is None:
        pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        # one encoder thread: x264's frame threads gave other bytes for the same frames about once in 150 encodes on
        # a loaded machine, and a seed must give the same files
        stream.options = {"crf": "20", "preset": "veryfast", "g": str(gop or max(1, int(round(2 * fps)))),
                          "threads": "1"}
        time_base = Fraction(1, 90000)
        if frame_times is not None:
            stream.codec_context.time_base = time_base
        for index, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            if frame_times is not None:
                frame.pts = int(round(frame_times[index] / time_base))
                frame.time_base = time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_motion_video(
    path: str | os.PathLike,
    direction: str,
    size: tuple[int, int] = (64, 64),
    fps: float = 8.0,
    num_frames: int = 16,
    seed: int = 0,
    variable_frame_rate: bool = False,
    gop: int | None = None,
) -> None:
    """One synthetic video of class `direction`; `size` is (width, height)."""
    rng = np.random.default_rng(seed)
    frames = render_motion_frames(direction, size[0], size[1], num_frames, rng)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    frame_times = None
    if variable_frame_rate:
        # Frame intervals between half and one and a half of the nominal one.
        intervals = rng.uniform(0.5, 1.5, num_frames) / fps
        frame_times = list(np.concatenate([[0.0], np.cumsum(intervals[:-1])]))
    encode_mp4(path, frames, fps, gop=gop, frame_times=frame_times)


def generate_motion_dataset(
    out_dir: str | os.PathLike,
    num_per_class: int,
    classes: tuple[str, ...] = MOTION_CLASSES,
    size: tuple[int, int] = (64, 64),
    fps: float = 8.0,
    num_frames: int = 16,
    seed: int = 0,
    layout: str = "dirs",
    write_labels_csv: bool = True,
) -> list[tuple[str, str]]:
    """Write `num_per_class` videos per class; returns (path, label) pairs.

    layout "dirs": Kinetics style `out_dir/<class>/<class>_<i>.mp4`; "flat": `out_dir/video_<i>.mp4` with names
    that do not reveal the class (shuffled). `labels.csv` (`path,label`, paths relative to `out_dir`) is written
    when `write_labels_csv`.
    """
    if layout not in ("dirs", "flat"):
        raise ValueError(f"layout must be 'dirs' or 'flat', not {layout!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    jobs = [(label, i) for label in classes for i in range(num_per_class)]
    order = rng.permutation(len(jobs))
    video_seeds = rng.integers(0, 2**31, len(jobs))
    written: list[tuple[str, str]] = []
    for position, job_index in enumerate(order):
        label, i = jobs[job_index]
        relative = f"{label}/{label}_{i:04d}.mp4" if layout == "dirs" else f"video_{position:05d}.mp4"
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        write_motion_video(path, label, size=size, fps=fps, num_frames=num_frames, seed=int(video_seeds[job_index]))
        written.append((str(path), label))
    written.sort()
    if write_labels_csv:
        with open(out / "labels.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label"])
            for path, label in written:
                writer.writerow([Path(path).relative_to(out).as_posix(), label])
    return written
