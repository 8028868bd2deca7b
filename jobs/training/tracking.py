"""MLflow from rank 0 of the training function: metrics, system metrics, curves, confusion matrices and per-class
tables; and from the driver, the run's dataset inputs.

Step metrics are buffered and written after the checkpoint that covers them is reported. A worker group that
fails can still have written steps its last committed checkpoint does not cover; the resumed group recomputes
them exactly (the run is deterministic), so the tracker skips every step the run already has: each step is
logged once and the logged steps stay contiguous. An MLflow outage never stops training: what cannot be written
stays buffered and goes out with the next flush.

Per-epoch figures and tables are drawn and uploaded in a background thread: the other ranks wait in their next
collective for whatever rank 0 does at an epoch end, so that must not take seconds.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from jobs.metrics import per_class_report

log = logging.getLogger(__name__)

# A heatmap is readable up to a few tens of classes; past that the per-class table and the most confused pairs say
# more, and no figure grows with the class count.
HEATMAP_MAX_CLASSES = 40


class RunTracker:
    def __init__(self, tracking_uri: str, run_id: str, enabled: bool):
        self.enabled = enabled
        self.run_id = run_id
        self._pending: list = []
        self._logged_through: dict[str, int] = {}
        if enabled:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri)
            self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-plots")
            for key in ("train_loss", "val_accuracy"):
                history = self._try(self.client.get_metric_history, run_id, key) or []
                self._logged_through[key] = max((m.step for m in history), default=0)
            self._system = self._try(_start_system_metrics, run_id, tracking_uri)

    def step(self, step: int, **metrics: float) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        marker = "val_accuracy" if "val_accuracy" in metrics else "train_loss"
        if step <= self._logged_through.get(marker, 0):
            return  # logged by an earlier attempt of this run
        timestamp = _now_ms()
        self._pending.extend(Metric(key, float(value), timestamp, step) for key, value in metrics.items())

    def flush(self) -> None:
        """Call after the checkpoint covering the buffered steps is persisted."""
        if not self.enabled or not self._pending:
            return
        try:
            while self._pending:
                self.client.log_batch(self.run_id, metrics=self._pending[:1000])  # MLflow's log_batch limit
                del self._pending[:1000]
        except Exception as exc:  # noqa: BLE001 (any tracking failure must leave training running)
            log.warning("MLflow unavailable, keeping %d metric points for later: %s", len(self._pending), exc)

    def epoch(self, epoch: int, step: int, metrics: dict, confusion: np.ndarray, class_names: list[str]) -> None:
        if not self.enabled:
            return
        self.step(step, **metrics)
        self.flush()
        self._background.submit(self._log_confusion, epoch, confusion, class_names)

    def _log_confusion(self, epoch: int, confusion: np.ndarray, class_names: list[str]) -> None:
        self._try(self.client.log_dict, self.run_id, per_class_report(confusion, class_names),
                  f"eval/per_class_epoch_{epoch:03d}.json")
        if len(class_names) <= HEATMAP_MAX_CLASSES:
            self._try(lambda: self.client.log_image(self.run_id, _confusion_image(confusion, class_names),
                                                    f"plots/confusion_epoch_{epoch:03d}.png"))

    def curves(self) -> None:
        """Loss and accuracy curves from the run's own metric history."""
        if not self.enabled:
            return
        self._background.shutdown(wait=True)  # the last epoch's tables and figures first
        if self._system is not None:
            self._try(self._system.finish)
        self.flush()
        history = self._try(
            lambda: {key: self.client.get_metric_history(self.run_id, key) for key in ("train_loss", "val_accuracy", "val_loss")}
        )
        if history is not None:
            self._try(self.client.log_image, self.run_id, _curves_image(history), "plots/curves.png")

    def _try(self, call, *args):
        try:
            return call(*args)
        except Exception as exc:  # noqa: BLE001 (plots are not worth failing a training run for)
            log.warning("MLflow call failed, skipping: %s", exc)
            return None


def _start_system_metrics(run_id: str, tracking_uri: str):
    """MLflow's sampler of this node's CPU, memory, disk, network (and GPU, where nvidia-ml-py is installed): its
    `system/*` metrics, every 10 s (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL), continued by a resumed attempt."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, resume_logging=True, tracking_uri=tracking_uri)
    monitor.start()
    return monitor


def dataset_inputs(plans: dict) -> list:
    """MLflow dataset inputs (the run's Datasets) of `plans`, {context ("training", "validation"): EpochPlan}: a
    version's source URI, version, content digest and clip count. A held-out split is a dataset of its own, named and
    digested with its split, so that the training and validation clips of one version stay two datasets."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from jobs.credentials import redact
    from pipeline.manifest import content_fingerprint
    from pipeline.storage import parse_uri

    inputs = []
    for context, plan in plans.items():
        location = parse_uri(plan.dst)
        fingerprint = content_fingerprint(plan.manifest)
        name = f"{location.uri.rstrip('/').rsplit('/', 1)[-1]}@{plan.manifest.version}"
        digest = fingerprint
        if plan.split != "all":
            name += f" ({plan.split} split)"
            digest = hashlib.sha256(f"{fingerprint}:{plan.split}:{plan.val_fraction}".encode()).hexdigest()[:32]
        profile = {
            "clips": plan.rows, "version": plan.manifest.version, "classes": len(plan.manifest.class_map),
            "split": plan.split, "val_fraction": plan.val_fraction, "content_fingerprint": fingerprint,
        }
        dataset = Dataset(
            name=name, digest=digest, source_type="s3" if location.scheme == "s3" else "local",
            source=json.dumps({"uri": redact(f"{location.uri}@{plan.manifest.version}")}), profile=json.dumps(profile),
        )
        tags = [InputTag(MLFLOW_DATASET_CONTEXT, context), InputTag("version", str(plan.manifest.version)),
                InputTag("clips", str(plan.rows))]
        inputs.append(DatasetInput(dataset, tags))
    return inputs


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def _figure_to_image(figure):
    from PIL import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def _confusion_image(confusion: np.ndarray, class_names: list[str]):
    """A labelled heatmap of at most HEATMAP_MAX_CLASSES classes: 4 to 16 inches at 100 dpi, whatever the count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(class_names) > HEATMAP_MAX_CLASSES:
        raise ValueError(f"{len(class_names)} classes are too many for a readable heatmap")
    size = min(16, max(4, 0.4 * len(class_names)))
    figure, axis = plt.subplots(figsize=(size, size))
    axis.imshow(confusion, cmap="Blues")
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_xticks(range(len(class_names)), class_names, rotation=90)
    axis.set_yticks(range(len(class_names)), class_names)
    for (i, j), count in np.ndenumerate(confusion):
        axis.text(j, i, int(count), ha="center", va="center", fontsize=8)
    image = _figure_to_image(figure)
    plt.close(figure)
    return image


def _curves_image(history: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for key, axis in (("train_loss", loss_axis), ("val_loss", loss_axis), ("val_accuracy", accuracy_axis)):
        points = sorted((m.step, m.value) for m in history[key])
        if points:
            steps, values = zip(*points)
            axis.plot(steps, values, label=key, marker="o" if key.startswith("val") else None)
    for axis, title in ((loss_axis, "loss"), (accuracy_axis, "validation accuracy")):
        axis.set_xlabel("optimizer step")
        axis.set_title(title)
        axis.legend()
    image = _figure_to_image(figure)
    plt.close(figure)
    return image
