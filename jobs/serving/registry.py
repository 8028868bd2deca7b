"""Logging a trained model to MLflow (weights + config + models-from-code pyfunc) and registering it."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np

import model
from jobs.credentials import redact
from model.package import ModelCard
from pipeline.lease import LeaseHeld, LeaseLost

PYFUNC_SOURCE = os.path.join(os.path.dirname(__file__), "pyfunc_model.py")
MODEL_PACKAGE_DIR = os.path.dirname(model.__file__)

log = logging.getLogger(__name__)


# How long a job waits for the tracking server to answer at all before it says so: MLflow's own client retries a
# refused connection with exponential backoff for minutes.
PROBE_TIMEOUT_S = 10.0


class TrackingUnreachable(RuntimeError):
    """The MLflow tracking server did not answer the probe a job makes before its work starts."""


def probe_tracking_server(uri: str) -> None:
    """Raise TrackingUnreachable within PROBE_TIMEOUT_S when the tracking server at an http(s) `uri` does not answer
    at all. Any HTTP answer counts as reachable (a 401 or 404 is the job's to explain), and so does a TLS handshake
    this probe cannot verify (MLflow's client has its own certificate settings). Local stores are not probed."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    parts = urlsplit(uri)
    # without the user info: requests would send it as a header, and the probe needs no credential
    health = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path.rstrip("/") + "/health", "", ""))
    try:
        requests.get(health, timeout=(PROBE_TIMEOUT_S / 2, PROBE_TIMEOUT_S / 2), allow_redirects=False)
    except requests.exceptions.SSLError:
        return
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as error:
        raise TrackingUnreachable(
            f"the MLflow tracking server at {redact(uri)} does not answer ({type(error).__name__} within "
            f"{PROBE_TIMEOUT_S:.0f} s): nothing was started. Check the tracking URI (--tracking-uri or "
            "MLFLOW_TRACKING_URI) and that the server is up"
        ) from None


def experiment_id(client, name: str) -> str:
    """The id of MLflow experiment `name`, created when missing. With a sqlite tracking URI its artifacts go to
    `mlruns/` beside the database file: MLflow's default is the working directory of whichever command created it."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if client.tracking_uri.startswith("sqlite:///"):
        database = os.path.abspath(client.tracking_uri[len("sqlite:///"):])
        location = Path(os.path.dirname(database), "mlruns").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created by another command meanwhile
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _quoted(name: str) -> str:
    # MLflow takes the text between matching quotes as is (no escapes): quote with a character the name does not
    # hold, so that a name like "x' AND name='y" is one literal and cannot pick another model's versions.
    quote = next((q for q in ("'", '"') if q not in name), None)
    if quote is None:
        raise ValueError(f"model name {name!r} holds both quote characters: MLflow cannot search for it")
    return f"{quote}{name}{quote}"


def model_versions(client, name: str) -> list:
    """Every registered version of model `name`; none when there is no such model."""
    return client.search_model_versions(f"name={_quoted(name)}")


class RegistryLease:
    """A lease of one registered model kept in the MLflow registry itself: every process that talks to the same
    tracking server shares it, whatever storage its job writes to.

    The registry's one atomic operation is creating a registered model under a name none has. A lease is a line of
    registered models `MODEL.KIND-lock.G`, G = 1, 2, ...: the holder of generation G holds the lease while G is the
    highest generation, its `owner` tag is the holder's and its `expires_at` tag lies ahead. A waiter that finds the
    highest generation expired (a crashed holder) or none creates G + 1, which of two waiters only one can. Renewed in
    the background while held; `ensure_held` checks it right before an action only the holder may take; released by
    deleting its generation, and a new holder deletes the generations below its own."""

    name = "lease"  # what the messages call it
    contender = "another holder"
    on_loss = ""  # what losing it means for the holder's work

    def __init__(self, client, model_name: str, kind: str, ttl_s: float = 900, wait_s: float = 600,
                 renew_every_s: float | None = None):
        self.client, self.ttl_s, self.wait_s = client, ttl_s, wait_s
        self.renew_every_s = ttl_s / 3 if renew_every_s is None else renew_every_s
        self.prefix = f"{model_name}.{kind}-lock."
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.generation: int | None = None  # ours while held
        self._holder: dict = {}  # the other holder's tags as last read, for LeaseHeld
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._renewal: threading.Thread | None = None

    @property
    def where(self) -> str:
        return f"registered model {self.prefix}N"

    def generations(self) -> dict[int, dict]:
        """{generation: tags} of this lease's registered models."""
        found = {}
        for registered in self.client.search_registered_models(f"name LIKE {_quoted(self.prefix + '%')}",
                                                               max_results=1000):
            suffix = registered.name[len(self.prefix):]
            if registered.name.startswith(self.prefix) and suffix.isdigit():  # LIKE's `_` matches any character
                found[int(suffix)] = dict(registered.tags)
        return found

    def __enter__(self) -> RegistryLease:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

        deadline, delay = time.monotonic() + self.wait_s, 0.1
        while True:
            generations = self.generations()
            top = max(generations, default=0)
            if top == 0 or float(generations[top].get("expires_at", 0)) < time.time():
                try:
                    self.client.create_registered_model(
                        f"{self.prefix}{top + 1}", tags=self._tags(time.time() + self.ttl_s),
                        description=f"{self.name} of uniformer, held by {self.owner}; removed when released",
                    )
                    self.generation = top + 1
                    break
                except MlflowException as error:
                    if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                        raise
                    # another waiter created that generation first
            else:
                self._holder = generations[top]
            if time.monotonic() > deadline:
                owner, expires_at = self._holder.get("owner"), float(self._holder.get("expires_at", 0)) or None
                until = f" until {time.strftime('%H:%M:%S UTC', time.gmtime(expires_at))}" if expires_at else ""
                raise LeaseHeld(f"{self.name} ({self.where}) is held by {self.contender} ({owner}{until})",
                                owner, expires_at)
            time.sleep(delay)
            delay = min(2.0, delay * 2)
        for older in [generation for generation in generations if generation < self.generation]:
            self._delete(older)  # crashed holders' generations
        self._stop.clear()
        self._renewal = threading.Thread(target=self._renew, name=f"renew {self.prefix}", daemon=True)
        self._renewal.start()
        return self

    def _tags(self, expires_at: float) -> dict[str, str]:
        return {"owner": self.owner, "expires_at": f"{expires_at:.3f}"}

    def _ours(self) -> bool:
        generations = self.generations()
        tags = generations.get(self.generation, {})
        return (self.generation is not None and max(generations, default=0) == self.generation
                and tags.get("owner") == self.owner and float(tags.get("expires_at", 0)) > time.time())

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_every_s):
            with self._guard:
                try:
                    if not self._ours():  # expired and taken over, or removed: it never becomes ours again
                        self.generation = None
                        return
                    self.client.set_registered_model_tag(f"{self.prefix}{self.generation}", "expires_at",
                                                         f"{time.time() + self.ttl_s:.3f}")
                except Exception as error:  # noqa: BLE001 - the registry failing past its client's retries
                    # try again at the next renewal: stopping here would let the lease lapse while its holder works
                    log.warning("could not renew %s %s (%s); trying again in %.0f s", self.name, self.where,
                                type(error).__name__, self.renew_every_s)

    def ensure_held(self) -> None:
        """Raise LeaseLost unless our generation is still the highest, ours and unexpired."""
        with self._guard:
            if not self._ours():
                raise LeaseLost(
                    f"{self.name} ({self.where}) is no longer held by {self.owner} (it expired and was taken over, or "
                    f"was removed){': ' + self.on_loss if self.on_loss else ''}"
                )

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._renewal.join()
        with self._guard:
            generation, self.generation = self.generation, None
        if generation is not None and self.generations().get(generation, {}).get("owner") == self.owner:
            self._delete(generation)

    def _delete(self, generation: int) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.delete_registered_model(f"{self.prefix}{generation}")
        except MlflowException:
            pass  # removed by another holder meanwhile


def pinned_requirements() -> list[str]:
    """What the pyfunc imports, at the versions that trained and logged it: a served model must not meet another
    torch or safetensors than the one its weights were checked against."""
    from importlib.metadata import version

    return [f"{package}=={version(package)}" for package in ("torch", "safetensors", "numpy", "mlflow")]


def input_example(card: ModelCard) -> np.ndarray:
    """One clip in the stored format the pyfunc takes (uint8 `[1, T, S, S, 3]`, S the stored square side): black
    frames, which say the shape and type without shipping anyone's video with the model."""
    return np.zeros((1, card.frames, card.short_side, card.short_side, 3), dtype=np.uint8)


def log_model(
    run_id: str,
    weights_path: str,
    card: ModelCard,
    tracking_uri: str,
    register_as: str | None = None,
    version_tags: dict | None = None,
    description: str | None = None,
):
    """Logs the model into run `run_id`; registers a new version of `register_as` when given, with `description`.

    Returns (model_uri, registered version number or None)."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    if register_as:
        done = [v for v in model_versions(client, register_as) if v.run_id == run_id]
        if done:  # a re-run after a completed registration registers nothing new
            return done[0].source, int(done[0].version)
    signature = ModelSignature(
        # unnamed tensors: predict() receives the clip array itself, not a {name: array} dict
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, card.frames, card.short_side, card.short_side, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, card.num_classes))]),
    )
    with tempfile.TemporaryDirectory() as directory:
        config_path = os.path.join(directory, model.package.CONFIG_FILE)
        with open(config_path, "w", encoding="utf-8") as handle:
            handle.write(card.to_json())
        # MLflow refuses to resume a run outside the process's active experiment: make the run's own one active
        mlflow.set_experiment(experiment_id=client.get_run(run_id).info.experiment_id)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=PYFUNC_SOURCE,
                artifacts={"weights": weights_path, "config": config_path},
                code_paths=[MODEL_PACKAGE_DIR],
                signature=signature,
                input_example=input_example(card),
                pip_requirements=pinned_requirements(),
            )
    version = None
    if register_as:
        registered = mlflow.register_model(info.model_uri, register_as, tags=version_tags or {})
        version = int(registered.version)
        if description:
            client.update_model_version(register_as, registered.version, description=description)
    return info.model_uri, version
