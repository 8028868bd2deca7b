"""Which model scores: a `models:/` reference resolved once through the MLflow registry, or a local package folder.

    models:/NAME@ALIAS     the version the alias points to when the run starts (a later alias move changes nothing)
    models:/NAME/VERSION   a registered version
    models:/m-ID           a logged model (MLflow 3), registered or not
    PATH                   a folder holding model.safetensors + model_config.json (what `model.save_package` writes)

Models are logged by `jobs.serving.registry.log_model` as a pyfunc whose artifacts are the two package files, so
from a registered version or a logged model only `artifacts/model.safetensors` and `artifacts/model_config.json`
are downloaded, from the version's pinned artifact location (never through the alias again). Nothing is
unpickled and the pyfunc wrapper is not imported: `model.load_package` rebuilds the network from the config and
loads the safetensors weights.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict, dataclass

from jobs.credentials import redact
from model.package import CONFIG_FILE, WEIGHTS_FILE, ModelCard

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

    from jobs.serving.registry import probe_tracking_server

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
