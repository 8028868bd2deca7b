"""Long videos scored as timelines (`uniformer score --windows`): a synthetic archive video made of known motion
segments, scored through the real CLI by a tiny model trained here on short clips of the two motions; its timeline's
boundaries, a killed windowed run resumed, and the refusal to mix whole-video and window rows in one destination."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

import model
from jobs.cli import app
from jobs.options import ScoreConfig
from jobs.score import decode_window_batch, run_score, score_dataset
from model.package import ModelCard, save_package
from model.transforms import eval_transform
from pipeline import Storage, parse_uri, windows
from pipeline.decode import DecodeLimits, VideoTooLarge, sample_frame_indices
from pipeline.isolation import CRASH_ON_ENV, DecoderProcess
from pipeline.predictions import ScoreConfigError, ScoreParams, latest_score_manifest, read_predictions
from pipeline.synthetic import encode_mp4, render_motion_frames
from pipeline.timeline import timeline, window_embeddings
from pipeline.views import resize_short_side, spatial_crops
from pipeline.windows import WindowSpec, iter_windows, parse_windows, window_bounds
from tests.conftest import kill_driver_after_first_part

CLASSES = ["left", "right"]
CARD = ModelCard("uniformerv2_tiny", 2, {"t_size": 8, "input_normalization": "slowfast"}, CLASSES, 8, 32, 32)
SIZE, FPS, PIECE = (48, 32), 8, 16  # a motion piece: 16 frames (2 s), the texture travels one period
# the archive video: (direction, seconds) in order
SEGMENTS = [("left", 8), ("right", 8), ("left", 8)]


def motion(direction: str, seconds: int, rng: np.random.Generator) -> np.ndarray:
    """`seconds` of one continuous motion at the training clips' speed: a piece moves its texture exactly one period,
    so pieces repeated join without a seam."""
    piece = render_motion_frames(direction, *SIZE, PIECE, rng)
    return np.tile(piece, (seconds * FPS // PIECE, 1, 1, 1))


def write_archive_video(path: Path, segments=SEGMENTS, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    encode_mp4(path, np.concatenate([motion(direction, seconds, rng) for direction, seconds in segments]), fps=FPS)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny UniFormerV2 trained on short clips of the two motions (clips sampled as scoring samples a window)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's cores are shared: one thread is as fast, and deterministic
    picks = sample_frame_indices(PIECE, CARD.frames)[0][0]
    clips, labels = [], []
    for index in range(128):
        frames = render_motion_frames(CLASSES[index % 2], *SIZE, PIECE, np.random.default_rng(index))
        clips.append(spatial_crops(resize_short_side(frames[picks], CARD.crop_size), CARD.crop_size, 1)[0])
        labels.append(index % 2)
    clips, labels = torch.from_numpy(np.stack(clips)), torch.tensor(labels)
    net = model.create_model(CARD.model, CARD.num_classes, **CARD.overrides)
    optimiser = torch.optim.AdamW(net.parameters(), 2e-3)
    net.train()
    for _ in range(150):
        batch = torch.randint(0, len(clips), (16,))
        loss = torch.nn.functional.cross_entropy(net(eval_transform(clips[batch], CARD.crop_size, "slowfast")),
                                                 labels[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    net.eval()
    held_out = [render_motion_frames(CLASSES[i % 2], *SIZE, PIECE, np.random.default_rng(5000 + i)) for i in range(16)]
    held_out = np.stack([spatial_crops(resize_short_side(f[picks], CARD.crop_size), CARD.crop_size, 1)[0]
                         for f in held_out])
    with torch.no_grad():
        guesses = net(eval_transform(torch.from_numpy(held_out), CARD.crop_size, "slowfast")).argmax(1)
    torch.set_num_threads(threads)
    accuracy = (guesses.numpy() == np.arange(16) % 2).mean()
    assert accuracy >= 0.9, f"the tiny model did not learn the motions (held-out accuracy {accuracy:.2f})"
    folder = tmp_path_factory.mktemp("package") / "motion"
    save_package(net.eval(), CARD, folder)
    return folder


# ---- windows without Ray ------------------------------------------------------------------------------------------
def test_windows_come_from_seconds_and_the_walk_only_moves_forward(tmp_path):
    assert parse_windows("2") == WindowSpec(2.0, 2.0) and parse_windows("2.5:1") == WindowSpec(2.5, 1.0)
    for bad in ("", "x", "2:0", "0", "1:2"):
        with pytest.raises(ValueError):
            parse_windows(bad)
    assert window_bounds(24.0, WindowSpec(2, 1)).tolist()[-1] == [22.0, 24.0]
    assert window_bounds(5.0, WindowSpec(2, 2)).tolist() == [[0, 2], [2, 4], [4, 5]]  # the tail is a short window
    assert window_bounds(1.0, WindowSpec(2, 1)).tolist() == [[0, 1]]

    video = write_archive_video(tmp_path / "a.mp4")
    fetched = []
    chunks = list(iter_windows(video, WindowSpec(2, 1), CARD.frames, CARD.crop_size, 1, windows_per_chunk=4,
                               on_fetch=fetched.append))
    assert [chunk.first for chunk in chunks] == list(range(0, 23, 4)) and chunks[0].total == 23
    assert max(chunk.views.nbytes for chunk in chunks) <= 4 * CARD.frames * 32 * 32 * 3  # a chunk, not the video
    walk = [index for fetch in fetched for index in fetch]
    assert walk == sorted(set(walk)), "every frame fetched once, in increasing order"
    # seconds from timestamps: the 12 fps copy of the same content has the same windows in seconds
    fast = tmp_path / "fast.mp4"
    encode_mp4(fast, np.zeros((36, 32, 48, 3), np.uint8), fps=12)
    assert next(iter_windows(fast, WindowSpec(1, 1), 8, 32)).total == 3

    # the limit on seconds bounds a window, not the video: 24 s passes a 10 s limit, 20 s windows do not
    assert next(iter_windows(video, WindowSpec(2, 2), 8, 32, limits=DecodeLimits(max_seconds=10))).total == 12
    with pytest.raises(VideoTooLarge, match="windows of 20 s"):
        next(iter_windows(video, WindowSpec(20, 20), 8, 32, limits=DecodeLimits(max_seconds=10)))


def test_windows_decoded_in_the_child_are_the_same_and_a_walk_its_child_lost_goes_on_where_it_was(tmp_path):
    video = write_archive_video(tmp_path / "a.mp4")
    here = list(iter_windows(video, WindowSpec(2, 1), 8, 32, 2, windows_per_chunk=4))
    decoder = DecoderProcess()
    try:
        there = list(iter_windows(video, WindowSpec(2, 1), 8, 32, 2, windows_per_chunk=4, decoder=decoder))
        assert decoder.call(30, len, windows._WALKS) == 0  # the child released the finished walk's reader
    finally:
        decoder.close()
    assert [c.first for c in there] == [c.first for c in here]
    for near, far in zip(here, there):
        np.testing.assert_array_equal(near.views, far.views)
        np.testing.assert_array_equal(near.bounds, far.bounds)

    # a fresh child (the one that held the walk died) opens the video again and fetches the same frames
    bounds, indices = windows.open_frame_walk(str(video), "w", WindowSpec(2, 1), 8, 32, DecodeLimits(), 1)
    first = windows.fetch_walk_frames(str(video), "w", 32, 1, np.unique(indices[:4]).tolist())
    later = np.unique(indices[4:8])
    later = later[later > np.unique(indices[:4]).max()].tolist()
    uninterrupted = windows.fetch_walk_frames(str(video), "w", 32, 1, later)
    windows._WALKS.clear()
    reopened = windows.fetch_walk_frames(str(video), "w", 32, 1, later)
    windows.close_frame_walk(str(video), "w")
    assert len(first) and not windows._WALKS
    np.testing.assert_array_equal(uninterrupted, reopened)


def test_a_long_video_that_kills_the_decoder_is_its_own_error_row_and_the_next_video_is_scored(tmp_path, monkeypatch):
    videos = [write_archive_video(tmp_path / f"v{index}.mp4", [("left", 4)], seed=index) for index in range(2)]
    monkeypatch.setenv(CRASH_ON_ENV, str(videos[0]))
    params = ScoreParams(frames=8, crop=32, short_side=32, temporal_views=1, spatial_views=1, sampling="uniform",
                         stride=16, top_k=1, full_probs=False, window_seconds=2.0, window_stride=2.0)
    batch = {"video_id": np.array(["v0", "v1"], object), "source_uri": np.array([str(v) for v in videos], object),
             "source_etag": np.array(["e0", "e1"], object),
             "source_size": np.array([v.stat().st_size for v in videos]), "shard": np.array([0, 0])}
    rows = list(decode_window_batch(batch, Storage(), params))
    crashed = [row for row in rows if row["video_id"][0] == "v0"]
    assert len(crashed) == 1 and crashed[0]["error_type"][0] == "DecoderCrashed"
    assert "again when retried" in crashed[0]["error_message"][0]
    scored = [row for row in rows if row["video_id"][0] == "v1"]
    assert sum(len(row["window_index"]) for row in scored) == 2 and not any(row["error_type"][0] for row in scored)

    # a walk past the time limit is stopped, as one video's error too
    one = {key: value[1:] for key, value in batch.items()}
    [stopped] = list(decode_window_batch(one, Storage(), params, DecodeLimits(decode_timeout=0.001)))
    assert stopped["error_type"][0] == "DecodeTimeout" and stopped["window_index"][0] == -1


# ---- through the CLI ----------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_a_long_video_scored_with_windows_gives_its_timeline_through_the_cli(trained, tmp_path, ray_local):
    src, dst = tmp_path / "archive", str(tmp_path / "timelines")
    write_archive_video(src / "long.mp4")
    runner = CliRunner()
    preview = runner.invoke(app, ["score", str(src), "--model", str(trained), "--out", dst, "--windows", "2:1",
                                  "--views", "1x1", "--top-k", "2", "--dry-run"])
    assert preview.exit_code == 0 and "would score" in preview.output, preview.output
    assert not Path(dst).exists()  # a dry run writes nothing
    result = runner.invoke(app, ["score", str(src), "--model", str(trained), "--out", dst, "--windows", "2:1",
                                 "--views", "1x1", "--top-k", "2"])
    assert result.exit_code == 0, result.output
    assert "window predictions (2 s windows every 1 s)" in result.output

    rows = read_predictions(dst).to_pylist()
    assert [row["window_index"] for row in rows] == list(range(23))
    # the same rows from Python, written nowhere: score_dataset with windows
    composed = sorted(score_dataset(str(src), str(trained), views="1x1", top_k=2, windows="2:1").take_all(),
                      key=lambda row: row["window_index"])
    assert [(row["window_index"], row["top_k_ids"]) for row in composed] == [
        (row["window_index"], row["top_k_ids"]) for row in rows]
    assert "views" not in composed[0] and composed[0]["windows_in_video"] == 23
    assert rows[0]["window_start"] == 0.0 and rows[-1]["window_end"] == 24.0
    assert all(row["video_id"] == "long.mp4" and len(row["top_k_ids"]) == 2 for row in rows)
    manifest = latest_score_manifest(parse_uri(dst), Storage())
    assert manifest.unit == "window" and (manifest.params["window_seconds"], manifest.params["window_stride"]) == (2, 1)
    schema = pq.read_schema(str(Path(dst) / manifest.shards[0].path))
    assert schema.metadata[b"uniformer.unit"] == b"window"

    result = runner.invoke(app, ["timeline", dst, "long.mp4", "--json"])
    assert result.exit_code == 0, result.output
    segments = json.loads(result.stdout)["segments"]
    assert [segment["name"] for segment in segments] == ["left", "right", "left"], segments
    for before, after, truth in zip(segments, segments[1:], (8.0, 16.0)):
        # between the centres of the last window of one segment and the first of the next
        estimate = ((before["end"] - 1.0) + (after["start"] + 1.0)) / 2
        assert abs(estimate - truth) <= 1.0, (estimate, truth, segments)
    assert all(segment["mean_prob"] > 0.5 for segment in segments)
    assert timeline(dst, "long.mp4") == timeline(dst, "long.mp4", smooth=1)
    smoothed = runner.invoke(app, ["timeline", dst, "long.mp4", "--smooth", "3"])
    assert smoothed.exit_code == 0 and "median-filtered over 3 windows" in smoothed.output

    # one destination holds one kind of rows
    whole = runner.invoke(app, ["score", str(src), "--model", str(trained), "--out", dst, "--views", "1x1",
                                "--top-k", "2"])
    assert whole.exit_code == 1 and "holds window predictions (2 s windows every 1 s)" in whole.output
    other = runner.invoke(app, ["score", str(src), "--model", str(trained), "--out", dst, "--windows", "4",
                                "--views", "1x1", "--top-k", "2"])
    assert other.exit_code == 1 and "this run asks for window predictions (4 s windows every 4 s)" in other.output
    videos_dst = str(tmp_path / "videos")
    run_score(ScoreConfig(str(src), videos_dst, str(trained), views="1x1", top_k=2), echo=lambda line: None)
    with pytest.raises(ScoreConfigError, match="holds whole-video predictions; this run asks for window"):
        run_score(ScoreConfig(str(src), videos_dst, str(trained), views="1x1", top_k=2, windows="2"))
    with pytest.raises(ScoreConfigError, match="timeline needs a run with --windows"):
        timeline(videos_dst, "long.mp4")


@pytest.mark.integration
def test_a_killed_windowed_run_resumes_with_no_window_missing_or_twice(trained, tmp_path, ray_local):
    src, dst = tmp_path / "archive", tmp_path / "timelines"
    for index in range(6):
        write_archive_video(src / f"v{index}.mp4", [("left", 4), ("right", 4)] * 2, seed=index)  # 16 s each
    address = ray_local.get_runtime_context().gcs_address
    script = (
        "import sys; from jobs.options import ScoreConfig, ScoreOptions; from jobs.score import run_score; "
        "run_score(ScoreConfig(sys.argv[1], sys.argv[2], sys.argv[3], views='1x1', windows='2:1', "
        "options=ScoreOptions(batch_size=1)), videos_per_shard=1)"
    )
    published = kill_driver_after_first_part(script, [str(src), str(dst), str(trained)], address, dst / "predictions")
    assert not (dst / "manifests").exists(), "the run finished before it could be killed"
    assert 1 <= len(published) < 6

    summary = run_score(ScoreConfig(str(src), str(dst), str(trained), views="1x1", windows="2:1"),
                        videos_per_shard=1, echo=lambda line: None)
    assert (summary.scored, summary.errored) == (6, 0)
    assert summary.shards_adopted >= len(published) and summary.shards_adopted + summary.shards_written == 6
    rows = read_predictions(str(dst), columns=["video_id", "window_index"]).to_pylist()
    seen = sorted((row["video_id"], row["window_index"]) for row in rows)
    assert seen == sorted((f"v{i}.mp4", w) for i in range(6) for w in range(15))


@pytest.mark.integration
def test_window_embeddings_are_nearer_for_the_same_motion(trained, tmp_path, ray_local):
    src, dst = tmp_path / "archive", str(tmp_path / "embedded")
    write_archive_video(src / "long.mp4")
    runner = CliRunner()
    result = runner.invoke(app, ["score", str(src), "--model", str(trained), "--out", dst, "--windows", "2",
                                 "--views", "1x1", "--embeddings"])
    assert result.exit_code == 0, result.output
    manifest = latest_score_manifest(parse_uri(dst), Storage())
    schema = pq.read_schema(str(Path(dst) / manifest.shards[0].path))
    assert schema.field("embedding").type == pa.list_(pa.float16(), 96)  # the tiny model's width

    indices, matrix = window_embeddings(dst, "long.mp4")
    assert indices.tolist() == list(range(12)) and matrix.dtype == np.float16 and matrix.shape == (12, 96)
    unit = matrix.astype(np.float32) / np.linalg.norm(matrix.astype(np.float32), axis=1, keepdims=True)
    similarity = unit @ unit.T
    motion = np.array([0] * 4 + [1] * 4 + [0] * 4)  # 2 s windows: left 0-3, right 4-7, left 8-11
    same = similarity[(motion[:, None] == motion[None, :]) & ~np.eye(12, dtype=bool)]
    different = similarity[motion[:, None] != motion[None, :]]
    assert same.mean() > different.mean(), (same.mean(), different.mean())
    assert similarity[1, 2] > similarity[1, 5] and similarity[5, 6] > similarity[5, 9]

    nearest = runner.invoke(app, ["neighbours", dst, "long.mp4", "5", "--k", "3", "--json"])
    assert nearest.exit_code == 0, nearest.output
    found = json.loads(nearest.stdout)["neighbours"]
    assert len(found) == 3 and 5 not in [item["window_index"] for item in found]
    assert motion[found[0]["window_index"]] == motion[5]
    # embeddings are stored per window only
    with pytest.raises(ValueError, match="give --windows with --embeddings"):
        ScoreConfig(str(src), dst, str(trained), embeddings=True)
