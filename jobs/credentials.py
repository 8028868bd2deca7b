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
import re
import sys
from collections.abc import Iterator, Mapping

MASK = "***"

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

# Names of variables and of URL or connection-string parameters that hold secrets: *_API_KEY, *AUTH*, *TOKEN*,
# X-Amz-Signature, AccountKey, Password, a DSN, a connection string, a webhook (whose path is the secret), ...
_SECRET_NAME = re.compile(
    r"secret|token|passw|credential|auth|private|key|signature|cookie|session|connection|webhook"
    r"|(?:^|[_.-])(?:pwd|pass|dsn|sas|sig|conn|creds)(?:$|[_.-])",
    re.IGNORECASE,
)
# scheme://user:password@ or scheme://user@ (a lone user name is often a token); the password runs to the last @
# before the path, as an unescaped @ in a password would.
_USER_INFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)(?P<user>[^/?#@\s:]*)(?P<password>:[^/?#\s]*)?@",
                        re.IGNORECASE)
_PARAMETER = re.compile(r"(?P<name>[\w.-]+)=(?P<value>[^&;\s\"',]+)")


def redact(text: str) -> str:
    """`text` (a URI, a connection string, an error message) with the user info of every URL and the value of every
    secret-looking `name=value` parameter replaced by MASK."""

    def user_info(match: re.Match) -> str:
        user = f"{match['user']}:{MASK}" if match["password"] is not None else MASK
        return f"{match['scheme']}{user}@"

    def parameter(match: re.Match) -> str:
        return f"{match['name']}={MASK}" if _SECRET_NAME.search(match["name"]) else match[0]

    return _PARAMETER.sub(parameter, _USER_INFO.sub(user_info, text))


def carries_credentials(value: str) -> bool:
    return redact(value) != value


def looks_secret(name: str) -> bool:
    """Whether a variable's name says it holds a credential."""
    return bool(_SECRET_NAME.search(name))


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
