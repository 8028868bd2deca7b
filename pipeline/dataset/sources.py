"""A version's sources and the inputs a run lists against them.

The sources of a version (a million rows for a large dataset) are not in its manifest: they are the replay of a
chain of Parquet tables the manifest names, each a delta over the one before (`read_sources`). A version writes only
what changed, and starts a new chain with one full table once the chain holds twice as many rows as there are sources
(`write_sources`), so storage grows with what changed and a reader replays at most about twice the dataset's rows.

Listed inputs are split against the previous version's sources (`partition_inputs`), matched by columns: pending,
already done, and known failures (an input that gave no output is remembered by key and ETag in the version's errors
table, pipeline.dataset.failures, and tried again only when it changed or when the run asks to retry).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.dataset.parts import publish_table
from pipeline.dataset.versions import ManifestError, new_run_token, run_table_path
from pipeline.listing import VideoListing
from pipeline.schema import ErrorRecord
from pipeline.storage import Location, Storage

SOURCES_DIR = "sources"

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
    """Publishes version `version`'s source table (named for the run `token`, `run_table_path`) and
    returns its chain: the previous chain plus `delta` (SourceTable.updated), nothing new when the delta is empty, or
    one full table of `sources` once the chain would hold more than twice their rows."""
    chain = list(previous_chain)
    if delta.num_rows == 0 and chain:
        return chain
    if sum(entry["rows"] for entry in chain) + delta.num_rows > 2 * len(sources):
        chain, delta = [], _with_deleted(sources.table.sort_by("video_id"), False)
    path = run_table_path(SOURCES_DIR, version, token or new_run_token())
    publish_table(storage, root.join(path), delta, compression="zstd")
    return chain + [{"path": path, "rows": delta.num_rows}]


# ---- inputs --------------------------------------------------------------------------------------------------------
@dataclass
class InputPartition:
    pending: Sequence
    already_done: Sequence
    known_failures: list[ErrorRecord]  # earlier failures of inputs unchanged since, not tried again


def partition_inputs(
    inputs: Sequence,
    done: SourceTable,
    compared: Sequence[str],
    failures: dict[tuple[str, str], ErrorRecord],
    retry_errors: bool = False,
) -> InputPartition:
    """Split listed inputs (SourceVideo, as a pipeline.listing.VideoListing or a list) against `done`, the previous
    version's SourceTable: already done (its video id is there with the same `compared` columns), known failures
    (`failures`, keyed by pipeline.dataset.failures.failure_key, holds the same key and ETag; unless `retry_errors`),
    and pending, both as selections of the listing. The match is a join of columns: a million done videos are never a
    million Python objects."""
    listing = VideoListing.of(inputs)
    unchanged = np.zeros(len(listing), dtype=bool)
    if len(done):
        at = pc.index_in(listing.column("video_id"), value_set=done.ids.combine_chunks().cast(pa.large_string()))
        matched = pc.is_valid(at)
        for name in compared:
            ours = listing.column(name)
            theirs = done.table.column(name).take(at).cast(ours.type)
            same = pc.or_(pc.fill_null(pc.equal(ours, theirs), False), pc.and_(pc.is_null(ours), pc.is_null(theirs)))
            matched = pc.and_(matched, same)
        unchanged = np.asarray(matched.to_numpy(zero_copy_only=False), dtype=bool)
    pending, known_failures = ~unchanged, []
    if failures and not retry_errors:
        failed_uris = pa.array(sorted({uri for uri, _ in failures}), pa.large_string())
        maybe = pc.and_(pa.array(pending), pc.is_in(listing.column("uri"), value_set=failed_uris))
        for position in np.flatnonzero(maybe.to_numpy(zero_copy_only=False)):
            video = listing[int(position)]
            failure = failures.get((video.uri, video.etag))
            if failure is not None:
                known_failures.append(failure)
                pending[position] = False
    return InputPartition(listing.take(np.flatnonzero(pending)), listing.take(np.flatnonzero(unchanged)),
                          known_failures)


def deleted_inputs(done: SourceTable, listed: Sequence, keep_deleted: bool = False) -> set[str]:
    """Video ids of the previous version (`done`, a SourceTable) that the source no longer lists:
    they leave the next version, unless `keep_deleted`."""
    if keep_deleted or not len(done):
        return set()
    listed_ids = VideoListing.of(listed).column("video_id").combine_chunks().cast(pa.string())
    return set(done.ids.filter(pc.invert(pc.is_in(done.ids, value_set=listed_ids))).to_pylist())
