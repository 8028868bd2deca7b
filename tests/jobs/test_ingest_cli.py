"""`uniformer ingest` parses its options and hands them to jobs.ingest.run_ingest."""

import pytest
from typer.testing import CliRunner

from jobs.cli import app
from pipeline import load_manifest

runner = CliRunner()


def test_ingest_help_lists_the_options():
    result = runner.invoke(app, ["ingest", "--help"])
    assert result.exit_code == 0
    for option in ("--out", "--labels", "--labels-from-dirs", "--frames", "--size", "--short-side",
                   "--clips-per-video", "--sampling", "--stride", "--endpoint-url"):
        assert option in result.output


def test_unsafe_labels_csv_exits_with_a_message(tmp_path, make_videos):
    make_videos(tmp_path / "videos")
    (tmp_path / "labels.csv").write_text("path,label\n/etc/passwd,left\n")
    arguments = ["ingest", str(tmp_path / "videos"), "--out", str(tmp_path / "clips")]
    result = runner.invoke(app, arguments + ["--labels", str(tmp_path / "labels.csv")])
    assert result.exit_code == 2
    assert "absolute path" in result.output


def test_unknown_sampling_is_a_usage_error(tmp_path):
    result = runner.invoke(app, ["ingest", str(tmp_path), "--out", str(tmp_path / "o"), "--sampling", "random"])
    assert result.exit_code != 0 and "uniform" in result.output


@pytest.mark.integration
def test_ingest_command_writes_a_dataset_and_prints_the_summary(tmp_path, make_videos, ray_local):
    make_videos(tmp_path / "videos", num_per_class=1)
    result = runner.invoke(
        app,
        [
            "ingest", str(tmp_path / "videos"), "--out", str(tmp_path / "clips"), "--labels-from-dirs",
            "--frames", "4", "--size", "28", "--short-side", "32", "--clips-per-video", "2",
            "--sampling", "dense", "--stride", "2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "ingest summary" in result.output and "listed" in result.output
    manifest = load_manifest(str(tmp_path / "clips"))
    assert manifest.sampling.clips_per_video == 2 and manifest.sampling.stride == 2
    assert manifest.num_clips == 8
