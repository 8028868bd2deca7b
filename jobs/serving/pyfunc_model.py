"""MLflow "models from code" definition of a UniFormerV2 classifier.

MLflow logs this file as source, not a pickled object: loading it rebuilds the network from `model_config.json`
and `model.safetensors` (the artifacts logged beside it), with the project's own packages shipped as its code.

Input, one row per video or clip:
- videos: a DataFrame with a `video` column (the file's bytes; over JSON the base64 text MLflow gives binary
  columns) and/or a `uri` column (a local path or `s3://`, the store's endpoint from `AWS_ENDPOINT_URL_S3` /
  `AWS_ENDPOINT_URL`; only under the prefixes `UNIFORMER_ALLOW_URIS` names, when it is set), one of them per row; or
  a list of bytes and URI strings. Each video is decoded and predicted
  as `uniformer score` does it (`jobs.predict.decode_video`: the decode limits, decoding in a child process, the
  model's test views, `params["views"]`, default `ScoreConfig.views`), so it gets the probabilities score writes.
- clips: uint8 `[N, T, H, W, 3]` of any H x W: each brought to the stored clip format as ingest makes it (short side
  to the model's `short_side`, the centre square) and predicted as one centre view.

Output: a DataFrame, one row per input: `top_k_ids`, `top_k_names`, `top_k_probs` (best first, `params["top_k"]`,
default 5), `probs` (all classes, with `params["full_probs"]`), and `error` ("stage: ErrorType: message" for a video
that could not be read or decoded, its predictions null; None otherwise).
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from jobs.serving import DEFAULT_TOP_K

VIDEO_COLUMN, URI_COLUMN = "video", "uri"
# Comma-separated prefixes: when set, a `uri` outside them is that row's error, not read (`mlflow models serve` reads
# a URI with the server's own file and S3 access, on behalf of whoever can reach the port).
ALLOW_URIS_ENV = "UNIFORMER_ALLOW_URIS"
OUTPUT_COLUMNS = ("top_k_ids", "top_k_names", "top_k_probs", "error")


class UniFormerV2Classifier(PythonModel):
    def load_context(self, context) -> None:
        self.load(context.artifacts["weights"], context.artifacts["config"])

    def load(self, weights_path: str, config_path: str, use_gpu: bool = False) -> UniFormerV2Classifier:
        """Builds the network from the package's files (what MLflow's loading does; `uniformer serve` calls it with
        the files `jobs.registry.resolve_model` fetched, and on a GPU replica with `use_gpu`)."""
        from jobs.scoring.predict import ViewPredictor

        package = {"weights_path": weights_path, "config_path": config_path}
        # every class's probability, so that each call picks its own top-k (jobs.scoring.predict.top_k_columns)
        self.predictor = ViewPredictor(package, 1 << 30, True, {}, use_gpu=use_gpu, warm_up=False)
        self.net, self.card = self.predictor.net, self.predictor.card
        return self

    # typed so that MLflow prints no "add type hints" warning: a DataFrame hint makes MLflow pass the input as it
    # comes (no type-hint schema), and the logged signature names no input schema, so clips arrays pass too
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        params = params or {}
        top_k = DEFAULT_TOP_K if params.get("top_k") is None else int(params["top_k"])
        full_probs = bool(params.get("full_probs"))
        if top_k < 1:
            raise ValueError("top_k must be >= 1")
        clips = _clips(model_input)
        batch = self._clip_batch(clips) if clips is not None else self._video_batch(_videos(model_input), params)
        if batch is None:
            return pd.DataFrame({name: pd.Series(dtype=object) for name in OUTPUT_COLUMNS})
        return self._rows(self.predictor(batch), top_k, full_probs)

    def _clip_batch(self, clips: np.ndarray) -> dict[str, np.ndarray] | None:
        from pipeline.decode import resize_center_crop

        if clips.ndim != 5 or clips.shape[-1] != 3:
            raise ValueError(f"expected uint8 clips [N, T, H, W, 3], got shape {tuple(clips.shape)}")
        if not len(clips):
            return None
        count = len(clips)
        # the stored format as ingest makes it; a clip already in it is left as it is (one centre view, as before)
        stored = np.stack([resize_center_crop(clip, self.card.short_side) for clip in clips])
        blank = np.array([""] * count, object)
        return {"video_id": blank, "source_uri": blank, "source_etag": blank, "source_size": np.zeros(count),
                "shard": np.zeros(count), "views": stored[:, None], "error_stage": blank, "error_type": blank,
                "error_message": blank}

    def _video_batch(self, videos: list[bytes | str | UnreadableInput], params: dict) -> dict[str, np.ndarray] | None:
        from jobs.options import ScoreConfig
        from jobs.predict import decode_video, failed_video
        from jobs.score import build_params
        from pipeline.storage import Storage

        if not videos:
            return None
        storage = Storage()  # the endpoint as the environment says now; credentials from the AWS chain
        # the model's test views as score takes them (its default unless the call names others)
        views = build_params(self.card, params.get("views") or ScoreConfig.views, 1, full_probs=True, short_side=None)
        rows = []
        with tempfile.TemporaryDirectory(prefix="uniformer-pyfunc-") as scratch:
            for index, video in enumerate(videos):
                if isinstance(video, UnreadableInput):
                    label = f"<input {index}>"
                    row = failed_video(label, label, views, "read", type(video).__name__, str(video))
                elif isinstance(video, bytes):
                    # the bytes as a local file: the same fetch, limits and decoding child as a video in a store
                    path = os.path.join(scratch, f"video-{index}")
                    with open(path, "wb") as handle:
                        handle.write(video)
                    row = decode_video(path, storage, views)
                    row["video_id"] = row["source_uri"] = np.array([f"<bytes of input {index}>"], object)
                    row["error_message"] = np.array([str(row["error_message"][0]).replace(path, "the video")], object)
                elif not _uri_allowed(video):
                    row = failed_video(video, video, views, "read", "UriNotAllowed",
                                       f"not under a prefix that {ALLOW_URIS_ENV} names; send the video's bytes")
                else:
                    try:
                        row = decode_video(video, storage, views)
                    except ValueError as error:  # not a URI the storage reads: this input's error alone
                        row = failed_video(video, video, views, "read", type(error).__name__, str(error))
                rows.append(row)
        return {key: np.concatenate([row[key] for row in rows]) for key in rows[0]}

    def _rows(self, table, top_k: int, full_probs: bool) -> pd.DataFrame:
        from jobs.scoring.predict import top_k_columns

        errors = [f"{stage}: {kind}: {message}" if kind else None for stage, kind, message in
                  zip(*(table.column(name).to_pylist() for name in ("error_stage", "error_type", "error_message")))]
        missing = np.array([error is not None for error in errors], dtype=bool)
        probs = np.zeros((table.num_rows, self.card.num_classes), np.float32)
        for row, values in enumerate(table.column("probs").to_pylist()):
            if values is not None:
                probs[row] = values
        columns = top_k_columns(probs, min(top_k, self.card.num_classes), self.card.class_names, full_probs, missing)
        frame = pd.DataFrame({name: column.to_pylist() for name, column in columns.items()})
        frame["error"] = pd.Series(errors, dtype=object)
        return frame


def _uri_allowed(uri: str) -> bool:
    from pipeline.storage import uri_prefixes, uri_within

    allowed = os.environ.get(ALLOW_URIS_ENV)
    if allowed is None:
        return True
    return uri_within(uri, uri_prefixes(allowed))


def _clips(model_input) -> np.ndarray | None:
    """The input as uint8 clips, or None when it holds videos (bytes or strings)."""
    if isinstance(model_input, np.ndarray) and model_input.dtype.kind in "biuf":
        return np.ascontiguousarray(model_input, dtype=np.uint8)
    return None


class UnreadableInput(ValueError):
    """An input row that names no video: answered as that row's error."""


def _videos(model_input) -> list[bytes | str | UnreadableInput]:
    """Each input video as its bytes or its URI."""
    if isinstance(model_input, dict):
        model_input = pd.DataFrame(model_input)
    if isinstance(model_input, pd.DataFrame):
        given = [name for name in (VIDEO_COLUMN, URI_COLUMN) if name in model_input.columns]
        if not given:
            raise ValueError(f"expected a `{VIDEO_COLUMN}` column (bytes) or a `{URI_COLUMN}` column (paths or s3:// "
                             f"URIs), got columns {list(model_input.columns)}")
        videos = []
        for _, row in model_input.iterrows():
            content = row.get(VIDEO_COLUMN)
            if isinstance(content, str):  # JSON carries binary as base64 text
                try:
                    content = base64.b64decode(content)
                except binascii.Error as error:  # this row's fault: the other rows are still answered
                    videos.append(UnreadableInput(f"the video column is not base64: {error}"))
                    continue
            if isinstance(content, (bytes, bytearray, memoryview)):
                videos.append(bytes(content))
            elif isinstance(row.get(URI_COLUMN), str):
                videos.append(row[URI_COLUMN])
            else:
                raise ValueError(f"a row has neither `{VIDEO_COLUMN}` bytes nor a `{URI_COLUMN}`")
        return videos
    items = model_input.tolist() if isinstance(model_input, (pd.Series, np.ndarray)) else list(model_input)
    for item in items:
        if not isinstance(item, (bytes, bytearray, memoryview, str)):
            raise ValueError(f"expected video bytes or URIs, got a {type(item).__name__}")
    return [item if isinstance(item, str) else bytes(item) for item in items]


mlflow.models.set_model(UniFormerV2Classifier())
