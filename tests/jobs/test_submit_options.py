"""What `uniformer submit` sends before any cluster is involved: the command checked by the CLI's own parser, the
runtime_env (code, forwarded settings, never credentials) and the Ray token found where Ray looks for it."""

from __future__ import annotations

import pytest
import typer

from jobs.cli import app
from jobs.submit import (
    SubmitError,
    auth_token,
    check_invocation,
    default_working_dir,
    entrypoint_for,
    forwarded_env,
    resolve_address,
    runtime_env_for,
)

CLI = typer.main.get_command(app)  # what `uniformer submit` checks a command line against


def test_commands_are_checked_by_the_cli_parser_before_submission():
    check_invocation(CLI, ["ingest", "s3://raw/", "--out", "s3://clips/", "--frames", "8"])
    check_invocation(CLI, ["submit", "--wait", "train", "--data", "s3://clips/", "--epochs", "2"])
    check_invocation(CLI, ["--scheduled", "-vv", "score", "s3://archive/", "--model", "models:/m@champion", "--out",
                           "s3://x/"])
    for argv, message in [
        (["--version", "models"], "'uniformer --version' is not an option that runs a command"),
        (["--bogus", "models"], "'uniformer --bogus' is not an option"),
        (["--scheduled"], "no command given"),
        (["ingest", "s3://raw/"], "missing out"),
        (["train", "--data", "x", "--workers", "two"], "--workers"),
        (["train", "--data", "x", "--bogus"], "No such option: --bogus"),
        (["fly", "--to", "moon"], "'fly' is not a uniformer command"),
        (["submit", "train", "--epochs", "3"], "missing data"),  # checked through to the inner job
        (["ingest", "--help"], "prints help"),
    ]:
        with pytest.raises(SubmitError, match=message):
            check_invocation(CLI, argv)


def test_entrypoint_quotes_arguments_for_the_job_shell():
    assert entrypoint_for("ingest", ["s3://raw/my videos/", "--out", "x;rm -rf /"]) == (
        "uniformer ingest 's3://raw/my videos/' --out 'x;rm -rf /'"
    )


def test_settings_are_forwarded_and_credentials_refused():
    environ = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "AWS_ENDPOINT_URL": "http://minio:9000",
               "AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_ACCESS_KEY_ID": "AKIA", "LOG_LEVEL": "debug"}
    assert forwarded_env([], environ) == {"MLFLOW_TRACKING_URI": "http://mlflow:5000",
                                          "AWS_ENDPOINT_URL": "http://minio:9000"}
    assert forwarded_env(["LOG_LEVEL"], environ)["LOG_LEVEL"] == "debug"
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_PASSWORD", "RAY_AUTH_TOKEN",
                 "RAY_ADDRESS", "GITHUB_TOKEN", "OPENAI_API_KEY", "HF_AUTH", "PROXY_AUTHORIZATION", "SENTRY_DSN",
                 "AZURE_STORAGE_CONNECTION_STRING", "SLACK_WEBHOOK_URL", "DB_PASS"):
        with pytest.raises(SubmitError, match=f"refusing to forward {name}"):
            forwarded_env([name], {**environ, name: "x"})
    # values that hold credentials whatever their names: user info, token URLs, connection strings
    for name, value in [("MLFLOW_TRACKING_URI", "https://user:hunter2@mlflow.example.com"),
                        ("AWS_ENDPOINT_URL", "http://minio:hunter2@minio:9000"),
                        ("RESULTS_URL", "https://store.example.com/r?token=hunter2"),
                        ("ARCHIVE", "https://acct.blob.core.windows.net/a?sv=2024&sig=hunter2"),
                        ("STORE", "AccountName=a;AccountKey=hunter2")]:
        with pytest.raises(SubmitError, match=f"refusing to forward {name}=.*: it holds credentials") as refused:
            forwarded_env([name], {name: value})
        assert "hunter2" not in str(refused.value)


def test_runtime_env_ships_this_checkout_without_local_state(tmp_path):
    root = default_working_dir()
    assert root is not None and (root / "jobs" / "submit.py").is_file()
    env = runtime_env_for(root, pip=["decord==0.6.0"], env_vars={"AWS_ENDPOINT_URL": "http://minio:9000"})
    assert env["working_dir"] == str(root) and env["pip"] == ["decord==0.6.0"]
    assert {".git/", ".venv/", "runs/", "mlflow.db", "__pycache__/"} <= set(env["excludes"])
    assert runtime_env_for(None) == {}
    with pytest.raises(SubmitError, match="not a folder"):
        runtime_env_for(tmp_path / "missing")


def test_ray_token_is_found_in_rays_order(tmp_path):
    token_file, home = tmp_path / "token", tmp_path / "home"
    token_file.write_text("from-file\n")
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home")
    both = {"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    assert auth_token(both, home) == "from-env"
    assert auth_token({"RAY_AUTH_TOKEN_PATH": str(token_file)}, home) == "from-file"
    assert auth_token({}, home) == "from-home"
    assert auth_token({}, tmp_path / "nobody") is None
    assert auth_token({**both, "RAY_AUTH_MODE": "disabled"}, home) is None
    with pytest.raises(SubmitError, match="cannot be read"):
        auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home)


def test_address_must_be_the_dashboard():
    assert resolve_address(None, {"RAY_ADDRESS": "http://head:8265/"}) == "http://head:8265"
    assert resolve_address("https://ray.example.com", {}) == "https://ray.example.com"
    with pytest.raises(SubmitError, match="not a Ray dashboard address"):
        resolve_address("head:6379", {})
    with pytest.raises(SubmitError, match="no cluster address"):
        resolve_address(None, {})
