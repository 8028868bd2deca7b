"""The jobs as scripts and schedulers drive them, from real runs: each exit code, one JSON summary on stdout carrying
the figures of the text on stderr, `--dry-run` writing nothing, and a training configuration read back from the
file its MLflow run logged."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from typer.testing import CliRunner

import model
from jobs.cli import app
from jobs.config import build, read_file
from jobs.exitcodes import ExitCode
from jobs.ingest import run_ingest
from jobs.options import IngestConfig
from jobs.train import final_checkpoint
from jobs.training.config import CONFIG_ARTIFACT, TrainConfig
from model.package import ModelCard, save_package
from pipeline import generate_motion_dataset

pytestmark = pytest.mark.integration

runner = CliRunner()
CLASSES = ["down", "left", "right", "up"]
CARD = ModelCard("uniformerv2_tiny", 4, {"t_size": 8}, CLASSES, frames=8, crop_size=32, short_side=40)
CLIPS = ["--frames", "8", "--size", "32", "--short-side", "40"]  # what uniformerv2_tiny is built for


def figure(text: str, name: str) -> int:
    """A figure of a text summary: the number after its name in the table."""
    match = re.search(rf"^\s+{re.escape(name)}\s+(\d+)\s*$", text, re.MULTILINE)
    assert match, f"no {name!r} in\n{text}"
    return int(match.group(1))


def invoke(arguments: list[str], code: ExitCode) -> dict | None:
    result = runner.invoke(app, arguments)
    assert result.exit_code == code, f"{result.exit_code} != {code!r}\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout) if "--json" in arguments else None


def test_ingest_exit_codes_json_and_a_dry_run_that_leaves_the_bucket_as_it_was(
    s3_server, tmp_path, make_videos, broken_video, ray_local
):
    make_videos(tmp_path / "videos", num_per_class=1)
    bucket = s3_server.create_bucket()
    s3_server.upload_folder(tmp_path / "videos", bucket, "raw")
    client = s3_server.client()

    def listing() -> list[tuple[str, str]]:
        return sorted((item["Key"], item["ETag"]) for item in client.list_objects_v2(Bucket=bucket).get("Contents", []))

    command = ["ingest", f"s3://{bucket}/raw/", "--out", f"s3://{bucket}/clips/", "--labels-from-dirs",
               "--endpoint-url", s3_server.endpoint_url, *CLIPS]
    before = listing()
    result = runner.invoke(app, command + ["--dry-run", "--json"])
    assert result.exit_code == ExitCode.SUCCESS, result.stderr
    plan = json.loads(result.stdout)
    assert plan["dry_run"] and (plan["listed"], plan["to_decode"]) == (4, 4) and plan["shards"] >= 1
    assert len(plan["first_to_decode"]) == 4 and figure(result.stderr, "would decode") == 4
    assert listing() == before  # not even the conditional-write probe or a run record

    result = runner.invoke(app, command + ["--json"])
    assert result.exit_code == ExitCode.SUCCESS, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["outcome"], summary["exit_code"], summary["manifest_version"]) == ("success", 0, 1)
    for name, key in (("listed", "listed"), ("ingested", "ingested"), ("errored", "errored"),
                      ("clips written", "clips_written"), ("shards written", "shards_written")):
        assert figure(result.stderr, name) == summary[key], name
    assert summary["ingested"] == 4

    invoke(command, ExitCode.NOTHING_NEW)

    broken = broken_video(tmp_path / "broken" / "left" / "cut.mp4", "truncated")
    client.upload_file(str(broken), bucket, "raw/left/cut.mp4")
    summary = invoke(command + ["--json"], ExitCode.PARTIAL)
    assert (summary["outcome"], summary["errored"], summary["errors"][0]["source_uri"]) == (
        "partial", 1, f"s3://{bucket}/raw/left/cut.mp4")

    failed = invoke(["ingest", f"s3://{bucket}-absent/raw/", "--out", f"s3://{bucket}/other/", "--endpoint-url",
                     s3_server.endpoint_url, "--json"], ExitCode.FAILURE)
    assert failed["outcome"] == "failure" and "does not exist" in failed["error"]
    invoke(command + ["--sampling", "random"], ExitCode.USAGE)


def test_score_exit_codes_json_and_dry_run(tmp_path, broken_video, ray_local):
    package = tmp_path / "package"
    save_package(model.create_model(CARD.model, CARD.num_classes, **CARD.overrides).eval(), CARD, package)
    archive, out = tmp_path / "archive", tmp_path / "scores"
    generate_motion_dataset(archive, 1, classes=("left", "up"), size=(48, 40), num_frames=12, seed=2)
    command = ["score", str(archive), "--model", str(package), "--out", str(out), "--views", "1x1"]

    preview = invoke(command + ["--dry-run", "--json"], ExitCode.SUCCESS)
    assert preview["dry_run"] and (preview["listed"], preview["to_score"]) == (2, 2)
    assert not out.exists()

    result = runner.invoke(app, command + ["--json"])
    assert result.exit_code == ExitCode.SUCCESS, result.stderr
    summary = json.loads(result.stdout)
    assert summary["scored"] == 2 and summary["model"]["name"] and summary["views"] == "1x1"
    assert figure(result.stderr, "scored") == summary["scored"] and figure(result.stderr, "listed") == 2

    invoke(command, ExitCode.NOTHING_NEW)
    broken_video(archive / "up" / "cut.mp4", "zero_byte")
    summary = invoke(command + ["--json"], ExitCode.PARTIAL)
    assert summary["errored"] == 1 and summary["scored"] == 0


def test_train_from_the_config_its_mlflow_run_logged_is_the_same_run(tmp_path, mlflow_server, ray_local):
    generate_motion_dataset(tmp_path / "videos", 3, size=(40, 40), num_frames=16, seed=7)
    run_ingest(
        build(
            IngestConfig,
            dict(
                src=str(tmp_path / "videos"),
                out=str(tmp_path / "clips"),
                labels_from_dirs=True,
                frames=8,
                size=32,
                short_side=40,
            ),
        )
    )
    (tmp_path / "train.yaml").write_text(yaml.safe_dump({
        "data": str(tmp_path / "clips"), "model": "uniformerv2_tiny", "workers": 1, "epochs": 1, "batch_size": 4,
        "max_steps": 2, "augment": "crop", "hflip": False, "storage": str(tmp_path / "runs"),
        "experiment": "config-round-trip", "tracking_uri": mlflow_server.uri,
    }))
    result = runner.invoke(app, ["train", "--config", str(tmp_path / "train.yaml"), "--lr", "2e-3", "--json"])
    assert result.exit_code == ExitCode.SUCCESS, result.stderr
    trained = json.loads(result.stdout)
    assert f"run {trained['run_name']} (mlflow {trained['mlflow_run_id']}) checkpoint" in result.stderr

    logged = Path(mlflow.MlflowClient(mlflow_server.uri).download_artifacts(
        trained["mlflow_run_id"], CONFIG_ARTIFACT, str(tmp_path / "logged")))
    resolved = runner.invoke(app, ["train", "--config", str(logged), "--print-config"])
    assert resolved.exit_code == 0, resolved.stderr
    config = build(TrainConfig, yaml.safe_load(resolved.stdout))
    assert config == build(TrainConfig, read_file(str(logged)))
    assert config.name == trained["run_name"] and config.lr == 2e-3 and config.data.endswith("@1")
    progress, _ = final_checkpoint(str(tmp_path / "runs"), trained["run_name"])
    assert TrainConfig.from_dict(progress["config"]) == config  # the checkpoints hold the same configuration

    overridden = runner.invoke(app, ["train", "--config", str(logged), "--epochs", "2", "--print-config"])
    changed = build(TrainConfig, yaml.safe_load(overridden.stdout))
    assert changed.epochs == 2 and changed.lr == 2e-3 and changed.name != config.name

    # the run had no --register-as: `register` logs and registers its model afterwards
    result = runner.invoke(app, ["register", "--run", trained["run_name"], "--storage", str(tmp_path / "runs"),
                                 "--register-as", f"round-trip-{tmp_path.name[-8:]}", "--json"])
    assert result.exit_code == ExitCode.SUCCESS, result.stderr
    registered = json.loads(result.stdout)
    assert registered["registered_version"] == 1
    assert f"logged {registered['model_uri']}, registered version 1" in result.stderr


def constant_package(tmp_path: Path, answer: str) -> str:
    """The weights file of a tiny UniFormerV2 whose head always picks `answer`."""
    net = model.create_model(CARD.model, CARD.num_classes, **CARD.overrides)
    with torch.no_grad():
        net.head.fc.weight.zero_()
        net.head.fc.bias.copy_(torch.tensor([10.0 if c == answer else 0.0 for c in CLASSES]))
    weights, _ = save_package(net, CARD, tmp_path / answer)
    return weights


def test_retrain_exits_rejected_then_nothing_new_and_its_dry_run_writes_nothing(tmp_path, mlflow_server, ray_local):
    from jobs.registry import log_model

    uri, name = mlflow_server.uri, f"scripting-{tmp_path.name[-12:]}"
    generate_motion_dataset(tmp_path / "val-videos", 2, classes=("left",), size=(40, 40), num_frames=16, seed=4)
    run_ingest(
        build(
            IngestConfig,
            dict(
                src=str(tmp_path / "val-videos"),
                out=str(tmp_path / "val"),
                labels_from_dirs=True,
                frames=8,
                size=32,
                short_side=40,
            ),
        )
    )
    # a champion that always answers `left` scores 1.0 on this validation set: no candidate can beat it
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment(f"{name}-champion")).info.run_id
    champion = log_model(run_id, constant_package(tmp_path, "left"), CARD, uri, register_as=name)[1]
    client.set_registered_model_alias(name, "champion", str(champion))

    generate_motion_dataset(tmp_path / "raw", 2, size=(40, 40), num_frames=16, seed=5)
    (tmp_path / "retrain.yaml").write_text(yaml.safe_dump({
        "source": str(tmp_path / "raw"), "dataset": str(tmp_path / "clips"), "model_name": name,
        "val": str(tmp_path / "val"), "gate_views": "1x1", "init": "pretrained",
        "ingest": {"labels_from_dirs": True, "frames": 8, "size": 32, "short_side": 40},
        "train": {"model": "uniformerv2_tiny", "workers": 1, "epochs": 1, "batch_size": 4, "max_steps": 2,
                  "augment": "crop", "storage": str(tmp_path / "runs"), "tracking_uri": uri},
    }))
    command = ["retrain", "--config", str(tmp_path / "retrain.yaml")]

    plan = invoke(command + ["--dry-run", "--json"], ExitCode.SUCCESS)
    assert plan["would_train"] and plan["new_videos"] == 8 and plan["champion_version"] == champion
    assert not (tmp_path / "clips").exists() and not (tmp_path / "runs").exists()
    assert len(client.search_model_versions(f"name='{name}'")) == 1

    rejected = runner.invoke(app, command + ["--json"])
    assert rejected.exit_code == ExitCode.REJECTED, rejected.stderr
    result = json.loads(rejected.stdout)
    decision = result["decision"]
    assert (f"{decision['candidate_score']:.4f} vs champion v{champion} {decision['champion_score']:.4f}: kept champion"
            in rejected.stderr)
    assert (result["outcome"], decision["promoted"], decision["champion_version"]) == ("rejected", False, champion)
    assert decision["champion_score"] == 1.0 and decision["candidate_version"] == champion + 1
    assert int(client.get_model_version_by_alias(name, "champion").version) == champion

    invoke(command, ExitCode.NOTHING_NEW)
    assert not invoke(command + ["--dry-run", "--json"], ExitCode.SUCCESS)["would_train"]
