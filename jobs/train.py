"""`uniformer train`: Ray Train TorchTrainer over a clip dataset version, tracked and registered in MLflow.

The driver pins the dataset version, opens (or reopens) the MLflow run, and starts the trainer; the workers run
`jobs.training.worker.train_loop_per_worker`. Re-running the same command against the same storage resumes the same
Ray Train run (and the same MLflow run) from its last checkpoint; a finished run only redoes what is missing, such
as a registration that failed because MLflow was unreachable.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from jobs.config import absolute_paths, to_yaml
from jobs.console import init_ray
from jobs.credentials import MASK, carries_credentials, mlflow_env_for_workers, redact, redacted_stdout
from jobs.exitcodes import OptionError
from jobs.options import RegisterConfig
from jobs.registry import experiment_id, probe_tracking_server, tracking_uri
from jobs.training.checkpoint import PROGRESS as PROGRESS_FILE
from jobs.training.checkpoint import WEIGHTS
from jobs.training.config import CONFIG_ARTIFACT, TrainConfig
from jobs.training.progress import DriverConsole
from model.package import ModelCard
from pipeline import load_manifest, parse_dataset_ref, parse_uri
from pipeline.dataset.runs import reading_versions
from pipeline.dataset.versions import ManifestError, list_manifest_versions
from pipeline.lease import Lease, LeaseHeld
from pipeline.manifest import content_fingerprint
from pipeline.storage import Storage

SELECT_METRIC = "val_accuracy"  # what --select best ranks checkpoints by (validation top-1)
RUN_RECORD = "uniformer_run.json"
RUN_LOCK = "uniformer_run.lock"
RUN_LOCK_TTL_S = 120.0  # renewed every third of it while the command runs

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_name: str
    mlflow_run_id: str
    checkpoint: str
    metrics: dict
    model_uri: str | None = None
    registered_version: int | None = None





def pin_dataset_version(ref: str, endpoint_url: str | None, option: str = "--data") -> tuple[str, object]:
    """`DST` or `DST@latest` -> `DST@<n>`, so that restarts and re-runs read the same data. A dataset or version that
    is not there, or one without labels, is an OptionError of `option`."""
    dst, version = parse_dataset_ref(ref)
    versions = list_manifest_versions(parse_uri(dst), Storage(endpoint_url))
    if not versions:
        raise OptionError(option, f"no clip dataset at {redact(dst)} (no manifest under it): ingest videos there "
                          "first, or give the dataset's own folder or URI")
    if version is not None and version not in versions:
        raise OptionError(option, f"{redact(dst)} has no version {version} (it has {versions[0]} to {versions[-1]})")
    manifest = load_manifest(dst, version, endpoint_url=endpoint_url)
    if manifest.labels == "none" or not manifest.class_map:
        raise OptionError(option, f"dataset {redact(ref)} has no labels: training needs a labelled dataset (ingest "
                          "with --labels or --labels-from-dirs)")
    return f"{dst}@{manifest.version}", manifest


def reading_datasets(refs: Iterable[str], endpoint_url: str | None, job: str):
    """Records, for as long as the `with` body runs, that `job` reads the pinned dataset versions `refs` (`DST@V`),
    so that `uniformer gc` keeps them (`pipeline.dataset.runs.reading_versions`)."""
    reads = [(parse_uri(dst), version) for dst, version in map(parse_dataset_ref, refs)]
    return reading_versions(Storage(endpoint_url), reads, job, ManifestError)


def _storage_filesystem(storage_uri: str, endpoint_url: str | None):
    location = parse_uri(storage_uri)
    if location.scheme != "s3":
        os.makedirs(location.path, exist_ok=True)
        return location.path, None
    return f"{location.bucket}/{location.path}".rstrip("/"), Storage(endpoint_url).arrow_filesystem(location)


def _read_run_record(filesystem, path: str) -> dict | None:
    import pyarrow.fs as pafs

    fs = filesystem or pafs.LocalFileSystem()
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as handle:
        return json.loads(handle.read().decode("utf-8"))


def _write_run_record(filesystem, path: str, record: dict) -> None:
    import pyarrow.fs as pafs

    fs = filesystem or pafs.LocalFileSystem()
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as handle:
        handle.write(json.dumps(record, indent=1).encode("utf-8"))


def open_mlflow_run(cfg: TrainConfig, uri: str, record_path: str, filesystem, manifest) -> str:
    """The MLflow run of this training run: created once, then found again through the run record."""
    import mlflow
    from mlflow.entities import Param
    from mlflow.tracking.context.registry import resolve_tags

    client = mlflow.MlflowClient(uri)
    record = _read_run_record(filesystem, record_path)
    if record:  # resumed: the run trains again, whatever its last command left it as
        client.update_run(record["mlflow_run_id"], status="RUNNING")
        return record["mlflow_run_id"]
    # who started it, from what (the `uniformer` entry point, the git commit where there is one): what
    # mlflow.start_run records, which MlflowClient.create_run leaves out
    tags = resolve_tags({"ray_train_run": cfg.name, "uniformer.entry_point": "train"})
    run = client.create_run(experiment_id(client, cfg.experiment), run_name=cfg.name, tags=tags)
    recorded = cfg.redacted()
    params = [Param(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v)) for k, v in recorded.items()]
    client.log_batch(run.info.run_id, params=params)
    client.log_text(run.info.run_id, to_yaml(recorded), CONFIG_ARTIFACT)
    client.set_tag(run.info.run_id, "dataset", cfg.data)
    client.set_tag(run.info.run_id, "dataset_version", str(manifest.version))
    client.set_tag(run.info.run_id, "dataset_fingerprint", content_fingerprint(manifest))
    _write_run_record(filesystem, record_path, {"mlflow_run_id": run.info.run_id, "run_name": cfg.name})
    return run.info.run_id


def log_dataset_inputs(uri: str, run_id: str, plans: tuple) -> None:
    """The training and validation clips as the run's MLflow dataset inputs; MLflow keeps one input per dataset,
    so a resumed run logs nothing twice."""
    import mlflow

    from jobs.training.tracking import dataset_inputs

    train, val = plans
    mlflow.MlflowClient(uri).log_inputs(run_id, datasets=dataset_inputs({"training": train, "validation": val}))


def build_trainer(cfg: TrainConfig, uri: str, run_id: str, plans: tuple, progress_board=None):
    """`plans`: the (training, validation) epoch plans the driver cut, handed to the workers."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from jobs.training.data import plan_units
    from jobs.training.worker import train_loop_per_worker

    units = ray.put(plan_units(*plans))

    storage_path, filesystem = _storage_filesystem(cfg.storage, cfg.endpoint_url)
    return TorchTrainer(
        train_loop_per_worker,
        # Ray sends the loop config to every worker and shows it with the run: it holds no credential. A tracking URI
        # with one stays behind, and the workers' MLflow client reads MLFLOW_TRACKING_URI from their own environment.
        train_loop_config={
            "config": cfg.redacted(),
            "mlflow_run_id": run_id,
            "tracking_uri": None if carries_credentials(uri) else uri,
            "mlflow_env": mlflow_env_for_workers(),
            "plan_units": units,
            "progress_board": progress_board,  # rank 0 posts its progress there (jobs.training.progress)
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker},
            placement_strategy=cfg.placement_strategy,
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            # with --select best, Ray keeps the best epoch-end checkpoints by validation top-1 (and always the latest)
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints,
                checkpoint_score_attribute=SELECT_METRIC if cfg.select == "best" else None,
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )


def ensure_ray(cfg: TrainConfig) -> None:
    if os.environ.get("RAY_ADDRESS"):
        init_ray()
        return
    # Locally, train workers each hold cpus_per_worker; leave room for the Ray Data readers feeding them.
    needed = int(cfg.workers * cfg.cpus_per_worker) + 1
    init_ray(num_cpus=max(os.cpu_count() or 1, needed), include_dashboard=False)


def run_train(cfg: TrainConfig) -> TrainResult:
    from jobs.training.data import epoch_plans

    absolute_paths(cfg)  # the workers see the config, not this process's working directory
    if cfg.pretrained and not cfg.pretrained.startswith("models:/") and not os.path.isfile(cfg.pretrained):
        raise OptionError("--pretrained", f"no file {cfg.pretrained}: give a checkpoint file (`uniformer weights "
                          "inspect FILE` tells whether it loads) or a registered model models:/NAME/VERSION")
    cfg.data, manifest = pin_dataset_version(cfg.data, cfg.endpoint_url)
    check_class_map(cfg, manifest.class_names)
    check_flip_pairs(cfg, manifest.class_names)
    if cfg.val_data:
        cfg.val_data, _ = pin_dataset_version(cfg.val_data, cfg.endpoint_url, "--val")
    uri = tracking_uri(cfg.tracking_uri)
    if carries_credentials(uri) and os.environ.get("MLFLOW_TRACKING_URI") != uri:
        raise ValueError(
            f"the MLflow tracking URI {redact(uri)} holds credentials, which never travel to Ray workers: set it as "
            "MLFLOW_TRACKING_URI in the environment of the driver and of every worker, or keep the credentials in "
            "~/.mlflow/credentials, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
            "MLFLOW_TRACKING_TOKEN), there"
        )
    cfg.tracking_uri = uri
    probe_tracking_server(uri)  # before Ray starts, not after minutes of the client's retries
    # the workers read the shards for as long as this driver lives
    read = [cfg.data, cfg.val_data] if cfg.val_data else [cfg.data]
    with exclusive_run(cfg), reading_datasets(read, cfg.endpoint_url, "train"):
        ensure_ray(cfg)
        storage_path, filesystem = _storage_filesystem(cfg.storage, cfg.endpoint_url)
        record_path = f"{storage_path}/{cfg.name}/{RUN_RECORD}"
        # cut once here (and fail here on a missing or altered shard), not in every worker
        plans = epoch_plans(cfg, manifest, cfg.workers)
        run_id = open_mlflow_run(cfg, uri, record_path, filesystem, manifest)
        with run_status(uri, run_id):
            log_dataset_inputs(uri, run_id, plans)
            result = fit(cfg, run_id, lambda board: build_trainer(cfg, uri, run_id, plans, board))
            log.info("finished %s, checkpoint %s", cfg.name, result.checkpoint.path)
            outcome = TrainResult(cfg.name, run_id, result.checkpoint.path, dict(result.metrics or {}))
            outcome.model_uri, outcome.registered_version = finish_registration(cfg, manifest, uri, run_id)
            return outcome


def check_class_map(cfg: TrainConfig, class_names: list[str]) -> None:
    """The class map file, read here as the workers will: an OptionError, in seconds, when it cannot be used."""
    from jobs.training.network import read_class_map

    if not cfg.pretrained_class_map:
        return
    if not cfg.pretrained:
        raise OptionError("--pretrained-class-map", "maps the rows of a pretrained head: give --pretrained too")
    try:
        unknown = sorted(set(read_class_map(cfg.pretrained_class_map)) - set(class_names))
    except ValueError as error:
        raise OptionError("--pretrained-class-map", str(error)) from None
    if unknown:
        raise OptionError("--pretrained-class-map",
                          f"names classes the dataset does not have: {', '.join(unknown[:10])}")


def check_flip_pairs(cfg: TrainConfig, class_names: list[str]) -> None:
    """The flip pairs file, read here as the workers will: an OptionError, in seconds, when it cannot be used."""
    from jobs.training.network import flip_swap, read_flip_pairs

    if not cfg.flip_pairs:
        return
    if not cfg.hflip:
        raise OptionError("--flip-pairs", "swaps the labels of horizontally flipped clips: it needs --hflip")
    try:
        flip_swap(read_flip_pairs(cfg.flip_pairs), class_names)
    except ValueError as error:
        raise OptionError("--flip-pairs", str(error)) from None


class TrainingFailed(RuntimeError):
    """The workers' training failed for good (Ray Train's restarts spent): the message says what failed where."""


def fit(cfg: TrainConfig, run_id: str, make_trainer):
    """The trainer `make_trainer(progress_board)` fitted under the driver's progress console; a failure is told in one
    paragraph, not as Ray's traceback."""
    from ray.train import TrainingFailedError

    try:
        with DriverConsole() as console:
            result = make_trainer(console.board).fit()
    except TrainingFailedError as error:
        failures = worker_failures(error).rstrip(".")
        raise TrainingFailed(
            f"training run {cfg.name} (MLflow run {run_id}) failed: {failures}. Checkpoints written "
            f"before it are kept in {redact(cfg.storage)}: running the same command again resumes from the last one"
        ) from None
    if result.checkpoint is None:
        raise TrainingFailed(f"training run {cfg.name} produced no checkpoint: {result.error}")
    return result


def worker_failures(error: Exception) -> str:
    """Ray Train's failure as one line per failed worker: `rank N: ErrorType: its first line`, credentials masked."""
    failures = getattr(error, "worker_failures", None) or {-1: getattr(error, "controller_failure", error)}
    lines = []
    for rank, failure in sorted(failures.items()):
        cause = getattr(failure, "cause", None) or failure  # a RayTaskError carries the worker's own exception
        text = next((line.strip() for line in str(cause).splitlines() if line.strip()), "")
        where = f"rank {rank}: " if rank >= 0 else "Ray Train's controller: "
        lines.append(f"{where}{type(cause).__name__}" + (f": {redact(text)}" if text else ""))
    return "; ".join(lines)


@contextlib.contextmanager
def run_status(uri: str, run_id: str) -> Iterator[None]:
    """Ends the MLflow run as FINISHED when the body returns, FAILED when it raises (KILLED on Ctrl-C), so that no run
    of a command that stopped stays RUNNING. Not reaching MLflow to say so is a warning: the body's error matters."""
    import mlflow

    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            with redacted_stdout():
                mlflow.MlflowClient(uri).set_terminated(run_id, status)
        except Exception as error:  # noqa: BLE001 - MLflow's and its HTTP stack's errors alike
            log.warning("could not mark MLflow run %s %s at %s: %s", run_id, status, redact(uri),
                        redact(f"{type(error).__name__}: {error}"))


class RunInProgress(RuntimeError):
    """Another command is training the same run: the same options into the same storage."""


class RunLock(Lease):
    name, contender = "run lock", "another train command"


@contextlib.contextmanager
def exclusive_run(cfg: TrainConfig) -> Iterator[None]:
    """Holds run `cfg.name`'s lock in its run directory while the body trains and registers it. Two commands with the
    same options and storage make the same run and would resume and write one run directory (and open two MLflow
    runs for it); the second fails here at once. A killed command's lock lapses RUN_LOCK_TTL_S after its last
    renewal and is then taken over."""
    storage, folder = Storage(cfg.endpoint_url), parse_uri(cfg.storage).join(cfg.name)
    storage.check_conditional_writes(folder)  # the lock is only exclusive on a store that honours them
    lock = RunLock(storage, folder.join(RUN_LOCK), ttl_s=RUN_LOCK_TTL_S, wait_s=0)
    try:
        lock.__enter__()
    except LeaseHeld as held:
        lapses = f" at {time.strftime('%H:%M:%S UTC', time.gmtime(held.expires_at))}" if held.expires_at else ""
        raise RunInProgress(
            f"training run {cfg.name} is already being trained into {redact(cfg.storage)} by another command "
            f"({held.owner}), which holds {redact(lock.location.uri)}. The same options and storage make the same run: "
            "wait for that command to finish (running this one again afterwards resumes or re-registers the run), or "
            "give this one another --run-name (or other options) to train a separate run. If that command was "
            f"killed, its lock lapses{lapses}, {RUN_LOCK_TTL_S:.0f} s after its last renewal; run this again then."
        ) from None
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def model_card(cfg: TrainConfig, manifest, metrics: dict, run_id: str) -> ModelCard:
    from jobs.training.network import model_overrides

    return ModelCard(
        model=cfg.model,
        num_classes=len(manifest.class_map),
        overrides=model_overrides(cfg, manifest.sampling.frames),
        class_names=manifest.class_names,
        frames=manifest.sampling.frames,
        crop_size=manifest.sampling.size,
        short_side=manifest.sampling.short_side,
        extra={
            "dataset": cfg.data,
            "dataset_fingerprint": content_fingerprint(manifest),
            "mlflow_run_id": run_id,
            "val_accuracy": metrics.get("val_accuracy"),
        },
    )


def finish_registration(cfg: TrainConfig, manifest, uri: str, run_id: str):
    """Logs the selected checkpoint's model (`cfg.select`: the best validation top-1 or the last) to the run and
    registers it, recording which; safe to repeat (`uniformer register`)."""
    import mlflow
    from botocore.exceptions import BotoCoreError, ClientError
    from mlflow.exceptions import MlflowException

    from jobs.registry import log_model

    (_, final), (chosen_progress, chosen) = select_checkpoints(cfg.storage, cfg.name, cfg.select, cfg.endpoint_url)
    metrics = chosen_progress.get("metrics") or {}
    with chosen.as_directory() as directory:
        card = model_card(cfg, manifest, metrics, run_id)
        with tempfile.TemporaryDirectory() as staging:
            weights = os.path.join(staging, WEIGHTS)
            with open(os.path.join(directory, WEIGHTS), "rb") as src, open(weights, "wb") as dst:
                dst.write(src.read())
            tags = {
                "dataset": cfg.data,
                "dataset_version": str(manifest.version),
                "dataset_fingerprint": content_fingerprint(manifest),
                "checkpoint_selected": cfg.select,
                "checkpoint_epoch": str(chosen_progress["epoch"] - 1),  # the epoch whose end it is
                "checkpoint_global_step": str(chosen_progress["global_step"]),
                **{k: str(v) for k, v in metrics.items()},
            }
            try:
                with redacted_stdout():
                    run = mlflow.MlflowClient(uri).get_run(run_id)
                    description = version_description(cfg, manifest, chosen_progress, run)
                    return log_model(run_id, weights, card, uri, cfg.register_as, version_tags=tags,
                                     description=description)
            except (MlflowException, OSError, BotoCoreError, ClientError) as exc:
                # what reaching MLflow and its artifact store raises (requests' errors are OSErrors), which a re-run
                # mends; anything else is a bug, raised as itself. Not chained: MLflow's own message names the
                # request URL, the tracking URI's password included
                raise RuntimeError(
                    f"training finished and its checkpoint is safe at {final.path}, but logging the model to "
                    f"MLflow at {redact(uri)} failed ({type(exc).__name__}: {redact(str(exc))}). Re-run the same "
                    f"command, or `uniformer register --run {cfg.name} --storage {redact(cfg.storage)}`, once MLflow "
                    "is reachable."
                ) from None


def version_description(cfg: TrainConfig, manifest, progress: dict, run) -> str:
    """What a registered version was trained on and how it scored, for the registry's description field: the
    datasets from the MLflow run's dataset inputs, the figures from the checkpoint's validation."""
    datasets = []
    for dataset_input in run.inputs.dataset_inputs:
        tags = {tag.key: tag.value for tag in dataset_input.tags}
        datasets.append(f"{tags.get('mlflow.data.context', 'input')} {dataset_input.dataset.name}: "
                        f"{tags.get('clips', '?')} clips")
    metrics = progress.get("metrics") or {}
    figures = ", ".join(
        f"{label} {metrics[key]:.4f}" for key, label in (
            ("val_accuracy", "top-1"), ("val_top5_accuracy", "top-5"), ("val_mean_class_accuracy", "mean-class"),
            ("val_loss", "loss"),
        ) if key in metrics
    )
    return (
        f"{cfg.model} ({len(manifest.class_map)} classes) trained on {cfg.data}, content fingerprint "
        f"{content_fingerprint(manifest)}; {'; '.join(datasets) or 'datasets not recorded'}. Registered checkpoint: "
        f"{cfg.select} (epoch {progress['epoch']} of {cfg.epochs}, step {progress['global_step']}). "
        f"Validation: {figures or 'none'}. MLflow run {run.info.run_id}."
    )


def run_checkpoints(storage: str, run_name: str, endpoint_url: str | None = None) -> list[tuple[dict, object]]:
    """Every checkpoint of a run in `storage` with its progress record, oldest first, found without Ray."""
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    storage_path, filesystem = _storage_filesystem(storage, endpoint_url)
    fs = filesystem or pafs.LocalFileSystem()
    found = []
    for entry in fs.get_file_info(pafs.FileSelector(f"{storage_path}/{run_name}", allow_not_found=True)):
        if entry.type != pafs.FileType.Directory or not entry.path.rsplit("/", 1)[-1].startswith("checkpoint_"):
            continue
        with fs.open_input_stream(f"{entry.path}/{PROGRESS_FILE}") as handle:
            progress = json.loads(handle.read().decode("utf-8"))
        found.append((progress, Checkpoint(entry.path, filesystem=filesystem)))
    return sorted(found, key=lambda item: item[0]["global_step"])


def final_checkpoint(storage: str, run_name: str, endpoint_url: str | None = None):
    """(progress, checkpoint) of the finished checkpoint of a run in `storage`."""
    finished = [item for item in run_checkpoints(storage, run_name, endpoint_url) if item[0]["finished"]]
    if not finished:
        raise FileNotFoundError(f"no finished checkpoint of run {run_name} under {redact(storage)}: train it first")
    return finished[-1]


def select_checkpoints(storage: str, run_name: str, select: str, endpoint_url: str | None = None):
    """(the finished checkpoint, the one to register) as (progress, checkpoint) pairs: the same for `last`; for
    `best`, the kept epoch-end checkpoint with the highest validation top-1 (the later one on a tie)."""
    final = final_checkpoint(storage, run_name, endpoint_url)
    if select == "last":
        return final, final
    scored = [
        item for item in run_checkpoints(storage, run_name, endpoint_url)
        if math.isfinite((item[0].get("metrics") or {}).get(SELECT_METRIC, math.nan))
    ]
    return final, max(scored, key=lambda item: item[0]["metrics"][SELECT_METRIC], default=final)


def register_run(config: RegisterConfig) -> tuple[str, int | None]:
    """Logs and registers the final model of a finished run whose end-of-run registration failed."""
    progress, _ = final_checkpoint(config.storage, config.run, config.endpoint_url)
    cfg = TrainConfig.from_dict(progress["config"])
    cfg.storage = config.storage  # where the checkpoints are now (the record may name the address masked)
    if config.register_as:
        cfg.register_as = config.register_as
    manifest = load_manifest(cfg.data, endpoint_url=cfg.endpoint_url)
    # a URI that held credentials was recorded masked: then only `tracking` or MLFLOW_TRACKING_URI can stand for it
    recorded = None if cfg.tracking_uri and MASK in cfg.tracking_uri else cfg.tracking_uri
    uri = tracking_uri(config.tracking_uri or recorded)
    probe_tracking_server(uri)
    return finish_registration(cfg, manifest, uri, progress["mlflow_run_id"])
