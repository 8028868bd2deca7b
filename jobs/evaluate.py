"""`uniformer evaluate`: a model on a labelled clip dataset version, measured as the field reports it.

The dataset's source videos are decoded into TEMPORALxSPATIAL views and scored by the batch-scoring pipeline
(`jobs.score.score_dataset`: decoding in CPU tasks, the model in an actor pool on the cluster's workers, GPUs with
`--gpu`), the same inference path production scoring and the retrain gate use; the dataset supplies each video's
label. Reported: top-1, top-5 and mean-class accuracy, loss (mean negative log of the view-averaged probability of
the true class), a per-class table and the most confused pairs, over the videos that decoded; videos that did not
decode are counted apart and named.

The figures are logged to MLflow as a run tagged with the dataset version, the views and the model, and, for a
registered version, kept as tags on the version itself, so that a champion is evaluated once per dataset version and
views (`cached_evaluation`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
from dataclasses import asdict, dataclass, field

import numpy as np

from jobs.credentials import redact, redacted_stdout
from jobs.metrics import per_class_report, scores_from_counts
from jobs.options import EvaluateConfig
from jobs.registry import ModelIdentity, resolve_model
from jobs.registry import tracking_uri as resolve_tracking_uri
from jobs.report import table_lines
from jobs.score import score_dataset
from jobs.train import reading_datasets
from pipeline import load_manifest, parse_dataset_ref, parse_uri
from pipeline.dataset.sources import read_sources
from pipeline.listing import SourceVideo
from pipeline.storage import Storage
from pipeline.views import parse_views

log = logging.getLogger(__name__)

METRICS = ("accuracy", "top5_accuracy", "mean_class_accuracy", "loss")


class EvaluationError(ValueError):
    """The dataset cannot be evaluated: no labels, no videos, or classes the model does not know."""


@dataclass
class Evaluation:
    dataset: str  # DST@VERSION
    views: str  # TEMPORALxSPATIAL
    model: dict  # ModelIdentity.to_dict()
    videos: int  # scored and counted
    failed: list[dict] = field(default_factory=list)  # {"video_id", "error_type", "message"}: not counted
    metrics: dict = field(default_factory=dict)  # accuracy (top-1), top5_accuracy, mean_class_accuracy, loss
    per_class: dict = field(default_factory=dict)  # jobs.metrics.per_class_report
    mlflow_run_id: str | None = None
    cached: bool = False  # the figures came from the model version's tags

    def to_dict(self) -> dict:
        return asdict(self)


def evaluation_key(dataset: str, views: str) -> str:
    """The model-version tag prefix of one (dataset version, views) evaluation."""
    return "eval/" + hashlib.sha256(f"{dataset}|{views}".encode()).hexdigest()[:16]


def dataset_videos(data: str, endpoint_url: str | None = None) -> tuple[str, list[SourceVideo], list[str]]:
    """(DST@VERSION, the version's source videos with their labels, its class names)."""
    dst, _ = parse_dataset_ref(data)
    manifest = load_manifest(data, endpoint_url=endpoint_url)
    if manifest.labels == "none" or not manifest.class_map:
        raise EvaluationError(f"dataset {data} has no labels: evaluation needs a labelled dataset")
    sources = read_sources(parse_uri(dst), manifest, Storage(endpoint_url)).to_dict()
    videos = [
        SourceVideo(entry["uri"], video_id, entry["size"], entry["etag"], entry["label_name"])
        for video_id, entry in sources.items()
        if entry["label_name"] is not None
    ]
    if not videos:
        raise EvaluationError(f"dataset {data} version {manifest.version} has no labelled videos")
    return f"{dst}@{manifest.version}", videos, manifest.class_names


def score_rows(rows: list[dict], labels: dict[str, str], class_names: list[str]) -> tuple[dict, dict, list[dict]]:
    """(metrics, per-class report, failed videos) from prediction rows with full `probs`."""
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted({labels[row["video_id"]] for row in rows} - set(index))
    if unknown:
        raise EvaluationError(f"the model does not know the dataset's classes {unknown[:10]}; it predicts "
                              f"{len(class_names)} classes")
    num_classes = len(class_names)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    top5 = min(5, num_classes)
    top5_correct, loss_sum, failed = 0, 0.0, []
    for row in rows:
        if row.get("error_type"):
            failed.append({"video_id": row["video_id"], "error_type": row["error_type"],
                           "message": row.get("error_message")})
            continue
        probs = np.asarray(row["probs"], dtype=np.float64)
        truth = index[labels[row["video_id"]]]
        confusion[truth, int(probs.argmax())] += 1
        top5_correct += int(truth in np.argsort(-probs, kind="stable")[:top5])
        loss_sum += -math.log(max(probs[truth], 1e-12))
    scores = scores_from_counts(confusion, top5_correct, loss_sum)
    return scores.metrics, per_class_report(confusion, class_names), failed


def evaluate_model(config: EvaluateConfig, *, use_cache: bool = False) -> Evaluation:
    """Evaluates `config.model` on dataset `config.data` (`DST[@VERSION]`) at `config.views`. Logs an MLflow run in
    `config.experiment` and keeps the figures on a registered version's tags. With `use_cache`, a registered version
    already evaluated on this dataset version and views is not evaluated again."""
    temporal, spatial = parse_views(config.views)
    views, tracking_uri, endpoint_url = f"{temporal}x{spatial}", config.tracking_uri, config.endpoint_url
    pinned = f"{parse_dataset_ref(config.data)[0]}@{load_manifest(config.data, endpoint_url=endpoint_url).version}"
    with reading_datasets([pinned], endpoint_url, "evaluate"), tempfile.TemporaryDirectory() as directory:
        dataset, videos, _ = dataset_videos(pinned, endpoint_url)
        resolved = resolve_model(config.model, directory, tracking_uri)
        if use_cache:
            cached = cached_evaluation(resolved.identity, dataset, views, tracking_uri)
            if cached is not None:
                return cached
        rows = (
            score_dataset(videos, resolved, views=views, top_k=min(5, resolved.card.num_classes), full_probs=True,
                          options=config.options, endpoint_url=endpoint_url)
            .select_columns(["video_id", "probs", "error_type", "error_message"])
            .take_all()
        )
    labels = {video.video_id: video.label_name for video in videos}
    metrics, per_class, failed = score_rows(rows, labels, resolved.card.class_names)
    evaluation = Evaluation(dataset, views, resolved.identity.to_dict(), len(rows) - len(failed), failed, metrics,
                            per_class)
    if config.experiment:
        evaluation.mlflow_run_id = log_evaluation(evaluation, resolved.identity, config.experiment, tracking_uri)
    return evaluation


def _client(tracking_uri: str | None):
    import mlflow

    return mlflow.MlflowClient(resolve_tracking_uri(tracking_uri))


def log_evaluation(evaluation: Evaluation, identity: ModelIdentity, experiment: str, tracking_uri: str | None) -> str:
    """An MLflow run with the figures, the per-class table and the failures; figures also on the model version."""
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException
    from mlflow.tracking.context.registry import resolve_tags

    from jobs.registry import experiment_id

    client = _client(tracking_uri)
    tags = resolve_tags({"dataset": evaluation.dataset, "views": evaluation.views, "model": identity.describe(),
                         "uniformer.entry_point": "evaluate"})
    if identity.version is not None:
        tags.update({"model_name": identity.name, "model_version": str(identity.version)})
    run_name = f"evaluate {identity.name} on {evaluation.dataset}"
    run = client.create_run(experiment_id(client, experiment), run_name=run_name, tags=tags)
    step_time = int(run.info.start_time)
    figures = {**evaluation.metrics, "videos": evaluation.videos, "failed_videos": len(evaluation.failed)}
    client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), step_time, 0) for k, v in figures.items()])
    client.log_dict(run.info.run_id, evaluation.per_class, "evaluation/per_class.json")
    if evaluation.failed:
        client.log_dict(run.info.run_id, evaluation.failed, "evaluation/failed_videos.json")
    with redacted_stdout():  # MLflow prints the run's address, user info included
        client.set_terminated(run.info.run_id)
    if identity.version is not None:
        key = evaluation_key(evaluation.dataset, evaluation.views)
        values = {"dataset": evaluation.dataset, "views": evaluation.views, "run_id": run.info.run_id,
                  "videos": str(evaluation.videos), **{name: repr(evaluation.metrics[name]) for name in METRICS}}
        try:
            for name, value in values.items():
                client.set_model_version_tag(identity.name, str(identity.version), f"{key}/{name}", value)
        except MlflowException as error:
            # two jobs evaluating the same version at once race on the same tags (the server refuses the second
            # insert); the figures stay in this run, and the cache is only a shortcut
            log.warning("could not keep the evaluation on %s version %s: %s", identity.name, identity.version,
                        redact(str(error)))
    return run.info.run_id


def cached_evaluation(identity: ModelIdentity, dataset: str, views: str, tracking_uri: str | None) -> Evaluation | None:
    """The figures kept on a registered version for this dataset version and views, if it was evaluated on them."""
    if identity.version is None:
        return None
    tags = _client(tracking_uri).get_model_version(identity.name, str(identity.version)).tags
    key = evaluation_key(dataset, views)
    if tags.get(f"{key}/dataset") != dataset or tags.get(f"{key}/views") != views:
        return None
    metrics = {name: float(tags[f"{key}/{name}"]) for name in METRICS}
    return Evaluation(dataset, views, identity.to_dict(), int(tags[f"{key}/videos"]), [], metrics, {},
                      tags[f"{key}/run_id"], cached=True)


def summary_lines(evaluation: Evaluation, worst: int = 10) -> list[str]:
    """The human summary: the figures, the classes with the lowest recall, the most confused pairs."""
    m = evaluation.metrics
    lines = [f"evaluated {evaluation.model['name']}"
             + (f" version {evaluation.model['version']}" if evaluation.model.get("version") is not None else "")
             + f" on {evaluation.dataset} at {evaluation.views} views" + (" (cached)" if evaluation.cached else "")]
    lines += table_lines([
        ("videos", str(evaluation.videos)),
        ("top-1 accuracy", f"{m['accuracy']:.4f}"),
        ("top-5 accuracy", f"{m['top5_accuracy']:.4f}"),
        ("mean class accuracy", f"{m['mean_class_accuracy']:.4f}"),
        ("loss", f"{m['loss']:.4f}"),
        ("videos not decoded", str(len(evaluation.failed))),
    ])
    classes = [c for c in evaluation.per_class.get("classes", []) if c["recall"] is not None]
    if classes:
        lines.append(f"lowest recall ({min(worst, len(classes))} of {len(classes)} classes):")
        lines += table_lines([(c["class"], f"{c['recall']:.3f} of {c['support']}")
                              for c in sorted(classes, key=lambda c: c["recall"])[:worst]])
    pairs = evaluation.per_class.get("most_confused", [])[:worst]
    if pairs:
        lines.append("most confused (true -> predicted):")
        lines += table_lines([(f"{p['true']} -> {p['predicted']}", str(p["count"])) for p in pairs])
    return lines


def to_json(evaluation: Evaluation) -> str:
    return json.dumps(evaluation.to_dict(), indent=1, default=str)
