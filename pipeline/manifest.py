"""Versioned JSON manifests: what a clip dataset version contains and how it was made.

Layout under a dataset root DST:
    DST/manifests/v000001.json   one per ingest run that changed something; written last, never overwritten
    DST/shards/part-<hash>.parquet
    DST/errors/v000001.parquet   the errors of the run that wrote manifest v000001

A manifest lists every shard of its version (not only the run's new ones), so one file describes a whole version.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from pipeline.schema import SCHEMA_VERSION
from pipeline.storage import Location, Storage, parse_uri

MANIFESTS_DIR = "manifests"
SHARDS_DIR = "shards"
ERRORS_DIR = "errors"
_MANIFEST_NAME = re.compile(r"^v(\d{6,})\.json$")
_DATASET_REF = re.compile(r"^(?P<dst>.+)@v?(?P<version>\d+|latest)$")


class ManifestError(RuntimeError):
    """No manifest, an unreadable one, or a dataset that does not match its manifest."""


@dataclass(frozen=True)
class SamplingParams:
    frames: int = 8
    short_side: int = 256
    size: int = 224  # model input (crop) size; training random-crops it from the stored short_side square
    sampling: str = "uniform"
    stride: int = 16
    clips_per_video: int = 1

    def __post_init__(self):
        if self.size > self.short_side:
            raise ValueError(f"size ({self.size}) must not exceed short_side ({self.short_side})")
        if min(self.frames, self.size, self.stride, self.clips_per_video) < 1:
            raise ValueError("frames, size, stride and clips_per_video must be >= 1")
        if self.sampling not in ("uniform", "dense"):
            raise ValueError(f"sampling must be 'uniform' or 'dense', not {self.sampling!r}")

    @property
    def clip_shape(self) -> tuple[int, int, int, int]:
        return (self.frames, self.short_side, self.short_side, 3)

    @property
    def clip_bytes(self) -> int:
        return self.frames * self.short_side * self.short_side * 3

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ShardEntry:
    path: str  # relative to the dataset root
    rows: int
    sha256: str
    bytes: int


@dataclass
class Manifest:
    version: int
    source: str
    sampling: SamplingParams
    labels: str  # "csv", "dirs" or "none"
    class_map: dict[str, int]
    shards: list[ShardEntry]
    # video_id -> {"uri", "etag", "size", "label_name", "clips", "shard"}: what this version contains
    sources: dict[str, dict]
    counts: dict[str, int]
    errors: str | None = None  # relative path of this run's errors table
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
    def from_json(cls, text: str) -> "Manifest":
        body = json.loads(text)
        if body.get("schema_version") != SCHEMA_VERSION:
            raise ManifestError(
                f"manifest schema version {body.get('schema_version')} is not supported (expected {SCHEMA_VERSION})"
            )
        body["sampling"] = SamplingParams(**body["sampling"])
        body["shards"] = [ShardEntry(**shard) for shard in body["shards"]]
        return cls(**body)


def parse_dataset_ref(ref: str) -> tuple[str, int | None]:
    """`DST@3`, `DST@v3` or `DST@latest` -> (DST, 3 / None); a plain `DST` -> (DST, None)."""
    match = _DATASET_REF.match(ref)
    if not match:
        return ref, None
    version = match.group("version")
    return match.group("dst"), None if version == "latest" else int(version)


def manifest_location(root: Location, version: int) -> Location:
    return root.join(MANIFESTS_DIR, f"v{version:06d}.json")


def list_manifest_versions(root: Location, storage: Storage) -> list[int]:
    folder = root.join(MANIFESTS_DIR)
    versions = []
    for info in storage.list_objects(folder):
        match = _MANIFEST_NAME.match(info.location.path.rsplit("/", 1)[-1].rsplit("\\", 1)[-1])
        if match:
            versions.append(int(match.group(1)))
    return sorted(versions)


def latest_manifest(root: Location, storage: Storage) -> Manifest | None:
    versions = list_manifest_versions(root, storage)
    return read_manifest(root, versions[-1], storage) if versions else None


def read_manifest(root: Location, version: int, storage: Storage) -> Manifest:
    location = manifest_location(root, version)
    if not storage.exists(location):
        raise ManifestError(f"no manifest version {version} at {location.uri}")
    return Manifest.from_json(storage.read_bytes(location).decode("utf-8"))


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


def publish_manifest(
    root: Location, version: int, text: str, storage: Storage, error: type[Exception], job: str
) -> Location:
    """Publish manifest `version` (of a clip or a predictions dataset) under `root`; refuses to replace an existing
    one, raising `error`: two `job` runs raced for the same number."""
    location = manifest_location(root, version)
    try:
        storage.put_bytes(location, text.encode("utf-8"), if_absent=True)
    except FileExistsError:
        raise error(
            f"manifest version {version} already exists at {location.uri}: another {job} into the same "
            "destination finished first; re-run to build on it"
        ) from None
    return location


def write_manifest(root: Location, manifest: Manifest, storage: Storage) -> Location:
    return publish_manifest(root, manifest.version, manifest.to_json(), storage, ManifestError, "ingest")
