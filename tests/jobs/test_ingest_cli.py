"""`uniformer ingest` parses its options and hands them to jobs.ingest.run_ingest."""

import pytest
from typer.testing import CliRunner

from jobs.cli import app
from jobs.config import build
from jobs.options import IngestConfig
from pipeline import load_manifest

runner = CliRunner()


def test_ingest_help_lists_the_options():
    result = runner.invoke(app, ["ingest", "--help"])
    assert result.exit_code == 0
    for option in ("--out", "--labels", "--labels-from-dirs", "--frames", "--size", "--short-side",
                   "--clips-per-video", "--sampling", "--stride", "--endpoint-url", "--retry-errors", "--keep-deleted"):
        assert option in result.output


def test_unsafe_labels_csv_exits_with_a_message(tmp_path, make_videos):
    make_videos(tmp_path / "videos")
    (tmp_path / "labels.csv").write_text("path,label\n/etc/passwd,left\n")
    arguments = ["ingest", str(tmp_path / "videos"), "--out", str(tmp_path / "clips")]
    result = runner.invoke(app, arguments + ["--labels", str(tmp_path / "labels.csv")])
    assert result.exit_code == 1  # a handled failure, not a usage error
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


def test_retrain_passes_retry_errors_to_its_ingest():
    result = runner.invoke(app, ["retrain", "--help"])
    assert result.exit_code == 0 and "--retry-errors" in result.output


@pytest.mark.integration
def test_gc_command_lists_with_dry_run_then_removes_and_prints_the_bytes_freed(tmp_path, make_videos, ray_local):
    from jobs.ingest import run_ingest

    src, dst = tmp_path / "videos", tmp_path / "clips"
    make_videos(src, num_per_class=1, classes=("left", "right"))
    ingest = build(IngestConfig, dict(src=str(src), out=str(dst), labels_from_dirs=True, frames=4, size=28, short_side=32))
    run_ingest(ingest, echo=lambda line: None)
    (src / "right" / "right_0000.mp4").unlink()
    run_ingest(ingest, echo=lambda line: None)  # v2 without right_0000: its shard is version 1's alone
    gone = {shard.path for shard in load_manifest(f"{dst}@1").shards} - {
        shard.path for shard in load_manifest(str(dst)).shards
    }

    arguments = ["gc", str(dst), "--keep-versions", "1", "--min-age", "0"]
    dry = runner.invoke(app, arguments + ["--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert all(f"would remove {path}" in dry.output for path in gone | {"manifests/v000001.json"})
    assert all((dst / path).exists() for path in gone)

    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert all(f"removed {path}" in result.output for path in gone) and "bytes freed" in result.output
    assert not any((dst / path).exists() for path in gone) and not (dst / "manifests" / "v000001.json").exists()
    assert load_manifest(str(dst)).num_clips == 1

    result = runner.invoke(app, ["gc", str(dst), "--keep-versions", "0"])
    assert result.exit_code == 2


@pytest.mark.parametrize(("given", "message"), [
    (["--max-seconds", "nan"], "max_seconds: expected a finite number, got nan"),
    (["--decode-timeout", "inf"], "decode_timeout: expected a finite number, got inf"),
    (["--frames", "0"], "frames must be >= 1"),
])
def test_numbers_that_are_no_setting_are_usage_errors(tmp_path, given, message):
    result = runner.invoke(app, ["ingest", str(tmp_path), "--out", str(tmp_path / "clips"), *given])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "clips").exists()


@pytest.mark.parametrize("out", ["afile", "afile/below"])
def test_an_output_that_cannot_be_a_folder_is_refused_before_any_work(tmp_path, out):
    (tmp_path / "videos").mkdir()
    (tmp_path / "afile").write_text("not a folder")
    result = runner.invoke(app, ["ingest", str(tmp_path / "videos"), "--out", str(tmp_path / out)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"cannot write under {tmp_path / out}: {tmp_path / 'afile'} is a file, not a folder" in result.output
    assert sorted(path.name for path in tmp_path.iterdir()) == ["afile", "videos"]


def test_a_config_file_that_is_not_utf8_is_a_usage_error(tmp_path):
    (tmp_path / "ingest.yaml").write_bytes(b"\xff\xfe src: x")
    result = runner.invoke(app, ["ingest", "--config", str(tmp_path / "ingest.yaml")])
    assert result.exit_code == 2 and "not UTF-8 text" in result.output, result.output


def test_views_beyond_any_test_protocol_are_refused_by_score_before_any_work(tmp_path):
    result = runner.invoke(app, ["score", str(tmp_path), "--model", str(tmp_path / "nothing"), "--out",
                                 str(tmp_path / "scores"), "--views", "99999999x99999999"])
    assert result.exit_code != 0 and "exceed 32x10" in " ".join(result.output.split()), result.output
    assert not (tmp_path / "scores").exists()


def test_score_with_a_model_that_is_not_there_leaves_nothing_behind(tmp_path):
    (tmp_path / "videos").mkdir()
    result = runner.invoke(app, ["score", str(tmp_path / "videos"), "--model", str(tmp_path / "nonexistent"),
                                 "--out", str(tmp_path / "scores")])
    assert result.exit_code == 1 and "is not a model package folder" in result.output, result.output
    assert not (tmp_path / "scores").exists()
