"""`uniformer predict`: what is in these videos? The scoring path in one process (no Ray, nothing written): the
model resolved once, each video decoded into the model's views as `score` decodes them (`decode_batch`, in the
decoding child process, within the decode limits) and run through the same `ViewPredictor`, so a video gets the
probabilities `score` would write for it. `decode_video` is that per-video step, which the served pyfunc
(jobs.serving.pyfunc_model) takes too."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from jobs.options import ScoreConfig
from jobs.registry import ModelIdentity, resolve_model
from jobs.score import blank_views, build_params, decode_batch, decoded
from jobs.scoring.predict import ViewPredictor
from jobs.scoring.results import identity_columns
from pipeline.decode import DecodeLimits
from pipeline.predictions import ScoreParams
from pipeline.storage import Storage, is_object_error, parse_uri


@dataclass
class VideoPrediction:
    video: str  # as given
    uri: str
    top_k: list[dict] = field(default_factory=list)  # {"id", "name", "prob"}, best first
    error: str | None = None  # "stage: ErrorType: message" for a video that could not be read or decoded
    seconds: float = 0.0  # since the command started: the first answer's is the start-up's too

    def line(self) -> str:
        if self.error:
            return f"{self.video}  error  {self.error}"
        return f"{self.video}  " + "  ".join(f"{top['name']} {top['prob']:.3f}" for top in self.top_k)


def predict_videos(
    videos: Sequence[str],
    model: str,
    views: str = ScoreConfig.views,
    top_k: int = 5,
    tracking_uri: str | None = None,
    endpoint_url: str | None = None,
    limits: DecodeLimits = DecodeLimits(),
) -> tuple[ModelIdentity, Iterator[VideoPrediction]]:
    """The model's identity, and each video's prediction as soon as it is made, in the order given."""
    started = time.monotonic()
    storage = Storage(endpoint_url)
    with tempfile.TemporaryDirectory() as scratch:
        resolved = resolve_model(model, scratch, tracking_uri)
        params = build_params(resolved.card, views, top_k, full_probs=False, short_side=None)
        # the package's files as they are, and no warm-up: here the first real video pays the first call's costs
        # anyway, and a blank forward before it would only delay the first answer
        package = {"weights_path": resolved.weights_path, "config_path": resolved.config_path}
        predictor = ViewPredictor(package, params.top_k, False, identity_columns(resolved.identity),
                                  torch_threads=os.cpu_count(), warm_up=False)

    def predictions() -> Iterator[VideoPrediction]:
        for video in videos:
            row = predictor(decode_video(video, storage, params, limits)).to_pylist()[0]
            seconds = time.monotonic() - started
            if row["error_type"]:
                error = f"{row['error_stage']}: {row['error_type']}: {row['error_message']}"
                yield VideoPrediction(video, row["source_uri"], error=error, seconds=seconds)
                continue
            top = [{"id": int(i), "name": name, "prob": float(prob)}
                   for i, name, prob in zip(row["top_k_ids"], row["top_k_names"], row["top_k_probs"])]
            yield VideoPrediction(video, row["source_uri"], top, seconds=seconds)

    return resolved.identity, predictions()


def decode_video(
    video: str, storage: Storage, params: ScoreParams, limits: DecodeLimits = DecodeLimits()
) -> dict[str, np.ndarray]:
    """One video (a local path or a storage URI) as `decode_batch` gives it to `ViewPredictor`: a batch of one row,
    its views, or its error when it is not there or cannot be decoded (a store that fails raises, as in score)."""
    location = parse_uri(video)
    try:
        size = storage.size(location)
    except Exception as error:  # noqa: BLE001 - told per video, as score does
        if not is_object_error(error):
            raise  # the store failed, not this video
        return failed_video(video, location.uri, params, "read", type(error).__name__, "no such video")
    return decode_batch(_one_video(video, location.uri, size), storage, params, limits)


def failed_video(video: str, uri: str, params: ScoreParams, stage: str, error_type: str,
                 message: str) -> dict[str, np.ndarray]:
    """The row `decode_batch` makes of a video it could not decode (blank views, its error), for one that failed
    before it."""
    return decoded(_one_video(video, uri, 0), blank_views(1, params), [stage], [error_type], [message])


def _one_video(video: str, uri: str, size: int) -> dict[str, np.ndarray]:
    return {"video_id": np.array([video], object), "source_uri": np.array([uri], object),
            "source_etag": np.array([""], object), "source_size": np.array([size]), "shard": np.array([0])}
