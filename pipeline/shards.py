"""Writing one Parquet shard of clips atomically, with a self-description in its footer.

The footer's key-value metadata (`uniformer.ingest`) records the sources the shard was made from, their clip counts
and the errors met while making it. A shard left behind by a killed run is therefore a complete, verifiable unit that
a re-run can adopt instead of decoding its videos again.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.schema import MAX_ROW_GROUP_CLIPS, clip_schema, frames_array
from pipeline.storage import Location, Storage

if TYPE_CHECKING:  # pipeline.manifest imports pipeline.versioned, which imports this module
    from pipeline.manifest import SourceTable

FOOTER_KEY = b"uniformer.ingest"
_HASH_CHUNK_BYTES = 8 << 20


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


def parquet_write_options(schema: pa.Schema) -> dict:
    """How clip tables are written by `pq.write_table` (ShardWriter passes the same to its ParquetWriter, which takes
    the row group size per write instead). zstd level 1 over the fixed-size binary frames reads at about 1 ms of CPU per
    8x256x256 clip (0.5 ms uncompressed; schema 1's list encoding took 10) and stores smooth content at a third of its
    raw size (benchmarks/read.py). Min/max statistics of pixel bytes would serve no reader, so only small columns
    get them, and dictionaries."""
    small_columns = [name for name in schema.names if name != "frames"]
    return {
        "compression": "zstd",
        "compression_level": 1,
        "use_dictionary": small_columns,
        "write_statistics": small_columns,
        "row_group_size": MAX_ROW_GROUP_CLIPS,
    }


class ShardWriter:
    """Appends clips of one video at a time to a staged Parquet file; `commit` publishes it under its final name."""

    def __init__(self, storage: Storage, final: Location, frames: int, short_side: int):
        self.storage = storage
        self.final = final
        self.schema = clip_schema(frames, short_side)
        self.staging = storage.staging_path(final)
        options = parquet_write_options(self.schema)
        del options["row_group_size"]
        self._writer = pq.ParquetWriter(self.staging, self.schema, **options)
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self.rows = 0

    def add_video(
        self,
        clips: np.ndarray,
        frame_indices: np.ndarray,
        video_id: str,
        source_uri: str,
        source_etag: str,
        label: int | None,
        label_name: str | None,
        fps: float,
        padded: bool,
    ) -> None:
        count = clips.shape[0]
        batch = pa.RecordBatch.from_arrays(
            [
                pa.array([video_id] * count, pa.string()),
                pa.array([source_uri] * count, pa.string()),
                pa.array([source_etag] * count, pa.string()),
                pa.array(np.arange(count, dtype=np.int32)),
                pa.array([label] * count, pa.int32()),
                pa.array([label_name] * count, pa.string()),
                frames_array(clips),
                pa.array([row.tolist() for row in frame_indices], pa.list_(pa.int32())),
                pa.array([fps] * count, pa.float32()),
                pa.array([padded] * count, pa.bool_()),
            ],
            schema=self.schema,
        )
        self._pending.append(batch)
        self._pending_rows += count
        self.rows += count
        if self._pending_rows >= MAX_ROW_GROUP_CLIPS:
            self._flush(whole_groups_only=True)

    def _flush(self, whole_groups_only: bool = False) -> None:
        """Writes the pending clips as row groups of MAX_ROW_GROUP_CLIPS; with `whole_groups_only`, a remainder
        waits for the next video, so that only a shard's last row group is short."""
        if not self._pending:
            return
        table = pa.Table.from_batches(self._pending, schema=self.schema)
        cut = table.num_rows - table.num_rows % MAX_ROW_GROUP_CLIPS if whole_groups_only else table.num_rows
        self._writer.write_table(table.slice(0, cut), row_group_size=MAX_ROW_GROUP_CLIPS)
        rest = table.slice(cut)
        self._pending, self._pending_rows = (rest.to_batches(), rest.num_rows) if rest.num_rows else ([], 0)

    def commit(self, description: dict) -> tuple[int, str]:
        """Close, publish atomically, and return (bytes, sha256) of the published file."""
        self._flush()
        self._writer.add_key_value_metadata({FOOTER_KEY: json.dumps(description, ensure_ascii=False)})
        self._writer.close()
        size, digest = os.path.getsize(self.staging), file_sha256(self.staging)
        self.storage.commit_staged(self.staging, self.final)
        return size, digest

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            if os.path.exists(self.staging):
                os.unlink(self.staging)


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


def read_shard_description(storage: Storage, location: Location) -> tuple[int, dict] | None:
    """(rows, footer description) of a published shard, or None when its footer has no description."""
    metadata = pq.read_metadata(storage.arrow_path(location), filesystem=storage.arrow_filesystem(location))
    raw = (metadata.metadata or {}).get(FOOTER_KEY)
    return (metadata.num_rows, json.loads(raw)) if raw else None


def measure_published(storage: Storage, location: Location) -> tuple[int, str]:
    """(bytes, sha256) of a published file, streamed when it is remote (only adopted shards need this)."""
    return stream_sha256(storage.arrow_filesystem(location), storage.arrow_path(location))


def rewrite_without_videos(
    storage: Storage,
    root: Location,
    shards: list,
    sources: SourceTable,
    superseded: set[str],
    folder: str,
    write_options: dict,
    keep_footer: bool = True,
) -> tuple[list, pa.Table]:
    """Copy-on-write of a versioned dataset: each listed shard holding rows of a `superseded` video is rewritten
    without them under a new content-derived name in `folder`, so that every row of every listed shard stays
    current and readers need no filtering. `sources` are the version's. Returns the shard list and the source rows
    of the videos that moved to a rewritten shard (their `shard` updated), for SourceTable.updated.
    `keep_footer=False` drops the old footer when it describes what the shard held before."""
    from pipeline.manifest import ShardEntry

    affected = set(sources.holding(superseded).column("shard").to_pylist())
    kept, moved_to = [], {}
    for shard in shards:
        if shard.path not in affected:
            kept.append(shard)
            continue
        old = root.join(shard.path)
        table = pq.read_table(storage.arrow_path(old), filesystem=storage.arrow_filesystem(old))
        remaining = table.filter(pa.array([v not in superseded for v in table.column("video_id").to_pylist()]))
        if remaining.num_rows == 0:
            continue
        remaining_ids = sorted(set(remaining.column("video_id").to_pylist()))
        identity = json.dumps([shard.path, remaining_ids], ensure_ascii=False).encode("utf-8")
        path = f"{folder}/part-{hashlib.sha256(identity).hexdigest()[:24]}.parquet"
        if not keep_footer:
            remaining = remaining.replace_schema_metadata(None)
        size, digest = publish_table(storage, root.join(path), remaining, **write_options)
        kept.append(ShardEntry(path, remaining.num_rows, digest, size))
        moved_to.update((video_id, path) for video_id in remaining_ids)
    moved = sources.holding(list(moved_to))
    new_shards = pa.array([moved_to[video_id] for video_id in moved.column("video_id").to_pylist()], pa.string())
    return kept, moved.set_column(moved.schema.get_field_index("shard"), "shard", new_shards)
