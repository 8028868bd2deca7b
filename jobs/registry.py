"""Everything the jobs ask of MLflow, in one place: the tracking URI, the tracking server's probe, experiments,
registered versions, leases kept in the registry, logging and registering a trained model, resolving a `--model`
reference to a package, and the champion alias.

Which model scores is a `models:/` reference resolved once through the registry, or a local package folder:

    models:/NAME@ALIAS     the version the alias points to when the run starts (a later alias move changes nothing;
                           `uniformer serve` alone follows it, through `alias_version`)
    models:/NAME/VERSION   a registered version
    models:/m-ID           a logged model (MLflow 3), registered or not
    PATH                   a folder holding model.safetensors + model_config.json (what `model.save_package` writes)

Models are logged by `log_model` as a pyfunc whose artifacts are the two package files, so from a registered version
or a logged model only `artifacts/model.safetensors` and `artifacts/model_config.json` are downloaded, from the
version's pinned artifact location (never through the alias again). Nothing is unpickled and the pyfunc wrapper is
not imported: `model.load_package` rebuilds the network from the config and loads the safetensors weights.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import tempfile
import threading
import time
import uuid
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import model
import pipeline
from jobs.config import absolute_location
from jobs.credentials import redact
from model.package import CONFIG_FILE, WEIGHTS_FILE, ModelCard
from pipeline.lease import LeaseHeld, LeaseLost

if TYPE_CHECKING:
    import pandas as pd

PYFUNC_SOURCE = os.path.join(os.path.dirname(__file__), "serving", "pyfunc_model.py")
MODEL_PACKAGE_DIR = os.path.dirname(model.__file__)
# What the pyfunc imports of this project (the model, the scoring path's decoding and views, storage), shipped with
# it so that a served model needs only its pinned requirements.
PYFUNC_CODE_DIRS = (MODEL_PACKAGE_DIR, os.path.dirname(os.path.abspath(__file__)), os.path.dirname(pipeline.__file__))

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


# The distributions the pyfunc imports when it serves: the model (torch, safetensors, numpy), the scoring path's
# decoding (decord, and av for the headers it checks first), its rows (pyarrow, pandas), the s3:// store (boto3), the
# project's option files (PyYAML), and MLflow itself.
SERVED_DISTRIBUTIONS = (
    "torch", "safetensors", "numpy", "mlflow", "pyarrow", "pandas", "decord", "av", "boto3", "PyYAML",
)


def pinned_requirements() -> list[str]:
    """What the pyfunc imports, at the versions that trained and logged it: a served model must not meet another
    torch or safetensors than the one its weights were checked against, nor another decoder than score's."""
    from importlib.metadata import version

    return [f"{package}=={version(package)}" for package in SERVED_DISTRIBUTIONS]


def input_example() -> tuple[pd.DataFrame, dict]:
    """One short synthetic video's bytes in the `video` column the pyfunc takes (a few KB: 8 frames of 32 x 32),
    which says the input without shipping anyone's video with the model, and the params it is predicted with: one
    view. MLflow predicts the example when it logs the model, in the logging process; at the default 4x3 views that
    was 12 forwards, about half a minute of a B/16 registration on 2 CPU cores."""
    import pandas as pd

    from pipeline.synthetic import write_motion_video

    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "example.mp4")
        write_motion_video(path, "right", size=(32, 32), num_frames=8)
        return pd.DataFrame({"video": [Path(path).read_bytes()]}), {"views": "1x1"}


def pyfunc_signature():
    """No input schema, so that both the video rows and clips arrays of any H x W reach the pyfunc (an input schema
    is either columns or one tensor shape); the output's columns; the parameters a call may give."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    from jobs.options import ScoreConfig
    from jobs.serving import DEFAULT_TOP_K

    return ModelSignature(
        inputs=None,
        outputs=Schema([
            ColSpec(Array("long"), "top_k_ids", required=False),
            ColSpec(Array("string"), "top_k_names", required=False),
            ColSpec(Array("float"), "top_k_probs", required=False),
            ColSpec(Array("float"), "probs", required=False),
            ColSpec("string", "error", required=False),
        ]),
        params=ParamSchema([
            ParamSpec("top_k", "long", DEFAULT_TOP_K),
            ParamSpec("full_probs", "boolean", False),
            ParamSpec("views", "string", ScoreConfig.views),
        ]),
    )


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

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    if register_as:
        done = [v for v in model_versions(client, register_as) if v.run_id == run_id]
        if done:  # a re-run after a completed registration registers nothing new
            return done[0].source, int(done[0].version)
    with tempfile.TemporaryDirectory() as directory:
        config_path = os.path.join(directory, model.package.CONFIG_FILE)
        with open(config_path, "w", encoding="utf-8") as handle:
            handle.write(card.to_json())
        # MLflow refuses to resume a run outside the process's active experiment: make the run's own one active
        mlflow.set_experiment(experiment_id=client.get_run(run_id).info.experiment_id)
        with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
            # MLflow's own input-example code (`df.columns == range(...)`) trips a pandas deprecation at every
            # registration; it says nothing about this model
            warnings.filterwarnings("ignore", "Operation with range is deprecated", module="mlflow.models.utils")
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=PYFUNC_SOURCE,
                artifacts={"weights": weights_path, "config": config_path},
                code_paths=list(PYFUNC_CODE_DIRS),
                signature=pyfunc_signature(),
                input_example=input_example(),
                pip_requirements=pinned_requirements(),
            )
    version = None
    if register_as:
        registered = mlflow.register_model(info.model_uri, register_as, tags=version_tags or {})
        version = int(registered.version)
        if description:
            client.update_model_version(register_as, registered.version, description=description)
    return info.model_uri, version


# ---- the tracking URI ------------------------------------------------------------------------------------------------


DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def tracking_uri(explicit: str | None = None) -> str:
    # workers run in other working directories: a sqlite file is named by its absolute path
    return absolute_location(explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)


# ---- which model: a --model reference resolved to a package ---------------------------------------------------------


_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")
_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")
_LOGGED = re.compile(r"^models:/(?P<model_id>m-[0-9a-f]+)$")
# Where log_model puts the package inside a logged model's artifacts.
_PACKAGE_DIR = "artifacts"


class ModelReferenceError(ValueError):
    """The --model reference cannot be resolved to a UniFormerV2 package."""


@dataclass(frozen=True)
class ModelIdentity:
    """The model as resolved at the start of a run; every prediction row carries it."""

    uri: str  # the reference as given
    name: str  # registered model name, logged model name, or the local folder's name
    version: int | None  # registered version; None for an unregistered logged model or a local folder
    alias: str | None  # the alias the reference named, if any
    run_id: str | None  # MLflow run that logged the model
    model_id: str | None  # MLflow logged-model id (m-...)
    package_sha256: str  # digest of weights + config: "the same model" means the same package

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        if self.version is not None:
            where = f"{self.name} version {self.version}" + (f" (alias {self.alias})" if self.alias else "")
        elif self.model_id:
            where = f"logged model {self.model_id}"
        else:
            where = f"local package {self.uri}"
        return f"{where}, package {self.package_sha256[:12]}"


@dataclass(frozen=True)
class ResolvedModel:
    identity: ModelIdentity
    card: ModelCard
    weights_path: str
    config_path: str


def package_sha256(weights_path: str, config_path: str) -> str:
    digest = hashlib.sha256()
    for path in (config_path, weights_path):
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def resolve_model(reference: str, download_dir: str, tracking_uri: str | None = None) -> ResolvedModel:
    """Pin `reference` to one model and fetch its package files into `download_dir` (for a local folder, the files
    are used in place)."""
    if not reference.startswith("models:/"):
        return _local(reference)
    import mlflow
    from mlflow.exceptions import MlflowException

    from jobs.registry import probe_tracking_server

    probe_tracking_server(tracking_uri or mlflow.get_tracking_uri())
    client = mlflow.MlflowClient(tracking_uri)
    try:
        if match := _LOGGED.match(reference):
            logged = client.get_logged_model(match.group("model_id"))
            root, name, version, alias = logged.artifact_location, logged.name, None, None
            run_id, model_id = logged.source_run_id, logged.model_id
        else:
            if match := _ALIAS.match(reference):
                found = client.get_model_version_by_alias(match.group("name"), match.group("alias"))
                alias = match.group("alias")
            elif match := _VERSION.match(reference):
                found = client.get_model_version(match.group("name"), match.group("version"))
                alias = None
            else:
                raise ModelReferenceError(
                    f"cannot read model reference {reference!r}: use models:/NAME@ALIAS, models:/NAME/VERSION, "
                    "models:/m-ID or a local folder"
                )
            name, version, run_id = found.name, int(found.version), found.run_id
            model_id = getattr(found, "model_id", None) or _logged_model_id(found.source)
            # The version's own artifact location: fixed once the version exists, whatever the alias does later.
            root = client.get_model_version_download_uri(name, str(version))
    except MlflowException as error:
        raise ModelReferenceError(
            f"cannot resolve {reference!r} at {_where(tracking_uri)}: {redact(error.message)}"
        ) from None
    weights, config = _download(root, download_dir, reference, tracking_uri)
    identity = ModelIdentity(reference, name, version, alias, run_id, model_id, package_sha256(weights, config))
    return ResolvedModel(identity, _read_card(config, reference), weights, config)


def _local(path: str) -> ResolvedModel:
    folder = os.path.abspath(os.path.expanduser(path))
    weights, config = os.path.join(folder, WEIGHTS_FILE), os.path.join(folder, CONFIG_FILE)
    missing = [name for name, full in ((WEIGHTS_FILE, weights), (CONFIG_FILE, config)) if not os.path.isfile(full)]
    if missing:
        raise ModelReferenceError(
            f"{path} is not a model package folder (missing {', '.join(missing)}); or give models:/NAME@ALIAS, "
            "models:/NAME/VERSION or models:/m-ID"
        )
    identity = ModelIdentity(path, os.path.basename(folder), None, None, None, None, package_sha256(weights, config))
    return ResolvedModel(identity, _read_card(config, path), weights, config)


def _logged_model_id(source: str | None) -> str | None:
    match = _LOGGED.match(source or "")
    return match.group("model_id") if match else None


def _where(tracking_uri: str | None) -> str:
    import mlflow

    return f"tracking server {redact(tracking_uri or mlflow.get_tracking_uri())}"


def _download(root: str, download_dir: str, reference: str, tracking_uri: str | None) -> tuple[str, str]:
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    paths = []
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        try:
            paths.append(
                download_artifacts(
                    artifact_uri=f"{root.rstrip('/')}/{_PACKAGE_DIR}/{name}",
                    dst_path=download_dir,
                    tracking_uri=tracking_uri,
                )
            )
        except (MlflowException, OSError) as error:
            raise ModelReferenceError(
                f"{reference} has no {_PACKAGE_DIR}/{name} ({type(error).__name__}); only models logged by "
                "`uniformer train` (weights + config package) can be scored"
            ) from None
    return paths[0], paths[1]


def _read_card(config_path: str, reference: str) -> ModelCard:
    try:
        with open(config_path, encoding="utf-8") as handle:
            return ModelCard.from_json(handle.read())
    except (ValueError, TypeError) as error:
        raise ModelReferenceError(f"{reference}: {CONFIG_FILE} is not a model card ({error})") from None


# ---- the champion alias ----------------------------------------------------------------------------------------------


CHAMPION = "champion"


class ChampionUnknown(RuntimeError):
    """The registry could not say which version is champion: nothing may be promoted."""


def champion_version(client, model_name: str) -> int | None:
    """The version the champion alias points to; None only when the model or the alias does not exist yet."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    try:
        return alias_version(client, model_name, CHAMPION)
    except MlflowException as error:
        if error.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        # A timeout or a 5xx is not "no champion": the candidate would replace a better model unopposed.
        raise ChampionUnknown(
            f"cannot read the {CHAMPION} alias of {model_name} ({error.error_code}): nothing promoted; "
            f"{redact(error.message)}"
        ) from None


def alias_version(client, model_name: str, alias: str) -> int | None:
    """The version `alias` of `model_name` points to now; None when the alias is not set. MLflow's errors pass."""
    # The registered model's alias map rather than get_model_version_by_alias, which reports a missing alias as
    # INVALID_PARAMETER_VALUE, a code it shares with requests that are wrong in other ways.
    version = client.get_registered_model(model_name).aliases.get(alias)
    return int(version) if version is not None else None


def alias_of(reference: str) -> tuple[str, str] | None:
    """(name, alias) of a `models:/NAME@ALIAS` reference; None for any other."""
    match = _ALIAS.match(reference)
    return (match.group("name"), match.group("alias")) if match else None


def version_trained_on(client, model_name: str, fingerprint: str):
    """The registered version that already learnt from a dataset of this content fingerprint, whatever its version
    number: the champion, or a candidate the gate judged. A version registered by a retrain that stopped before its
    gate is not one: training again is what gates it."""
    champion = champion_version(client, model_name)
    for version in model_versions(client, model_name):
        judged = int(version.version) == champion or "gate.decision" in version.tags
        if judged and version.tags.get("dataset_fingerprint") == fingerprint:
            return version
    return None
