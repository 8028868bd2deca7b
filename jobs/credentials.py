"""Credentials stay in the environment of the process that uses them; what travels or is kept carries none.

A secret (token, password, key) is read from the environment by the process that needs it: the driver, and each Ray
worker from its own environment (a Ray started by the driver hands the driver's environment to its workers; on a
cluster the pods get theirs from a Secret). What travels to other processes (Ray Train loop configs, a submitted job's
runtime_env) or is kept (MLflow params and artifacts, checkpoints, error messages, logs) holds variable names,
settings that are not secret, and addresses with their credentials masked by `redact`.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator, Mapping

from pipeline.redaction import MASK, carries_credentials, looks_secret, redact  # noqa: F401 - the jobs' API

# Client settings that hold no secret: the only variables whose values travel (to Ray Train workers, and in a
# submitted job's runtime_env). MLflow itself sets MLFLOW_EXPERIMENT_ID in the driver (`mlflow.set_experiment`).
CLIENT_SETTINGS = (
    "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER",
    "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE",
)
# The driver's console settings (jobs.console sets them from -v/-q): no secret, and they travel to Ray Train workers
# only (a submitted job's driver sets its own).
CONSOLE_SETTINGS = ("MLFLOW_LOGGING_LEVEL", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
# Service addresses: they travel too, but only while they hold no credentials.
ADDRESSES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")

def mlflow_env_for_workers(environ: Mapping[str, str] | None = None) -> dict:
    """The driver's MLFLOW_* variables as they travel to Ray Train workers: {"values": the settings that hold no
    secret, "names": the others (MLFLOW_TRACKING_TOKEN, a tracking URI with a password, ...), which each worker must
    find in its own environment (see `adopt_mlflow_env`)."""
    environ = os.environ if environ is None else environ
    values, names = {}, []
    for name, value in sorted(environ.items()):
        if not name.startswith("MLFLOW_"):
            continue
        if name in CLIENT_SETTINGS + CONSOLE_SETTINGS or (name in ADDRESSES and not carries_credentials(value)):
            values[name] = value
        else:
            names.append(name)
    return {"values": values, "names": names}


def adopt_mlflow_env(env: dict) -> None:
    """On a worker: fails before any work when this process lacks a variable the driver passed by name, then applies
    the driver's settings."""
    missing = [name for name in env["names"] if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"this Ray worker's environment lacks {', '.join(missing)}, which the driver has: credentials never travel "
            "with a job, so every node needs them in its own environment (on Kubernetes, the pod's Secret; for a local "
            "run, start Ray from a shell that has them)"
        )
    os.environ.update(env["values"])


@contextlib.contextmanager
def redacted_stdout() -> Iterator[None]:
    """What is printed inside reaches stdout redacted: MLflow prints run links built from the tracking URI, password
    included, when a run ends."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        sys.stdout.write(redact(printed.getvalue()))
