"""Credentials never travel: marker values in MLFLOW_TRACKING_TOKEN, in the tracking URI's password and in the AWS
keys go through ingest, train, register, score and retrain (one driver process, its own local Ray) and through what
`uniformer submit` would send; then every file written (the bucket's objects, the MLflow server's database and
artifacts, the Ray instance's whole temp dir with its session logs) and everything printed is searched for them."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import typer

from jobs.cli import app
from jobs.credentials import adopt_mlflow_env, mlflow_env_for_workers, redact
from jobs.submit import SubmitError, submit
from jobs.training.config import TrainConfig

CLI = typer.main.get_command(app)  # what `uniformer submit` checks a command line against

REPO = Path(__file__).resolve().parents[2]

# The jobs run as from the command line, one after the other in one driver process, on a Ray that driver starts (so
# its workers inherit the driver's environment, as a local run's do).
DRIVER = """
import json, sys
import ray
from jobs.cli import app
ray.init(num_cpus=4, include_dashboard=False)
for argv in json.loads(sys.argv[1]):
    print("$ uniformer", *argv, flush=True)
    app(argv, standalone_mode=False)
"""


def markers() -> dict[str, str]:
    tag = uuid.uuid4().hex[:12]
    return {name: f"{name.lower()}-{tag}" for name in ("TOKEN", "PASSWORD", "ACCESS_KEY", "SECRET_KEY")}


def files_holding(roots: list[Path], secrets: list[str]) -> list[str]:
    """'path: marker' for every regular file below `roots` that holds a marker."""
    found = []
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                found += [f"{path}: {s}" for s in secrets if s.encode() in data]
    return found


def bucket_objects_holding(s3_server, bucket: str, secrets: list[str]) -> list[str]:
    client, found = s3_server.client(), []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for entry in page.get("Contents", []):
            data = client.get_object(Bucket=bucket, Key=entry["Key"])["Body"].read()
            found += [f"s3://{bucket}/{entry['Key']}: {s}" for s in secrets if s.encode() in data]
    return found


@pytest.mark.integration
def test_no_credential_is_written_or_shown_by_any_job(tmp_path, make_videos, s3_server, s3_bucket, mlflow_server):
    secret = markers()
    tracking = mlflow_server.uri.replace("http://", f"http://trainer:{secret['PASSWORD']}@")
    make_videos(tmp_path / "videos", num_per_class=2, size=(40, 40), num_frames=16)
    s3_server.upload_folder(tmp_path / "videos", s3_bucket, "raw")
    bucket, model_name = f"s3://{s3_bucket}", f"secrets-{uuid.uuid4().hex[:8]}"
    # Short, because Ray's socket paths must fit in 107 bytes; TMPDIR too, so that every temporary file is searched.
    scratch = Path(tempfile.mkdtemp(prefix="sec-", dir="/tmp"))
    workdir = tmp_path / "work"
    workdir.mkdir()
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": secret["ACCESS_KEY"], "AWS_SECRET_ACCESS_KEY": secret["SECRET_KEY"],  # moto takes any
        "AWS_ENDPOINT_URL": s3_server.endpoint_url,
        "MLFLOW_TRACKING_URI": tracking,  # a plain `mlflow server` ignores the basic auth MLflow sends from it
        "MLFLOW_TRACKING_TOKEN": secret["TOKEN"],
        "RAY_TMPDIR": str(scratch), "TMPDIR": str(scratch),
        # Ray Train's run state, loop config included, is exported to the session's files, as the dashboard has it
        "RAY_TRAIN_ENABLE_STATE_TRACKING": "1", "RAY_enable_export_api_write": "1",
        "PYTHONPATH": str(REPO),
    }
    env.pop("RAY_ADDRESS", None)
    clip_options = ["--frames", "8", "--size", "32", "--short-side", "40"]
    tiny = ["--model", "uniformerv2_tiny", "--epochs", "1", "--no-hflip"]
    commands = [
        ["ingest", f"{bucket}/raw", "--out", f"{bucket}/clips", "--labels-from-dirs", *clip_options],
        ["train", "--data", f"{bucket}/clips", *tiny, "--batch-size", "2", "--max-steps", "2", "--compile", "off",
         "--storage", f"{bucket}/runs", "--run-name", model_name, "--experiment", model_name,
         "--register-as", model_name],
        # the run's recorded tracking URI is masked: register finds the real one in MLFLOW_TRACKING_URI
        ["register", "--run", model_name, "--storage", f"{bucket}/runs"],
        ["score", f"{bucket}/raw", "--model", f"models:/{model_name}/1", "--out", f"{bucket}/scores", "--views", "1x1"],
        ["retrain", "--source", f"{bucket}/raw", "--dataset", f"{bucket}/clips", "--model-name", f"{model_name}-r",
         "--val", f"{bucket}/clips@1", "--labels-from-dirs", *clip_options, *tiny, "--batch-size", "4",
         "--storage", f"{bucket}/retrain", "--experiment", f"{model_name}-r"],
    ]
    try:
        done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(commands)], cwd=workdir, env=env,
                              capture_output=True, text=True, timeout=600)
        printed = done.stdout + done.stderr
        assert done.returncode == 0, printed[-5000:]
        assert "registered version 1" in printed and "PROMOTED" in printed, printed[-3000:]
        values = list(secret.values())
        mlflow_root = Path(mlflow_server.log.name).parent  # its sqlite database, artifacts and log
        leaks = [s for s in values if s in printed]
        leaks += files_holding([scratch, workdir, mlflow_root], values)
        leaks += bucket_objects_holding(s3_server, s3_bucket, values)
        assert not leaks, "\n".join(leaks)
        # the search did reach the loop configs Ray kept: the train runs' exported state names the token variable
        exported = b"".join(p.read_bytes() for p in scratch.glob("ray/session_*/logs/export_events/*TRAIN*"))
        assert exported.count(b"MLFLOW_TRACKING_TOKEN") >= 2, "no exported Ray Train state holds the loop configs"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class RecordingClient:
    """Stands in for JobSubmissionClient: keeps what would be sent to the cluster."""

    def __init__(self):
        self.sent: dict = {}

    def get_address(self) -> str:
        return "http://head:8265"

    def submit_job(self, **request) -> str:
        self.sent = request
        return "raysubmit_recorded"


def test_submit_sends_no_credential_and_refuses_an_address_that_holds_one():
    secret = markers()
    environ = {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000", "MLFLOW_TRACKING_TOKEN": secret["TOKEN"],
        "MLFLOW_TRACKING_PASSWORD": secret["PASSWORD"], "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
        "AWS_ACCESS_KEY_ID": secret["ACCESS_KEY"], "AWS_SECRET_ACCESS_KEY": secret["SECRET_KEY"],
        "AWS_ENDPOINT_URL": "http://minio:9000", "LOG_LEVEL": "debug",
    }
    client = RecordingClient()
    submit(CLI, "train", ["--data", "s3://clips/k400"], client=client, env=["LOG_LEVEL"], environ=environ)
    sent = json.dumps(client.sent)
    assert not [s for s in secret.values() if s in sent], sent
    assert client.sent["runtime_env"]["env_vars"] == {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
        "AWS_ENDPOINT_URL": "http://minio:9000", "LOG_LEVEL": "debug",
    }

    with_password = {**environ, "MLFLOW_TRACKING_URI": f"http://trainer:{secret['PASSWORD']}@mlflow:5000"}
    with pytest.raises(SubmitError, match="configure MLFLOW_TRACKING_URI on the cluster") as refused:
        submit(CLI, "train", ["--data", "s3://clips/k400"], client=RecordingClient(), environ=with_password)
    assert secret["PASSWORD"] not in str(refused.value) and "http://trainer:***@mlflow:5000" in str(refused.value)
    with pytest.raises(SubmitError, match="refusing to forward MLFLOW_TRACKING_TOKEN: its name says"):
        submit(CLI, "train", ["--data", "s3://clips/k400"], client=RecordingClient(), env=["MLFLOW_TRACKING_TOKEN"],
               environ=environ)

    # nor inside an argument: the entrypoint is shown to everyone who lists the cluster's jobs
    for argument in (["--tracking-uri", f"http://trainer:{secret['PASSWORD']}@mlflow:5000"],
                     ["--endpoint-url", f"http://minio:9000/?X-Amz-Signature={secret['TOKEN']}"]):
        client = RecordingClient()
        job_args = ["s3://archive/", "--model", "models:/m@champion", "--out", "s3://scores/", *argument]
        with pytest.raises(SubmitError, match="refusing to submit the argument") as refused:
            submit(CLI, "score", job_args, client=client, environ=environ)
        assert not [s for s in secret.values() if s in str(refused.value)] and not client.sent


def test_a_password_inside_a_uri_appears_in_no_message_of_any_job(tmp_path, monkeypatch):
    """retrain, ingest, score, evaluate and submit, their text and their --json, with a password in each address."""
    from typer.testing import CliRunner

    from jobs.cli import app

    password = markers()["PASSWORD"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "raw").mkdir()
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"http://alice:{password}@127.0.0.1:{port}"
    commands = [
        (["retrain", "--source", "./raw", "--dataset", "./clips", "--model-name", "m", "--val", "./val", "--dry-run"],
         {"MLFLOW_TRACKING_URI": address}),
        (["ingest", "s3://bucket/raw", "--out", "./clips", "--endpoint-url", address], {}),
        (["ingest", "./raw", "--out", "s3://bucket/clips"], {"AWS_ENDPOINT_URL": address}),
        (["score", "./raw", "--model", "models:/m@champion", "--out", "./scores", "--tracking-uri", address], {}),
        (["evaluate", "--data", "./clips", "--model", "models:/m@champion", "--tracking-uri", address], {}),
        (["submit", "--address", "http://127.0.0.1:1", "train", "--data", "./clips", "--endpoint-url", address], {}),
    ]
    for argv, env in commands:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        for json_output in ([], ["--json"]):
            if argv[0] == "submit" and json_output:
                continue
            result = CliRunner().invoke(app, argv + json_output)
            assert result.exit_code != 0, (argv, result.output)
            assert password not in result.output and "Traceback" not in result.output, (argv, result.output)
        for name in env:
            monkeypatch.delenv(name)


def test_redact_masks_user_info_and_secret_parameters_and_nothing_else():
    assert redact("http://trainer:pw@mlflow:5000/api") == "http://trainer:***@mlflow:5000/api"
    assert redact("postgresql://mlflow:p@ss@db/mlflow") == "postgresql://mlflow:***@db/mlflow"  # an unescaped @
    assert redact("https://ghp_token@github.com/x") == "https://***@github.com/x"
    assert redact("https://acct.blob.core.windows.net/c?sv=2024&sig=abc%3D") == (
        "https://acct.blob.core.windows.net/c?sv=2024&sig=***"
    )
    assert redact("AccountName=a;AccountKey=k==;EndpointSuffix=x") == "AccountName=a;AccountKey=***;EndpointSuffix=x"
    assert redact("API request to http://u:pw@h/api/2.0/x failed") == "API request to http://u:***@h/api/2.0/x failed"
    for clean in ("http://mlflow:5000", "s3://clips/k400@3", "models:/actions@champion", "sqlite:////tmp/mlflow.db",
                  "file:///data/clips@2", "/data/runs", "uniformerv2_b16"):
        assert redact(clean) == clean


def test_train_config_record_masks_every_address():
    cfg = TrainConfig(data="s3://clips/k400@3", tracking_uri="http://trainer:pw@mlflow:5000",
                      endpoint_url="http://key:secret@minio:9000", storage="s3://runs/")
    record = cfg.redacted()
    assert record["tracking_uri"] == "http://trainer:***@mlflow:5000"
    assert record["endpoint_url"] == "http://key:***@minio:9000"
    assert record["data"] == cfg.data and record["storage"] == cfg.storage
    assert cfg.tracking_uri == "http://trainer:pw@mlflow:5000"  # the driver keeps the real one in memory


def test_secrets_reach_workers_by_name_and_a_worker_without_one_fails_naming_it(monkeypatch):
    driver = {"MLFLOW_TRACKING_URI": "http://trainer:pw@mlflow:5000", "MLFLOW_TRACKING_TOKEN": "tok-123",
              "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_EXPERIMENT_ID": "7", "AWS_SECRET_ACCESS_KEY": "aws"}
    env = mlflow_env_for_workers(driver)
    assert env == {"values": {"MLFLOW_EXPERIMENT_ID": "7", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"},
                   "names": ["MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_URI"]}
    assert "pw" not in json.dumps(env) and "tok-123" not in json.dumps(env)

    worker = {"MLFLOW_TRACKING_URI": "http://trainer:pw@mlflow:5000"}
    monkeypatch.setattr(os, "environ", worker)
    with pytest.raises(RuntimeError, match="environment lacks MLFLOW_TRACKING_TOKEN, which the driver has") as failed:
        adopt_mlflow_env(env)
    assert "tok-123" not in str(failed.value)
    assert worker == {"MLFLOW_TRACKING_URI": "http://trainer:pw@mlflow:5000"}  # nothing applied before the check
    worker["MLFLOW_TRACKING_TOKEN"] = "the worker's own"
    adopt_mlflow_env(env)
    assert worker["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0" and worker["MLFLOW_TRACKING_TOKEN"] == "the worker's own"


def test_the_drivers_console_settings_reach_workers_as_values():
    # jobs.console sets them in the driver from -v/-q, after the cluster's workers started: they cannot be required
    driver = {"MLFLOW_LOGGING_LEVEL": "WARNING", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    assert mlflow_env_for_workers(driver) == {"values": driver, "names": []}
