"""The predictions dataset: its row schema, versioned manifests and reading (`read_predictions`).

Layout under a destination DST (one model package and one set of scoring parameters per DST):
    DST/manifests/v000001.json             one per run that changed something; written last, never overwritten
    DST/predictions/part-<hash>.parquet
    DST/sources/v000001-<run>.parquet      the videos version 1 added, changed or removed (a delta), or all of them
    DST/errors/v000001-<run>.parquet       every video of version 1 that could not be scored (by key and ETag)
    DST/runs/<run>.json                    a running score job's record

Versions, the source tables, the errors table that remembers failed videos, run tables, adoption and run records are
the versioned-dataset core's (pipeline.dataset), shared with the clip dataset. Like the clip dataset: a shard's name
is a hash of the model package, the parameters and its exact sources, and its footer says what it holds (sources and
errors). A killed run leaves complete shards that no manifest lists; a re-run adopts those whose sources are still
pending and unchanged instead of scoring them again (jobs.scoring.results plans and commits a run), so it
finishes without duplicates. Only manifest-listed shards are part of the dataset (`read_predictions`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.dataset.parts import ShardEntry
from pipeline.dataset.versions import (
    ManifestError,
    list_manifest_versions,
    manifest_body,
    manifest_json,
    manifest_location,
    parse_dataset_ref,
    publish_manifest,
)
from pipeline.storage import Location, Storage, parse_uri

PREDICTIONS_DIR = "predictions"
FOOTER_KEY = b"uniformer.score"
MANIFEST_KIND = "predictions"
MANIFEST_SCHEMA_VERSION = 2


class ScoreConfigError(ValueError):
    """The run's model or parameters differ from the predictions already at the destination."""


@dataclass(frozen=True)
class ScoreParams:
    """Everything besides the model that decides what a prediction row means."""

    frames: int
    crop: int
    short_side: int
    temporal_views: int
    spatial_views: int
    sampling: str
    stride: int
    top_k: int
    full_probs: bool
    # windowed runs (`--windows`): one row per window of `window_seconds`, `window_stride` seconds apart, each one
    # temporal view; None for whole-video predictions, whose parameters (and so shard names) leave these out
    window_seconds: float | None = None
    window_stride: float | None = None
    embeddings: bool = False  # windowed runs: each window's pre-classifier feature (`embedding`, float16)

    @property
    def views(self) -> str:
        return f"{self.temporal_views}x{self.spatial_views}"

    @property
    def windowed(self) -> bool:
        return self.window_seconds is not None

    @property
    def unit(self) -> str:
        """What one row describes: `video` or `window`."""
        return "window" if self.windowed else "video"

    def describe_unit(self) -> str:
        if not self.windowed:
            return "whole-video predictions"
        return f"window predictions ({self.window_seconds:g} s windows every {self.window_stride:g} s)"

    def to_dict(self) -> dict:
        body = asdict(self)
        if not self.windowed:
            for key in ("window_seconds", "window_stride", "embeddings"):
                body.pop(key)
        return body


def unit_of(params: dict) -> str:
    """`window` or `video`: what the rows of a dataset with these recorded parameters describe."""
    return "window" if params.get("window_seconds") is not None else "video"


def describe_params_unit(params: dict) -> str:
    if unit_of(params) == "video":
        return "whole-video predictions"
    return f"window predictions ({params['window_seconds']:g} s windows every {params['window_stride']:g} s)"


IDENTITY_FIELDS = [
    pa.field("model_name", pa.string()),
    pa.field("model_version", pa.int32()),
    pa.field("model_alias", pa.string()),
    pa.field("model_run_id", pa.string()),
    pa.field("model_id", pa.string()),
]


def prediction_fields(top_k: int, num_classes: int, full_probs: bool) -> list[pa.Field]:
    """The model's columns of a prediction row (the source and model identity columns come with them)."""
    fields = [
        pa.field("top_k_ids", pa.list_(pa.int32(), top_k)),
        pa.field("top_k_names", pa.list_(pa.string(), top_k)),
        pa.field("top_k_probs", pa.list_(pa.float32(), top_k)),
    ]
    if full_probs:
        fields.append(pa.field("probs", pa.list_(pa.float32(), num_classes)))
    return fields


WINDOW_FIELDS = [
    pa.field("window_index", pa.int32(), nullable=False),
    pa.field("window_start", pa.float64(), nullable=False),
    pa.field("window_end", pa.float64(), nullable=False),
]


def predictions_schema(params: ScoreParams, num_classes: int, embedding_dim: int | None = None) -> pa.Schema:
    """One row per video, or with windows one row per window (`window_index`, `window_start`, `window_end` seconds,
    and with embeddings `embedding`, a fixed-size list of `embedding_dim` float16)."""
    top_k = min(params.top_k, num_classes)
    window = list(WINDOW_FIELDS) if params.windowed else []
    if params.windowed and params.embeddings:
        if not embedding_dim:
            raise ValueError("a schema with embeddings needs the embedding's size")
        window.append(pa.field("embedding", pa.list_(pa.float16(), embedding_dim)))
    schema = pa.schema(
        [
            pa.field("video_id", pa.string(), nullable=False),
            pa.field("source_uri", pa.string(), nullable=False),
            pa.field("source_etag", pa.string(), nullable=False),
            pa.field("source_size", pa.int64(), nullable=False),
            *window,
            *prediction_fields(top_k, num_classes, params.full_probs),
            *IDENTITY_FIELDS,
            pa.field("scored_at", pa.timestamp("us", tz="UTC"), nullable=False),
        ]
    )
    if params.windowed:
        schema = schema.with_metadata({b"uniformer.unit": b"window", b"uniformer.windows": json.dumps(
            {"seconds": params.window_seconds, "stride": params.window_stride}).encode()})
    return schema


@dataclass
class ScoreManifest:
    version: int
    source: str
    model: dict  # ModelIdentity.to_dict()
    params: dict  # ScoreParams.to_dict()
    class_names: list[str]
    shards: list[ShardEntry]
    # the chain of source tables ({"path", "rows"}) whose replay (pipeline.dataset.sources.read_sources) is the videos
    # whose predictions this version holds, with their uri, etag, size and shard
    source_tables: list[dict]
    num_sources: int
    counts: dict[str, int]
    throughput: dict[str, float]  # of the run that wrote this version (jobs.score.Throughput)
    errors: str | None = None
    previous_version: int | None = None
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    kind: str = MANIFEST_KIND
    # what a row describes: `video` (whole-video predictions) or `window` (a window of `params`' window_seconds and
    # window_stride); manifests written before windows existed hold whole-video predictions
    unit: str = "video"
    schema_version: int = MANIFEST_SCHEMA_VERSION

    @property
    def num_rows(self) -> int:
        return sum(shard.rows for shard in self.shards)

    def to_json(self) -> str:
        body = asdict(self)
        head = ("kind", "schema_version", "version", "previous_version", "created_at")
        ordered = {key: body[key] for key in head}
        ordered.update({key: value for key, value in body.items() if key not in ordered})
        return json.dumps(ordered, indent=1, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str, where: str) -> "ScoreManifest":
        body = manifest_json(text, where)
        found = body.get("schema_version")
        if body.get("kind") == MANIFEST_KIND and isinstance(found, int) and found < MANIFEST_SCHEMA_VERSION:
            raise ScoreConfigError(
                f"{where} holds predictions of schema version {found}, written by an older uniformer (every video's "
                f"source inside each manifest); this one reads schema version {MANIFEST_SCHEMA_VERSION}. Score into a "
                "new destination (`uniformer score ... --out NEW_DST`): its first run scores every listed video"
            )
        if body.get("kind") != MANIFEST_KIND or found != MANIFEST_SCHEMA_VERSION:
            raise ScoreConfigError(
                f"{where} is not a predictions manifest this version reads (kind {body.get('kind')!r}, schema "
                f"{found}); write predictions to their own --out"
            )
        manifest_body(body, where, cls, "predictions manifest")
        try:
            body["shards"] = [ShardEntry(**shard) for shard in body["shards"]]
            return cls(**body)
        except (KeyError, TypeError, ValueError) as error:
            raise ManifestError(f"{where} is not a predictions manifest: {type(error).__name__}: {error}") from None


def latest_score_manifest(root: Location, storage: Storage) -> ScoreManifest | None:
    versions = list_manifest_versions(root, storage)
    return read_score_manifest(root, versions[-1], storage) if versions else None


def read_score_manifest(root: Location, version: int, storage: Storage) -> ScoreManifest:
    location = manifest_location(root, version)
    return ScoreManifest.from_json(storage.read_bytes(location), location.uri)


def write_score_manifest(root: Location, manifest: ScoreManifest, storage: Storage) -> Location:
    return publish_manifest(root, manifest.version, manifest.to_json(), storage, ScoreConfigError, "score run")


def predictions_manifest(dst: str, storage: Storage) -> tuple[ScoreManifest, Location]:
    """The manifest of a predictions destination's latest version, or of `DST@VERSION`, and the destination's root."""
    dst, version = parse_dataset_ref(dst)
    root = parse_uri(dst)
    if version is None:
        manifest = latest_score_manifest(root, storage)
    elif version in list_manifest_versions(root, storage):
        manifest = read_score_manifest(root, version, storage)
    else:
        raise ScoreConfigError(f"no predictions version {version} under {root.uri}")
    if manifest is None:
        raise ScoreConfigError(f"no predictions manifest under {root.uri}")
    return manifest, root


def read_predictions(dst: str, storage: Storage | None = None, columns: list[str] | None = None) -> pa.Table:
    """The rows of a predictions destination's latest version (the current model's, when an alias is scored on a
    schedule), or of `DST@VERSION`: exactly the listed shards."""
    storage = storage or Storage()
    manifest, root = predictions_manifest(dst, storage)
    tables = []
    for shard in manifest.shards:
        location = root.join(shard.path)
        tables.append(
            pq.read_table(storage.arrow_path(location), filesystem=storage.arrow_filesystem(location), columns=columns)
        )
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables).replace_schema_metadata(None)
