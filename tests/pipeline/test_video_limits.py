"""What one video may cost: header probes and limits, scaled-down decoding, and decoding in a child process that may
crash or hang without taking its caller along."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.decode import (
    DecodeLimits,
    DecoderCrashed,
    DecodeTimeout,
    VideoDecodeError,
    VideoHeader,
    VideoTooLarge,
    decode_clips,
    decode_size,
    probe_video,
    read_sampled_frames,
    resize_center_crop,
)
from pipeline.ingest import ingest_group
from pipeline.isolation import CRASH_ON_ENV, DecoderProcess
from pipeline.manifest import SamplingParams
from pipeline.storage import Storage
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


@pytest.fixture
def decoder():
    process = DecoderProcess()
    yield process
    process.close()


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
        DecodeLimits(decode_timeout=0)


def test_a_larger_source_is_decoded_scaled_down_to_the_clips_short_side_giving_nearly_the_same_clips(tmp_path):
    path = tmp_path / "wide.mp4"
    write_motion_video(path, "right", size=(640, 360), fps=8.0, num_frames=16)
    header = probe_video(str(path))
    assert decode_size(header, 360) == {} and decode_size(header, 480) == {}  # not larger: decoded at its size
    assert decode_size(header, 128) == {"width": 228, "height": 128}  # short side 128, aspect kept, even sides
    frames, _, info = read_sampled_frames(str(path), 4, min_short_side=128)
    assert frames.shape == (4, 128, 228, 3) and (info.width, info.height) == (640, 360)

    scaled, _ = decode_clips(str(path), frames=4, short_side=128)
    unscaled, _, _ = read_sampled_frames(str(path), 4)
    assert unscaled.shape == (4, 360, 640, 3)
    difference = np.abs(resize_center_crop(unscaled, 128).astype(int) - scaled[0].astype(int))
    assert difference.mean() < 2.0  # the decoder's scaler and torch's resize agree up to rounding


def test_the_decoder_process_returns_results_and_the_videos_own_errors(tmp_path, decoder, broken_video):
    path = tmp_path / "v.mp4"
    write_motion_video(path, "left", size=(64, 48), num_frames=16)
    here, info_here = decode_clips(str(path), frames=4, short_side=32)
    there, info_there = decode_clips(str(path), frames=4, short_side=32, decoder=decoder)
    np.testing.assert_array_equal(here, there)
    assert info_there.frame_indices.tolist() == info_here.frame_indices.tolist()

    text = broken_video(tmp_path / "text.mp4", "text")
    with pytest.raises(VideoDecodeError, match="not a readable video container") as caught:
        decode_clips(str(text), frames=4, short_side=32, decoder=decoder)
    assert type(caught.value) is VideoDecodeError
    with pytest.raises(VideoTooLarge):
        decode_clips(str(path), frames=4, short_side=32, limits=DecodeLimits(max_frames=8), decoder=decoder)


def test_a_call_past_its_time_limit_stops_the_child_and_the_next_call_gets_a_fresh_one(decoder):
    first = decoder.call(30, os.getpid)
    with pytest.raises(DecodeTimeout, match="limit of 0.5 s"):
        decoder.call(0.5, time.sleep, 60)
    with pytest.raises(ProcessLookupError):
        os.kill(first, 0)  # really gone, and reaped
    assert decoder.call(30, os.getpid) not in (first, os.getpid())


def test_a_child_that_dies_is_replaced_and_the_call_retried_once(tmp_path, decoder):
    with pytest.raises(DecoderCrashed, match="killed by SIGABRT, and again when retried in a fresh process"):
        decoder.call(30, os.abort)
    path = tmp_path / "v.mp4"
    write_motion_video(path, "left", size=(64, 48), num_frames=16)
    clips, _ = decode_clips(str(path), frames=4, short_side=32, decoder=decoder)  # the next video is decoded
    assert clips.shape == (1, 4, 32, 32, 3)


def test_a_video_that_kills_the_decoder_is_one_error_and_the_rest_of_its_group_is_ingested(
    tmp_path, decoder, monkeypatch
):
    paths = [tmp_path / "videos" / f"v{index}.mp4" for index in range(3)]
    sources = []
    for index, path in enumerate(paths):
        write_motion_video(path, "left", size=(64, 48), num_frames=16, seed=index)
        sources.append({"uri": str(path), "video_id": path.name, "etag": f"e{index}", "size": path.stat().st_size,
                        "label_name": None, "label": None})
    monkeypatch.setenv(CRASH_ON_ENV, str(paths[1]))
    sampling = SamplingParams(4, 32, 28, "uniform", 16, 1, 1)
    root = tmp_path / "clips"
    result = ingest_group({"shard": "shards/part-test.parquet", "videos": sources}, Storage(), sampling, str(root),
                          decoder=decoder)

    assert [video["video_id"] for video in result["videos"]] == ["v0.mp4", "v2.mp4"]
    [error] = result["errors"]
    assert (error["source_uri"], error["stage"], error["error_type"]) == (str(paths[1]), "decode", "DecoderCrashed")
    assert "killed by SIGKILL" in error["message"] and "again when retried" in error["message"]
    shard = pq.read_table(root / "shards" / "part-test.parquet", columns=["video_id"])
    assert sorted(shard.column("video_id").to_pylist()) == ["v0.mp4", "v2.mp4"]
