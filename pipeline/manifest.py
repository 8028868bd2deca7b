"""Versioned JSON manifests: what a clip dataset version contains and how it was made.

Layout under a dataset root DST (pipeline.dataset is the part of it that prediction datasets share):
    DST/manifests/v000001.json          one per ingest run that changed something; written last, never overwritten
    DST/shards/part-<hash>.parquet
    DST/sources/v000001-<run>.parquet   the source videos that version 1 added, changed or removed (a delta), or all
    DST/errors/v000001-<run>.parquet    every input of version 1 that gave no clips (remembered by key and ETag)
    DST/runs/<run>.json                 a running job's record: an ingest's parts, the versions a reader reads

A manifest lists every shard of its version (not only the run's new ones), so one small file describes what a
reader needs. The source videos (a million rows for a large dataset) are not in it: they are the replay of a chain of
Parquet tables the manifest names (pipeline.dataset.sources). Training never reads them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from pipeline.dataset.parts import ShardEntry
from pipeline.dataset.versions import (
    MANIFESTS_DIR,
    ManifestError,
    list_manifest_versions,
    manifest_body,
    manifest_json,
    manifest_location,
    parse_dataset_ref,
    publish_manifest,
)
from pipeline.decode import KEEPS, stored_width
from pipeline.schema import SCHEMA_VERSION, clip_schema
from pipeline.storage import Location, Storage, parse_uri

SHARDS_DIR = "shards"


# Sampling fields added after datasets were first written: a manifest records them only when they differ from these,
# so that a square dataset's manifest, shard names and content fingerprint stay what they were, and an older
# manifest, which lacks them, reads as square.
_RECORDED_WHEN_SET = {"keep": "square", "max_aspect": None}


@dataclass(frozen=True)
class SamplingParams:
    frames: int = 8
    short_side: int = 256
    size: int = 224  # model input (crop) size; training random-crops it from the stored frame's valid region
    sampling: str = "uniform"
    stride: int = 16
    clips_per_video: int = 1
    # candidate frames stored per segment (uniform sampling): training picks one per segment each epoch
    frames_per_segment: int = 1
    # "square": the centre square of the short side; "aspect": the frame at short side S up to `max_aspect` wide
    # (pipeline.decode.resize_keep_aspect), one stored width for the whole dataset
    keep: str = "square"
    max_aspect: str | None = None  # WIDTH:HEIGHT, keep="aspect" only; 16:9 when not given

    def __post_init__(self):
        if self.size > self.short_side:
            raise ValueError(f"size ({self.size}) must not exceed short_side ({self.short_side})")
        if min(self.frames, self.size, self.stride, self.clips_per_video, self.frames_per_segment) < 1:
            raise ValueError("frames, size, stride, clips_per_video and frames_per_segment must be >= 1")
        if self.sampling not in ("uniform", "dense"):
            raise ValueError(f"sampling must be 'uniform' or 'dense', not {self.sampling!r}")
        if self.sampling == "dense" and self.frames_per_segment != 1:
            raise ValueError("frames_per_segment applies to uniform sampling only")
        if self.keep not in KEEPS:
            raise ValueError(f"keep must be one of {', '.join(KEEPS)}, not {self.keep!r}")
        if self.keep == "square" and self.max_aspect is not None:
            raise ValueError("max_aspect applies to keep=aspect only")
        if self.keep == "aspect":
            object.__setattr__(self, "max_aspect", self.max_aspect or "16:9")
            stored_width(self.short_side, self.max_aspect)  # refuses a malformed ratio by name

    @property
    def stored_frames(self) -> int:
        return self.frames * self.frames_per_segment

    @property
    def width(self) -> int:
        """The stored frame width: S for square clips, `pipeline.decode.stored_width` for keep="aspect"."""
        return self.short_side if self.keep == "square" else stored_width(self.short_side, self.max_aspect)

    @property
    def aspect_width(self) -> int | None:
        """The stored width of keep="aspect" clips, None for square ones: the `width` that decode_clips, ShardWriter
        and clip_schema take."""
        return None if self.keep == "square" else self.width

    @property
    def clip_shape(self) -> tuple[int, int, int, int]:
        """The shape of one stored clip: `[T * M, S, W, 3]` (W = S for square clips)."""
        return (self.stored_frames, self.short_side, self.width, 3)

    @property
    def clip_bytes(self) -> int:
        return self.stored_frames * self.short_side * self.width * 3

    def schema(self) -> pa.Schema:
        """The stored schema of this sampling's clips (pipeline.schema.clip_schema)."""
        return clip_schema(self.stored_frames, self.short_side, self.aspect_width)

    def pick_frames(self, clips: np.ndarray, picks: np.ndarray | None = None) -> np.ndarray:
        """Stored clips `[N, T * M, S, W, 3]` -> model clips `[N, T, S, W, 3]`: candidate `picks[n, t]` of each
        segment (training's temporal jitter), or the middle candidate when `picks` is None (evaluation)."""
        m = self.frames_per_segment
        if m == 1:
            return clips
        if picks is None:
            picks = np.full((len(clips), self.frames), m // 2)
        positions = np.arange(self.frames) * m + picks  # [N, T]
        return clips[np.arange(len(clips))[:, None], positions]

    def to_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items()
                if key not in _RECORDED_WHEN_SET or value != _RECORDED_WHEN_SET[key]}


@dataclass
class Manifest:
    version: int
    source: str
    sampling: SamplingParams
    labels: str  # "csv", "segments" (pipeline.listing: a CSV of labelled segments), "dirs" or "none"
    class_map: dict[str, int]
    shards: list[ShardEntry]
    # the chain of source tables ({"path", "rows"}) whose replay is this version's sources
    # (pipeline.dataset.sources.read_sources)
    source_tables: list[dict]
    num_sources: int
    counts: dict[str, int]
    errors: str | None = None  # relative path of the version's errors table: its inputs that gave no clips
    previous_version: int | None = None
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    schema_version: int = SCHEMA_VERSION

    @property
    def num_clips(self) -> int:
        return sum(shard.rows for shard in self.shards)

    @property
    def class_names(self) -> list[str]:
        return [name for name, _ in sorted(self.class_map.items(), key=lambda item: item[1])]

    def to_json(self) -> str:
        body = asdict(self)
        body["sampling"] = self.sampling.to_dict()
        ordered = {key: body[key] for key in ("schema_version", "version", "previous_version", "created_at")}
        ordered.update({key: value for key, value in body.items() if key not in ordered})
        return json.dumps(ordered, indent=1, ensure_ascii=False, sort_keys=False)

    @classmethod
    def from_json(cls, text: str, where: str = "the manifest") -> "Manifest":
        body = manifest_json(text, where)
        found = body.get("schema_version")
        if found != SCHEMA_VERSION:
            hint = (
                "it was written by an older uniformer (frames stored as Parquet lists, sources inside every manifest); "
                "this one reads clip datasets of schema version 2 only. Ingest the videos again into a new "
                "destination (`uniformer ingest SRC --out NEW_DST ...`), then train from NEW_DST"
                if isinstance(found, int) and found < SCHEMA_VERSION
                else "upgrade uniformer to read it"
            )
            raise ManifestError(
                f"clip dataset schema version {found} is not supported (this version reads {SCHEMA_VERSION}): {hint}"
            )
        manifest_body(body, where, cls, "clip dataset manifest")
        class_map = body.get("class_map")
        if not (isinstance(class_map, dict) and all(isinstance(name, str) and type(index) is int
                                                    for name, index in class_map.items())):
            raise ManifestError(f"{where}: class_map is {class_map!r:.80}, not a mapping of class names to ids")
        if body.get("labels") not in ("csv", "segments", "dirs", "none"):
            raise ManifestError(f"{where}: labels is {body.get('labels')!r:.80}, not csv, segments, dirs or none")
        if not isinstance(body.get("counts"), dict) or not isinstance(body.get("sampling"), dict):
            raise ManifestError(f"{where}: counts and sampling must be mappings")
        try:
            body["sampling"] = SamplingParams(**body["sampling"])
            body["shards"] = [ShardEntry(**shard) for shard in body["shards"]]
            return cls(**body)
        except (KeyError, TypeError, ValueError) as error:
            raise ManifestError(f"{where} is not a clip dataset manifest: {type(error).__name__}: {error}") from None


def content_fingerprint(manifest: Manifest) -> str:
    """What a model trained on this version learns from, whatever its version number: the shards' contents (their
    sha256, as a set, which covers every clip, label and video id), the class map and the sampling (the crop size is
    not in the shards). Versions published without a change, or with changes that cancel out, share it, so a
    retrain can tell that it has nothing new to learn."""
    body = {
        "shards": sorted(shard.sha256 for shard in manifest.shards),
        "class_map": manifest.class_map,
        "sampling": manifest.sampling.to_dict(),
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()[:32]


def latest_manifest(root: Location, storage: Storage) -> Manifest | None:
    versions = list_manifest_versions(root, storage)
    return read_manifest(root, versions[-1], storage) if versions else None


def read_manifest(root: Location, version: int, storage: Storage) -> Manifest:
    location = manifest_location(root, version)
    if not storage.exists(location):
        raise ManifestError(f"no manifest version {version} at {location.uri}")
    try:
        return Manifest.from_json(storage.read_bytes(location))
    except ManifestError as error:
        raise ManifestError(f"{location.uri}: {error}") from None


def load_manifest(dst: str, version: int | None = None, endpoint_url: str | None = None) -> Manifest:
    """The manifest of dataset `dst` (also `DST@version`); the latest version when none is given."""
    dst, ref_version = parse_dataset_ref(dst)
    version = version if version is not None else ref_version
    storage = Storage(endpoint_url)
    root = parse_uri(dst)
    if version is None:
        manifest = latest_manifest(root, storage)
        if manifest is None:
            raise ManifestError(f"no manifest under {root.join(MANIFESTS_DIR).uri}: nothing has been ingested there")
        return manifest
    return read_manifest(root, version, storage)


def write_manifest(root: Location, manifest: Manifest, storage: Storage) -> Location:
    return publish_manifest(root, manifest.version, manifest.to_json(), storage, ManifestError, "ingest")
