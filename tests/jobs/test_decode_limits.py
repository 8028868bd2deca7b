"""No video can take a job down: on local Ray, a video declaring a bomb-sized resolution, one longer than the limits
and one that kills its decoding process each end as one error row, while ingest and score finish every other video."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

import model
from jobs.cli import app
from jobs.config import build
from jobs.exitcodes import ExitCode
from jobs.ingest import run_ingest
from jobs.options import IngestConfig
from model.package import ModelCard, save_package
from pipeline import Storage, iter_clips, parse_uri, write_motion_video
from pipeline.decode import DecodeLimits
from pipeline.isolation import CRASH_ON_ENV
from pipeline.predictions import latest_score_manifest, read_predictions
from tests.conftest import start_local_ray
from tests.pipeline.test_video_limits import write_declared_huge_video

pytestmark = pytest.mark.integration

GOOD = [f"good/v{index}.mp4" for index in range(4)]
# The defaults except for frames, lowered so that a 40-frame video is "very long" (the bomb is refused by the
# default resolution limit).
LIMITS = DecodeLimits(max_frames=30)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("archive")
    for index, name in enumerate(GOOD):
        write_motion_video(folder / name, ("left", "right", "up", "down")[index], size=(64, 48), num_frames=16,
                           seed=index)
    write_declared_huge_video(folder / "bomb.mp4", 16000)
    write_motion_video(folder / "long.mp4", "up", size=(64, 48), num_frames=40)
    write_motion_video(folder / "crash.mp4", "down", size=(64, 48), num_frames=16)
    return folder


@pytest.fixture(scope="module")
def ray_crashing_on_one_video(archive, _ray_session_teardown):
    """A local Ray whose decoding processes die on archive/crash.mp4 (pipeline.isolation's test hook). Workers get
    the driver's environment only when Ray starts, so Ray restarts here, and again for the tests after these."""
    import ray

    ray.shutdown()
    os.environ[CRASH_ON_ENV] = str(archive / "crash.mp4")
    start_local_ray()
    yield
    ray.shutdown()
    del os.environ[CRASH_ON_ENV]


def assert_one_error_row_each(errors: list[dict]) -> None:
    by_name = {Path(error["source_uri"]).name: error for error in errors}
    assert sorted(by_name) == ["bomb.mp4", "crash.mp4", "long.mp4"] and len(errors) == 3
    assert all(error["stage"] == "decode" for error in errors)
    assert by_name["bomb.mp4"]["error_type"] == "VideoTooLarge"
    assert "16000x16000 pixels, above the limit of 4096" in by_name["bomb.mp4"]["message"]
    assert by_name["long.mp4"]["error_type"] == "VideoTooLarge"
    assert "40 frames, above the limit of 30" in by_name["long.mp4"]["message"]
    # The decoding process really died, twice (the video was retried alone in a fresh process).
    assert by_name["crash.mp4"]["error_type"] == "DecoderCrashed"
    assert "killed by SIGKILL" in by_name["crash.mp4"]["message"]
    assert "again when retried in a fresh process" in by_name["crash.mp4"]["message"]


def test_ingest_turns_each_bad_video_into_one_error_row_and_ingests_the_rest(
    archive, tmp_path, ray_crashing_on_one_video
):
    dst = str(tmp_path / "clips")
    summary = run_ingest(
        build(IngestConfig, dict(src=str(archive), out=dst, frames=4, size=28, short_side=32, **vars(LIMITS)))
    )

    assert (summary.listed, summary.ingested, summary.errored) == (7, 4, 3)
    assert summary.manifest_written
    assert_one_error_row_each(pq.read_table(summary.errors_uri).to_pylist())
    assert sorted(row["video_id"] for row in iter_clips(dst, columns=["video_id"])) == GOOD


def test_score_cli_turns_each_bad_video_into_one_error_row_and_scores_the_rest(
    archive, tmp_path, ray_crashing_on_one_video
):
    card = ModelCard("uniformerv2_tiny", 4, {"t_size": 8}, ["down", "left", "right", "up"], frames=8, crop_size=32,
                     short_side=40)
    torch.manual_seed(0)
    save_package(model.create_model(card.model, card.num_classes, **card.overrides).eval(), card, tmp_path / "pkg")
    dst = tmp_path / "scores"
    result = CliRunner().invoke(app, ["score", str(archive), "--model", str(tmp_path / "pkg"), "--out", str(dst),
                                      "--views", "1x1", "--top-k", "1", "--max-frames", str(LIMITS.max_frames)])

    assert result.exit_code == ExitCode.PARTIAL, result.output  # finished, with per-video errors
    manifest = latest_score_manifest(parse_uri(str(dst)), Storage())
    assert (manifest.counts["scored"], manifest.counts["errored"]) == (4, 3)
    assert_one_error_row_each(pq.read_table(dst / manifest.errors).to_pylist())
    assert sorted(read_predictions(str(dst), columns=["video_id"]).column("video_id").to_pylist()) == GOOD


@pytest.mark.parametrize("command", ["ingest", "score"])
def test_limits_that_admit_nothing_are_refused_before_any_work(tmp_path, command):
    required = ["--model", str(tmp_path / "pkg")] if command == "score" else []
    result = CliRunner().invoke(app, [command, str(tmp_path), "--out", str(tmp_path / "out"), *required,
                                      "--decode-timeout", "0"])
    assert result.exit_code == 2 and "decode_timeout must be > 0" in result.output
    assert not (tmp_path / "out").exists()
