"""Multi-view scoring rows: the Ray Data actor that runs `model.inference.predict_views` over decoded videos, and
the prediction columns it writes (their schema is pipeline.predictions.prediction_fields)."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import torch

from model.inference import predict_views
from model.package import load_package, load_package_bytes


def top_k_columns(
    probs: np.ndarray, top_k: int, class_names: list[str], full_probs: bool, missing: np.ndarray | None = None
) -> dict[str, pa.Array]:
    """`[B, C]` probabilities -> Arrow columns of the top-k ids, names (null without class names) and
    probabilities, best first, and the full vector when asked; rows where `missing` is true are null."""
    _, num_classes = probs.shape
    ids = np.argsort(-probs, axis=1, kind="stable")[:, :top_k].astype(np.int32)
    top = np.take_along_axis(probs, ids, axis=1).astype(np.float32)
    names = [class_names[i] if len(class_names) == num_classes else None for i in ids.ravel()]
    mask = None if missing is None or not missing.any() else pa.array(missing)

    def lists(values: pa.Array, size: int) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(values, size, mask=mask)

    columns = {
        "top_k_ids": lists(pa.array(ids.ravel()), top_k),
        "top_k_names": lists(pa.array(names, pa.string()), top_k),
        "top_k_probs": lists(pa.array(top.ravel()), top_k),
    }
    if full_probs:
        columns["probs"] = lists(pa.array(np.ascontiguousarray(probs, dtype=np.float32).ravel()), num_classes)
    return columns


class ViewPredictor:
    """Ray Data callable class for `map_batches` in an actor pool: builds the network once per actor from the
    package (weights bytes in the object store and config JSON, or, in the process that holds them, the package's
    files: `weights_path`, `config_path`), then turns batches of decoded videos into prediction rows. Rows whose
    decoding failed pass through with null predictions and their error. `warm_up`: one forward on a blank view at
    start, for a pool whose first videos are still decoding."""

    def __init__(
        self,
        package: dict,
        top_k: int,
        full_probs: bool,
        identity_columns: dict,
        use_gpu: bool = False,
        precision: str = "auto",
        max_clips: int | None = None,
        torch_threads: int | None = None,
        warm_up: bool = True,
    ):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        if "weights_path" in package:
            self.net, self.card = load_package(package["weights_path"], package["config_path"], device=self.device)
        else:
            import ray  # only here: the pyfunc MLflow serves builds this from files, in an environment without Ray

            weights = package["weights"]
            weights = ray.get(weights) if isinstance(weights, ray.ObjectRef) else weights
            self.net, self.card = load_package_bytes(weights, package["config"], device=self.device)
        self.top_k = min(top_k, self.card.num_classes)
        self.full_probs = full_probs
        self.identity = identity_columns
        self.precision = precision
        self.max_clips = max_clips
        if warm_up:
            # one forward on a blank view now: the first call's one-time costs (kernel and layout choices, the
            # allocator's growth, on CUDA the context's lazy work) are paid while the first videos decode, not by
            # their predictions
            card = self.card
            blank = torch.zeros((1, 1, card.frames, card.crop_size, card.crop_size, 3), dtype=torch.uint8,
                                device=self.device)
            predict_views(self.net, blank, card.crop_size, precision)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        count = len(batch["source_uri"])
        ok = np.array([not error for error in batch["error_type"]], dtype=bool)
        probs = np.zeros((count, self.card.num_classes), np.float32)
        if ok.any():
            views = torch.from_numpy(np.ascontiguousarray(batch["views"][ok])).to(self.device, non_blocking=True)
            probs[ok] = predict_views(self.net, views, self.card.crop_size, self.precision, self.max_clips).cpu()
        return self.rows(batch, probs, ok)

    def rows(self, batch: dict[str, np.ndarray], probs: np.ndarray, ok: np.ndarray) -> pa.Table:
        count = len(batch["source_uri"])
        columns = top_k_columns(probs, self.top_k, self.card.class_names, self.full_probs, missing=~ok)
        scored_at = datetime.now(timezone.utc)
        table = {
            "video_id": pa.array(batch["video_id"].tolist(), pa.string()),
            "source_uri": pa.array(batch["source_uri"].tolist(), pa.string()),
            "source_etag": pa.array(batch["source_etag"].tolist(), pa.string()),
            "source_size": pa.array(batch["source_size"].astype(np.int64)),
            **columns,
            **{name: pa.array([value] * count, typ) for name, (value, typ) in self.identity.items()},
            "scored_at": pa.array([scored_at] * count, pa.timestamp("us", tz="UTC")),
            "shard": pa.array(batch["shard"].astype(np.int32)),
            "error_stage": _strings_or_null(batch["error_stage"]),
            "error_type": _strings_or_null(batch["error_type"]),
            "error_message": _strings_or_null(batch["error_message"]),
        }
        return pa.table(table)


def _strings_or_null(values: np.ndarray) -> pa.Array:
    return pa.array([str(value) if value else None for value in values.tolist()], pa.string())



class WindowPredictor(ViewPredictor):
    """ViewPredictor for windowed scoring: a row per window (its `views` the window's spatial crops of one clip), with
    the window's index, start and end, `windows_in_video` for the driver, and with `embeddings` the pre-classifier
    feature averaged over the crops, as float16."""

    def __init__(self, *args, embeddings: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.embeddings = embeddings

    @property
    def embedding_dim(self) -> int:
        return int(self.net.config.width)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        count = len(batch["source_uri"])
        ok = np.array([not error for error in batch["error_type"]], dtype=bool)
        probs = np.zeros((count, self.card.num_classes), np.float32)
        features = np.zeros((count, self.embedding_dim), np.float16)
        if ok.any():
            views = torch.from_numpy(np.ascontiguousarray(batch["views"][ok])).to(self.device, non_blocking=True)
            if self.embeddings:
                scored, feature = predict_views(self.net, views, self.card.crop_size, self.precision, self.max_clips,
                                                return_features=True)
                features[ok] = feature.cpu().numpy().astype(np.float16)
            else:
                scored = predict_views(self.net, views, self.card.crop_size, self.precision, self.max_clips)
            probs[ok] = scored.cpu()
        table = super().rows(batch, probs, ok)
        table = table.append_column("window_index", pa.array(batch["window_index"].astype(np.int32)))
        table = table.append_column("window_start", pa.array(batch["window_start"].astype(np.float64)))
        table = table.append_column("window_end", pa.array(batch["window_end"].astype(np.float64)))
        table = table.append_column("windows_in_video", pa.array(batch["windows_in_video"].astype(np.int64)))
        if self.embeddings:
            mask = None if ok.all() else pa.array(~ok)
            embedding = pa.FixedSizeListArray.from_arrays(pa.array(features.ravel(), pa.float16()),
                                                          self.embedding_dim, mask=mask)
            table = table.append_column("embedding", embedding)
        return table
