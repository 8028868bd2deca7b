"""Versioned JSON manifests: what a clip dataset version contains and how it was made.

Layout under a dataset root DST (pipeline.versioned is the part of it that prediction datasets share):
    DST/manifests/v000001.json          one per ingest run that changed something; written last, never overwritten
    DST/shards/part-<hash>.parquet
    DST/sources/v000001-<run>.parquet   the source videos that version 1 added, changed or removed (a delta), or all
    DST/errors/v000001-<run>.parquet    every input of version 1 that gave no clips (remembered by key and ETag)
    DST/runs/<run>.json                 a running job's record: an ingest's parts, the versions a reader reads

A manifest lists every shard of its version (not only the run's new ones), so one small file describes what a
reader needs. The source videos (a million rows for a large dataset) are not in it: they are the replay of a chain of
Parquet tables the manifest names, each a delta over the one before. A version writes only what changed, and starts a
new chain with one full table once the chain holds twice as many rows as there are sources, so storage grows with
what changed and a reader replays at most about twice the dataset's rows. Training never reads them.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.schema import SCHEMA_VERSION
from pipeline.storage import Location, Storage, parse_uri
from pipeline.versioned import (  # noqa: F401 - ManifestError and check_inside_root are this module's API too
    MANIFESTS_DIR,
    ManifestError,
    check_inside_root,
    list_manifest_versions,
    manifest_body,
    manifest_json,
    manifest_location,
    new_run_token,
    publish_manifest,
    run_table_path,
)

SHARDS_DIR = "shards"
SOURCES_DIR = "sources"
_DATASET_REF = re.compile(r"^(?P<dst>.+)@v?(?P<version>\d+|latest)$")


@dataclass(frozen=True)
class SamplingParams:
    frames: int = 8
    short_side: int = 256
    size: int = 224  # model input (crop) size; training random-crops it from the stored short_side square
    sampling: str = "uniform"
    stride: int = 16
    clips_per_video: int = 1
    # candidate frames stored per segment (uniform sampling): training picks one per segment each epoch
    frames_per_segment: int = 1

    def __post_init__(self):
        if self.size > self.short_side:
            raise ValueError(f"size ({self.size}) must not exceed short_side ({self.short_side})")
        if min(self.frames, self.size, self.stride, self.clips_per_video, self.frames_per_segment) < 1:
            raise ValueError("frames, size, stride, clips_per_video and frames_per_segment must be >= 1")
        if self.sampling not in ("uniform", "dense"):
            raise ValueError(f"sampling must be 'uniform' or 'dense', not {self.sampling!r}")
        if self.sampling == "dense" and self.frames_per_segment != 1:
            raise ValueError("frames_per_segment applies to uniform sampling only")

    @property
    def stored_frames(self) -> int:
        return self.frames * self.frames_per_segment

    @property
    def clip_shape(self) -> tuple[int, int, int, int]:
        """The shape of one stored clip: `[T * M, S, S, 3]`."""
        return (self.stored_frames, self.short_side, self.short_side, 3)

    @property
    def clip_bytes(self) -> int:
        return self.stored_frames * self.short_side * self.short_side * 3

    def pick_frames(self, clips: np.ndarray, picks: np.ndarray | None = None) -> np.ndarray:
        """Stored clips `[N, T * M, S, S, 3]` -> model clips `[N, T, S, S, 3]`: candidate `picks[n, t]` of each
        segment (training's temporal jitter), or the middle candidate when `picks` is None (evaluation)."""
        m = self.frames_per_segment
        if m == 1:
            return clips
        if picks is None:
            picks = np.full((len(clips), self.frames), m // 2)
        positions = np.arange(self.frames) * m + picks  # [N, T]
        return clips[np.arange(len(clips))[:, None], positions]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ShardEntry:
    path: str  # relative to the dataset root
    rows: int
    sha256: str
    bytes: int

    def __post_init__(self):
        check_inside_root(self.path, "shard")


@dataclass
class Manifest:
    version: int
    source: str
    sampling: SamplingParams
    labels: str  # "csv", "dirs" or "none"
    class_map: dict[str, int]
    shards: list[ShardEntry]
    # the chain of source tables ({"path", "rows"}) whose replay is this version's sources (`read_sources`)
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
        if body.get("labels") not in ("csv", "dirs", "none"):
            raise ManifestError(f"{where}: labels is {body.get('labels')!r:.80}, not csv, dirs or none")
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


def parse_dataset_ref(ref: str) -> tuple[str, int | None]:
    """`DST@3`, `DST@v3` or `DST@latest` -> (DST, 3 / None); a plain `DST` -> (DST, None)."""
    match = _DATASET_REF.match(ref)
    if not match:
        return ref, None
    version = match.group("version")
    return match.group("dst"), None if version == "latest" else int(version)


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


SOURCES_SCHEMA = pa.schema(
    [
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("uri", pa.string()),
        pa.field("etag", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("label_name", pa.string()),  # clip datasets only
        pa.field("clips", pa.int32()),  # clip datasets only
        pa.field("shard", pa.string()),
        pa.field("deleted", pa.bool_(), nullable=False),  # the video left the dataset in this version
    ]
)
# A version's sources: one row per video id, no `deleted`.
LIVE_SOURCES_SCHEMA = pa.schema([column for column in SOURCES_SCHEMA if column.name != "deleted"])


class SourceTable:
    """A version's sources (LIVE_SOURCES_SCHEMA, one row per video id, in no set order) as Arrow columns: the done-set
    that plans match listings against and commits update, by video id, without a Python object per video. At a
    million videos these columns hold about 170 MB where a dict of dicts held 1 GB (README, "A million videos")."""

    def __init__(self, table: pa.Table):
        self.table = table

    @classmethod
    def empty(cls) -> SourceTable:
        return cls(LIVE_SOURCES_SCHEMA.empty_table())

    @classmethod
    def from_rows(cls, rows: list[dict]) -> SourceTable:
        """Rows of `video_id` and any of the other columns (missing ones are null)."""
        return cls(pa.Table.from_pylist(rows, schema=LIVE_SOURCES_SCHEMA))

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def ids(self) -> pa.ChunkedArray:
        return self.table.column("video_id")

    def holding(self, ids: Iterable[str] | pa.Array | pa.ChunkedArray) -> pa.Table:
        """The rows of these video ids (those that are here)."""
        return self.table.filter(pc.is_in(self.ids, value_set=_string_array(ids)))

    def present(self, ids: Iterable[str] | pa.Array | pa.ChunkedArray) -> set[str]:
        """Which of these video ids are here."""
        return set(self.holding(ids).column("video_id").to_pylist()) if len(self) else set()

    def to_dict(self) -> dict[str, dict]:
        """video_id -> the row's other columns, in video id order (for what needs every row as Python anyway)."""
        return {row.pop("video_id"): row for row in self.table.sort_by("video_id").to_pylist()}

    def updated(self, removed: Iterable[str], upserts: pa.Table) -> tuple[SourceTable, pa.Table]:
        """The next version's sources, these without the `removed` video ids and with the rows of `upserts` (added, or
        replacing those of the same id), and the delta (SOURCES_SCHEMA, by video id) that turns these into them."""
        upserts = upserts.select(LIVE_SOURCES_SCHEMA.names).cast(LIVE_SOURCES_SCHEMA)
        upserted = upserts.column("video_id").combine_chunks()
        removed = _string_array(sorted(set(removed)))
        gone = self.holding(removed).column("video_id").combine_chunks()
        gone = gone.filter(pc.invert(pc.is_in(gone, value_set=upserted)))
        kept = self.table.filter(pc.invert(pc.is_in(self.ids, value_set=pa.concat_arrays([gone, upserted]))))
        deletions = pa.table({"video_id": gone}).cast(pa.schema([LIVE_SOURCES_SCHEMA.field("video_id")]))
        delta = pa.concat_tables(
            [_with_deleted(upserts, False), _with_deleted(deletions, True)], promote_options="default"
        ).sort_by("video_id")
        return SourceTable(pa.concat_tables([kept, upserts])), delta


def _string_array(ids: Iterable[str] | pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    return ids.cast(pa.string()) if isinstance(ids, pa.Array) else pa.array(list(ids), pa.string())


def _with_deleted(table: pa.Table, deleted: bool) -> pa.Table:
    return table.append_column(SOURCES_SCHEMA.field("deleted"), pa.array([deleted] * table.num_rows, pa.bool_()))


def read_sources(root: Location, manifest, storage: Storage) -> SourceTable:
    """The sources of one version (of a clip or a predictions dataset: a manifest with `version`, `source_tables` and
    `num_sources`), replayed from its chain of source tables."""
    live = LIVE_SOURCES_SCHEMA.empty_table()
    filesystem = storage.arrow_filesystem(root)
    for table_entry in manifest.source_tables:
        location = root.join(table_entry["path"])
        table = pq.read_table(storage.arrow_path(location), filesystem=filesystem, schema=SOURCES_SCHEMA)
        if live.num_rows:
            replaced = pc.is_in(live.column("video_id"), value_set=_string_array(table["video_id"]))
            live = live.filter(pc.invert(replaced))
        if pc.any(table["deleted"]).as_py():  # filtering copies every column: a full table has no deletions
            table = table.filter(pc.invert(table["deleted"]))
        live = pa.concat_tables([live, table.drop_columns(["deleted"])])
    if live.num_rows != manifest.num_sources:
        raise ManifestError(
            f"manifest version {manifest.version} under {root.uri} names {manifest.num_sources} sources, its source "
            f"tables hold {live.num_rows}"
        )
    return SourceTable(live)


def write_sources(
    root: Location,
    version: int,
    previous_chain: list[dict],
    sources: SourceTable,
    delta: pa.Table,
    storage: Storage,
    token: str | None = None,
) -> list[dict]:
    """Publishes version `version`'s source table (named for the run `token`, pipeline.versioned.run_table_path) and
    returns its chain: the previous chain plus `delta` (SourceTable.updated), nothing new when the delta is empty, or
    one full table of `sources` once the chain would hold more than twice their rows."""
    from pipeline.shards import publish_table

    chain = list(previous_chain)
    if delta.num_rows == 0 and chain:
        return chain
    if sum(entry["rows"] for entry in chain) + delta.num_rows > 2 * len(sources):
        chain, delta = [], _with_deleted(sources.table.sort_by("video_id"), False)
    path = run_table_path(SOURCES_DIR, version, token or new_run_token())
    publish_table(storage, root.join(path), delta, compression="zstd")
    return chain + [{"path": path, "rows": delta.num_rows}]
