"""What one video may cost: header probes and limits, scaled-down decoding."""

from __future__ import annotations

import struct
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline.decode import (
    DecodeLimits,
    VideoHeader,
    VideoTooLarge,
    decode_clips,
    decode_size,
    probe_video,
    read_sampled_frames,
    resize_center_crop,
)
from pipeline.synthetic import write_motion_video
from pipeline.views import decode_views


def write_declared_huge_video(path: str | Path, side: int) -> Path:
    """A few KB of uncompressed 64x48 video whose header declares `side` x `side` pixels: a QuickTime `raw ` sample
    entry has no bitstream header of its own, so FFmpeg believes the 16-bit width and height of the entry."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mov") as container:
        stream = container.add_stream("rawvideo", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "rgb24"
        for index in range(4):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 40 * index, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
    data = bytearray(path.read_bytes())
    entry = data.find(b"stsd") + 12  # after the box type, version/flags and entry count
    assert data[entry + 4 : entry + 8] == b"raw "
    size_at = entry + 32  # entry size, format, reserved, data reference index, 16 bytes of version/vendor/quality
    assert struct.unpack(">HH", data[size_at : size_at + 4]) == (64, 48)
    data[size_at : size_at + 4] = struct.pack(">HH", side, side)
    path.write_bytes(bytes(data))
    return path


def test_probe_reads_what_the_headers_declare(tmp_path):
    path = tmp_path / "v.mp4"
    write_motion_video(path, "left", size=(64, 48), fps=8.0, num_frames=16)
    assert probe_video(str(path)) == VideoHeader(64, 48, 16, 2.0)
    assert probe_video(path.read_bytes()) == VideoHeader(64, 48, 16, 2.0)


def test_probe_estimates_the_frame_count_a_container_does_not_state(tmp_path):
    path = tmp_path / "v.mkv"
    with av.open(str(path), "w", format="matroska") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for index in range(16):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 10 * index, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0  # Matroska does not say
    header = probe_video(str(path))
    assert header.seconds == pytest.approx(2.0, abs=0.2) and header.frames == pytest.approx(16, abs=1)
    with pytest.raises(VideoTooLarge, match="frames"):
        read_sampled_frames(str(path), 4, limits=DecodeLimits(max_frames=10, max_seconds=60))


def test_a_declared_bomb_resolution_is_refused_before_decord_opens_it(tmp_path, monkeypatch):
    import decord

    path = write_declared_huge_video(tmp_path / "bomb.mp4", 16000)
    assert probe_video(str(path)) == VideoHeader(16000, 16000, 4, 0.5)

    def must_not_open(*args, **kwargs):
        raise AssertionError("decord opened a video the limits refuse")

    monkeypatch.setattr(decord, "VideoReader", must_not_open)
    with pytest.raises(VideoTooLarge, match="16000x16000 pixels, above the limit of 4096"):
        decode_clips(str(path), frames=4, short_side=32)
    with pytest.raises(VideoTooLarge):
        decode_views(path.read_bytes(), frames=4, crop=32)


def test_resolution_frames_and_duration_limits_each_refuse(tmp_path):
    path = tmp_path / "v.mp4"
    write_motion_video(path, "up", size=(96, 64), fps=8.0, num_frames=16)
    clips, _ = decode_clips(str(path), frames=4, short_side=32)  # within the defaults
    assert clips.shape == (1, 4, 32, 32, 3)
    refusals = {
        "96x64 pixels, above the limit of 80": DecodeLimits(max_frame_side=80),
        "16 frames, above the limit of 15": DecodeLimits(max_frames=15),
        "2 s, above the limit of 1.5 s": DecodeLimits(max_seconds=1.5),
    }
    for message, limits in refusals.items():
        with pytest.raises(VideoTooLarge, match=message):
            decode_clips(str(path), frames=4, short_side=32, limits=limits)
    with pytest.raises(ValueError, match="> 0"):
        DecodeLimits(max_frames=0)


def test_a_much_larger_source_is_decoded_scaled_down_to_nearly_the_same_clips(tmp_path):
    path = tmp_path / "wide.mp4"
    write_motion_video(path, "right", size=(640, 360), fps=8.0, num_frames=16)
    header = probe_video(str(path))
    assert decode_size(header, 180) == {}  # not much larger: decoded at full size
    assert decode_size(header, 64) == {"width": 228, "height": 128}  # short side 2 x 64, aspect kept
    frames, _, info = read_sampled_frames(str(path), 4, min_short_side=64)
    assert frames.shape == (4, 128, 228, 3) and (info.width, info.height) == (640, 360)

    scaled, _ = decode_clips(str(path), frames=4, short_side=64)
    unscaled, _, _ = read_sampled_frames(str(path), 4)
    assert unscaled.shape == (4, 360, 640, 3)
    difference = np.abs(resize_center_crop(unscaled, 64).astype(int) - scaled[0].astype(int))
    assert difference.mean() < 2.0  # the decoder's scaler and torch's resize agree up to rounding
