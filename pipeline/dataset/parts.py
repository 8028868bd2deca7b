"""A dataset's parts: immutable Parquet files named by what they hold, each published atomically under its final
name, listed by a manifest (`ShardEntry`) with its rows, bytes and sha256. A part a killed run published is a complete
unit with a self-description in its footer, which a re-run adopts (`published_part`) instead of making it again."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.dataset.versions import check_inside_root
from pipeline.storage import Location, Storage

_HASH_CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class ShardEntry:
    path: str  # relative to the dataset root
    rows: int
    sha256: str
    bytes: int

    def __post_init__(self):
        check_inside_root(self.path, "shard")


def file_sha256(path: str) -> str:
    return stream_sha256(pafs.LocalFileSystem(), path)[1]


def stream_sha256(filesystem: pafs.FileSystem, path: str) -> tuple[int, str]:
    """(bytes, sha256) of a file read as a stream, local or remote, without holding it in memory."""
    digest, size = hashlib.sha256(), 0
    with filesystem.open_input_stream(path) as handle:
        while chunk := handle.read_buffer(_HASH_CHUNK_BYTES):
            digest.update(chunk)
            size += chunk.size
    return size, digest.hexdigest()


def publish_table(storage: Storage, final: Location, table: pa.Table, **write_options) -> tuple[int, str]:
    """Write a whole table atomically under `final`; returns (bytes, sha256) of the published file."""
    staging = storage.staging_path(final)
    try:
        pq.write_table(table, staging, **write_options)
        size, digest = os.path.getsize(staging), file_sha256(staging)
    except BaseException:
        os.unlink(staging)
        raise
    storage.commit_staged(staging, final)
    return size, digest


def measure_published(storage: Storage, location: Location) -> tuple[int, str]:
    """(bytes, sha256) of a published file, streamed when it is remote (only adopted shards need this)."""
    return stream_sha256(storage.arrow_filesystem(location), storage.arrow_path(location))


def published_part(storage: Storage, location: Location, relative: str, footer_key: bytes) -> dict | None:
    """What a published part says it holds: its footer description plus `shard` (path, rows, sha256, bytes) and
    `adopted`; None when it is gone, is not a whole Parquet file or has no description (a leftover of another writer).
    Any other error is raised rather than taken for a leftover, which would have the part decoded again (ingest) or
    its inputs scored twice (scoring): a store that refuses or cannot be reached, or a damaged footer, which an atomic
    commit never leaves."""
    try:
        metadata = pq.read_metadata(storage.arrow_path(location), filesystem=storage.arrow_filesystem(location))
    except FileNotFoundError:  # removed since it was listed
        return None
    except pa.ArrowInvalid:  # no Parquet footer: cut short, empty, or something else under a part's name
        return None
    raw = (metadata.metadata or {}).get(footer_key)
    if not raw:
        return None
    size, digest = measure_published(storage, location)
    shard = {"path": relative, "rows": metadata.num_rows, "sha256": digest, "bytes": size}
    return {**json.loads(raw), "shard": shard, "adopted": True}


def present_parts(storage: Storage, root: Location, folder: str) -> set[str]:
    """The paths, relative to `root`, of every object in its `folder`: one listing, not a request per part."""
    return {info.location.relative_to(root) for info in storage.list_objects(root.join(folder))}


def check_parts_present(storage: Storage, root: Location, paths: Iterable[str], job: str) -> None:
    """Right before a manifest names them, the parts a run wrote or adopted must still be there: a leftover of a killed
    run that a `gc` listed before this run claimed it may be gone. One listing per folder, not a request per part."""
    paths = set(paths)
    folders = {path.rsplit("/", 1)[0] for path in paths}
    present = set().union(*(present_parts(storage, root, folder) for folder in folders))
    missing = sorted(paths - present)
    if missing:
        raise RuntimeError(
            f"{len(missing)} parts of this {job} were removed while it ran ({', '.join(missing[:3])}): nothing "
            "published; re-run"
        )

