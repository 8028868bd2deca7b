"""`--print-config` prints, for the same command lines, what it printed before the options were declared once on the
config classes: every job, with its defaults, with every one of its flags, and over a config file with sections.
The stored copy (golden/print_config.yaml) was written by the CLI whose flags were written out by hand."""

from __future__ import annotations

import pathlib

import pytest
import yaml
from typer.testing import CliRunner

from jobs.cli import app

GOLDEN = pathlib.Path(__file__).parent / "golden" / "print_config.yaml"

RETRAIN_FILE = """\
train:
  epochs: 3
  lr: 0.0002
  model_overrides: {t_size: 4}
ingest:
  frames: 4
  max_seconds: 60
min_gain: 0.02
"""

# name -> the command line, before --print-config; {file} is a config file holding RETRAIN_FILE
INVOCATIONS = {
    "ingest-minimal": ["ingest", "videos", "--out", "clips"],
    "ingest-every-flag": [
        "ingest", "s3://bucket/raw", "--out", "s3://bucket/clips", "--labels", "labels.csv", "--classes",
        "k400.txt", "--frames", "16", "--size", "192", "--short-side", "224", "--clips-per-video", "2",
        "--sampling", "dense", "--stride", "4", "--frames-per-segment", "1", "--retry-errors", "--keep-deleted",
        "--endpoint-url", "http://127.0.0.1:9000", "--max-frame-side", "1920", "--max-frames", "9000",
        "--max-seconds", "300", "--decode-timeout", "20",
    ],
    "ingest-dirs": ["ingest", "videos", "--out", "clips", "--labels-from-dirs", "--frames-per-segment", "3"],
    "score-minimal": ["score", "archive", "--out", "scores", "--model", "models:/m@champion"],
    "score-every-flag": [
        "score", "archive", "--out", "scores", "--model", "./package", "--views", "2x3", "--top-k", "3",
        "--full-probs", "--short-side", "256", "--batch-size", "2", "--gpu", "--actors", "4", "--cpus-per-actor",
        "2", "--precision", "bf16", "--tracking-uri", "sqlite:///mlflow.db", "--endpoint-url", "http://e:9000",
        "--max-frame-side", "2000", "--max-frames", "100", "--max-seconds", "10", "--decode-timeout", "5",
        "--retry-errors", "--keep-deleted",
    ],
    "evaluate-minimal": ["evaluate", "--data", "val@1", "--model", "models:/m/2"],
    "evaluate-every-flag": [
        "evaluate", "--data", "val", "--model", "pkg", "--views", "1x1", "--batch-size", "3", "--gpu", "--actors",
        "2", "--cpus-per-actor", "0.5", "--precision", "fp32", "--experiment", "evals", "--tracking-uri",
        "http://mlflow:5000", "--endpoint-url", "http://e:9000",
    ],
    "train-minimal": ["train", "--data", "clips"],
    "train-every-flag": [
        "train", "--data", "clips@2", "--model", "uniformerv2_tiny", "--set", "no_lmhra=True", "--set", "t_size=4",
        "--pretrained", "clip.pt", "--pretrained-class-map", "map.json", "--val", "val@1", "--val-fraction", "0.1",
        "--workers", "2", "--gpu", "--cpus-per-worker", "3", "--placement-strategy", "SPREAD", "--epochs", "4",
        "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-3", "--min-lr", "1e-5", "--weight-decay", "0.01",
        "--warmup-epochs", "0.5", "--label-smoothing", "0.1", "--no-hflip", "--flip-pairs", "pairs.csv",
        "--augment", "crop", "--input-normalization", "clip", "--grad-clip", "0", "--precision", "fp32",
        "--activation-checkpointing", "--compile", "off", "--log-every", "5", "--seed", "3", "--checkpoint-every",
        "10", "--keep-checkpoints", "3", "--max-failures", "-1", "--max-steps", "20", "--select", "last",
        "--storage", "s3://runs", "--run-name", "r1", "--experiment", "exp", "--register-as", "m",
        "--endpoint-url", "http://e:9000",
    ],
    "train-recipe": ["train", "--data", "clips", "--recipe", "k400_b16_clip", "--workers", "4"],
    "register": ["register", "--run", "uniformerv2-0a1b2c3d4e", "--storage", "s3://runs/", "--register-as", "m",
                 "--tracking-uri", "http://mlflow:5000", "--endpoint-url", "http://e:9000"],
    "demo": ["demo", "--workdir", "work", "--size", "small", "--workers", "2"],
    "demo-minimal": ["demo"],
    "retrain-minimal": ["retrain", "--source", "raw", "--dataset", "clips", "--model-name", "m", "--val", "val@1"],
    "retrain-every-flag": [
        "retrain", "--source", "raw", "--dataset", "clips", "--model-name", "m", "--val", "val@1", "--min-gain",
        "0.01", "--gate-metric", "top5_accuracy", "--gate-views", "2x1", "--init", "pretrained", "--labels",
        "l.csv", "--frames", "4", "--size", "112", "--short-side", "128", "--retry-errors", "--model",
        "uniformerv2_tiny", "--set", "no_lmhra=True", "--pretrained", "w.pt", "--workers", "2", "--gpu",
        "--epochs", "3", "--batch-size", "2", "--lr", "1e-4", "--no-hflip", "--storage", "runs", "--experiment",
        "weekly", "--endpoint-url", "http://e:9000",
    ],
    "retrain-file": ["retrain", "--config", "{file}", "--source", "raw", "--dataset", "clips", "--model-name", "m",
                     "--val", "val", "--labels-from-dirs", "--epochs", "5"],
}


def printed(arguments: list[str], config_file: pathlib.Path) -> str:
    arguments = [str(config_file) if item == "{file}" else item for item in arguments]
    result = CliRunner().invoke(app, [*arguments, "--print-config"])
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture
def retrain_file(tmp_path) -> pathlib.Path:
    path = tmp_path / "retrain.yaml"
    path.write_text(RETRAIN_FILE)
    return path


@pytest.mark.parametrize("name", sorted(INVOCATIONS))
def test_print_config_prints_what_it_printed_before_the_redesign(name, retrain_file, monkeypatch):
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    stored = yaml.safe_load(GOLDEN.read_text())
    assert printed(INVOCATIONS[name], retrain_file) == stored[name]


def test_the_stored_copy_covers_every_invocation():
    assert sorted(yaml.safe_load(GOLDEN.read_text())) == sorted(INVOCATIONS)


if __name__ == "__main__":  # writes the stored copy: only ever from the CLI it guards a change of
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "retrain.yaml"
        path.write_text(RETRAIN_FILE)
        copy = {name: printed(arguments, path) for name, arguments in INVOCATIONS.items()}
    GOLDEN.write_text(yaml.safe_dump(copy, sort_keys=True, default_style="|"))
    sys.exit(0)
