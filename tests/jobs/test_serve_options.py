"""`uniformer serve` without starting anything: what travels to the replicas holds no credential, the options reach
the deployment (replicas, batching, GPUs), and malformed request bodies are refused with a message."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from ray import cloudpickle
from typer.testing import CliRunner

from jobs.cli import app
from jobs.options import ServeConfig, ServeOptions
from jobs.serve import RequestError, build_app, parse_request
from pipeline.storage import uri_within

REPO = Path(__file__).resolve().parents[2]


def test_a_tracking_uri_with_a_password_never_travels_to_the_replicas(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://jobs:hunter2@mlflow:5000")
    config = ServeConfig(model="models:/actions@champion", tracking_uri="http://jobs:hunter2@mlflow:5000",
                         options=ServeOptions(gpus_per_replica=0, min_replicas=2, max_replicas=5, max_batch_size=6))
    deployment = build_app(config)._bound_deployment
    # serialised as Ray serialises a deployment's arguments for its replicas
    travelling = cloudpickle.dumps((deployment.init_args, deployment.init_kwargs))
    assert b"hunter2" not in travelling
    # the replica is told to read it from its own environment, by name (other MLflow settings the process holds, which
    # earlier tests of a session leave, travel by value)
    assert deployment.init_args[1]["names"] == ["MLFLOW_TRACKING_URI"]
    assert "MLFLOW_TRACKING_URI" not in deployment.init_args[1]["values"]
    assert deployment.ray_actor_options["num_gpus"] == 0 and deployment.init_args[2] is False
    scaling = deployment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (2, 5)
    assert deployment._deployment_config.max_ongoing_requests >= 6


def test_an_address_without_credentials_travels_by_value(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    deployment = build_app(ServeConfig(model="./package", options=ServeOptions(gpus_per_replica=1)))._bound_deployment
    assert deployment.init_args[1]["values"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert deployment.ray_actor_options["num_gpus"] == 1 and deployment.init_args[2] is True


def test_a_request_names_its_videos_as_bytes_or_uris_and_anything_else_is_refused_by_name():
    rows, views, top_k = parse_request({"videos": [{"video": "AAAA"}, {"uri": "s3://b/k.mp4"}], "top_k": 2}, "4x3", 5,
                                       ("s3://b",))
    assert rows == [{"video": "AAAA", "uri": None}, {"video": None, "uri": "s3://b/k.mp4"}]
    assert (views, top_k) == ("4x3", 2)
    for body, message in (
        ([], "expected a JSON object"), ({"videos": []}, "1 to 64 videos"), ({"videos": [{"path": "x"}]}, "videos[0]"),
        ({"videos": [{"video": "AAAA", "uri": "x"}]}, "videos[0]"), ({"videos": [{"video": 3}]}, "videos[0]"),
        ({"videos": [{"video": "A"}], "top_k": 0}, "top_k"), ({"videos": [{"video": "A"}], "top_k": True}, "top_k"),
        ({"videos": [{"video": "A"}], "views": "4by3"}, "views"), ({"videos": [{"uri": "x"}], "k": 1}, "unknown keys"),
    ):
        with pytest.raises(RequestError, match=re.escape(message)):
            parse_request(body, "4x3", 5)


@pytest.mark.parametrize("options, message", [
    ({"min_replicas": 3, "max_replicas": 2}, "replicas"), ({"max_replicas": 0}, "replicas"),
    ({"max_batch_size": 0}, "max_batch_size"), ({"gpus_per_replica": -1.0}, "gpus_per_replica"),
])
def test_replica_and_batch_bounds_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        ServeOptions(**options)


def test_the_cli_loads_no_ray_serve_until_the_serve_command_runs():
    # `uniformer --help` answers at once: Ray Serve (and Ray) are imported by the serve command's module only
    probe = "import sys, jobs.cli; print(sorted(m for m in ('ray', 'ray.serve', 'jobs.serve') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.stdout.strip() == "[]"


def test_a_bad_option_is_a_usage_error_before_ray_starts():
    result = CliRunner().invoke(app, ["serve", "--model", "models:/actions@champion", "--max-replicas", "0"])
    assert result.exit_code == 2 and "replicas" in result.output
    result = CliRunner().invoke(app, ["serve", "--model", "models:/a@b", "--tracking-uri", "http://u:hunter2@h:5000",
                                      "--print-config"])
    assert result.exit_code == 0 and "hunter2" not in result.output and "tracking_uri: http://u:***@h:5000" in (
        result.output)


def test_a_request_may_name_by_uri_only_what_lies_under_an_allowed_prefix(tmp_path):
    allowed, outside = tmp_path / "videos", tmp_path / "secrets"
    allowed.mkdir(), outside.mkdir()
    (allowed / "escape").symlink_to(outside)
    prefixes = (str(allowed), "s3://archive/videos/")
    assert uri_within(str(allowed / "a.mp4"), prefixes) and uri_within(f"file://{allowed}/x/b.mp4", prefixes)
    assert uri_within("s3://archive/videos/2026/a.mp4", prefixes)
    for refused in (str(outside / "a.mp4"), f"{allowed}/../secrets/a.mp4", str(allowed / "escape" / "a.mp4"),
                    f"{allowed}-other/a.mp4", "s3://archive/videos-other/a.mp4", "s3://archive/videos/../keys.mp4",
                    "s3://other/videos/a.mp4", "http://169.254.169.254/latest/meta-data", "/etc/passwd"):
        assert not uri_within(refused, prefixes), refused
    assert not uri_within(str(allowed / "a.mp4"), ())  # no prefix: bytes only
    with pytest.raises(RequestError, match=r"videos\[0\]: '/etc/passwd' is not under a prefix"):
        parse_request({"videos": [{"uri": "/etc/passwd"}]}, "4x3", 5, prefixes)


def test_relative_uri_prefixes_are_the_commands_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = ServeConfig(model="models:/a@b", allow_uris="./videos, s3://archive/clips/")
    assert config.uri_prefixes == (str(tmp_path / "videos"), "s3://archive/clips/")
