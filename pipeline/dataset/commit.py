"""Committing a version: from what a run made (new parts, the sources they hold, failures) to the next version's
tables and manifest, the same for a clip and a predictions dataset (`commit_version`). Parts of the previous version
that hold rows of superseded inputs are rewritten without them (`rewrite_without_videos`), so every row of every
listed part stays current and readers need no filtering."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from typing import TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.dataset.failures import failures_changed, publish_failures, version_failures
from pipeline.dataset.parts import ShardEntry, check_parts_present, publish_table
from pipeline.dataset.sources import SourceTable, write_sources
from pipeline.dataset.versions import new_run_token
from pipeline.schema import ErrorRecord
from pipeline.storage import Location, Storage

M = TypeVar("M")


def check_accounting(counts: dict[str, int], done_keys: tuple[str, ...], job: str) -> None:
    """listed = the sum of `done_keys` counts (every input accounted for once); a mismatch is a bug, not bad input."""
    if counts["listed"] != sum(counts[key] for key in done_keys):
        raise RuntimeError(f"{job} lost track of inputs: {counts}")


def nothing_new_line(counts: dict[str, int], done_word: str) -> str:
    return (
        f"nothing new: {counts['listed']} listed, {counts['already_done']} already {done_word}, "
        f"{counts['known_failures']} known failures"
    )


def rewrite_without_videos(
    storage: Storage,
    root: Location,
    shards: list[ShardEntry],
    sources: SourceTable,
    superseded: set[str],
    folder: str,
    write_options: dict,
    keep_footer: bool = True,
) -> tuple[list[ShardEntry], pa.Table]:
    """Copy-on-write of a versioned dataset: each listed shard holding rows of a `superseded` video is rewritten
    without them under a new content-derived name in `folder`, so that every row of every listed shard stays
    current and readers need no filtering. `sources` are the version's. Returns the shard list and the source rows
    of the videos that moved to a rewritten shard (their `shard` updated), for SourceTable.updated.
    `keep_footer=False` drops the old footer when it describes what the shard held before."""
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


def commit_version(
    storage: Storage,
    root: Location,
    previous,
    previous_sources: SourceTable,
    *,
    new_shards: list[ShardEntry],
    upserts: pa.Table,
    superseded: set[str],
    known_failures: Iterable[ErrorRecord],
    errors: list[ErrorRecord],
    previous_failures: dict[tuple[str, str], ErrorRecord],
    folder: str,
    write_options: dict,
    job: str,
    manifest: Callable[..., M],
    keep_footer: bool = True,
    restart: bool = False,
) -> M | None:
    """The next version of the dataset at `root` after `previous` (its manifest, None for a first run), or None when
    nothing changed: no new parts (`new_shards`, whose sources are `upserts`, LIVE_SOURCES_SCHEMA columns), nothing
    `superseded` (video ids whose rows of the previous version leave it), the same failures, and no `restart`.

    The previous version's parts that hold superseded rows are rewritten without them in `folder` (`write_options`,
    `keep_footer`: rewrite_without_videos); the new parts are checked to be still there; then the version's errors
    table (the `known_failures` carried over and the run's new `errors`) and its source table are published under
    names unique to this run. `manifest(version=, previous_version=, shards=, source_tables=, num_sources=, errors=)`,
    the dataset kind's hook, builds the manifest from them; it is returned, not yet written. With `restart`, the
    version holds none of the previous version's parts or sources (a new model scores every video again). `job` names
    the run in messages."""
    failures = version_failures(known_failures, errors)
    changed = restart or new_shards or superseded or failures_changed(previous_failures, failures)
    if previous is not None and not changed:
        return None  # nothing new: the previous version still describes the dataset

    kept_shards = list(previous.shards) if previous and not restart else []
    if superseded:
        kept_shards, moved = rewrite_without_videos(
            storage, root, kept_shards, previous_sources, superseded, folder, write_options, keep_footer
        )
        upserts = pa.concat_tables([moved, upserts])
    check_parts_present(storage, root, [shard.path for shard in new_shards], job)
    version, token = (previous.version if previous else 0) + 1, new_run_token()
    errors_path = publish_failures(storage, root, version, token, failures)
    sources, delta = previous_sources.updated(superseded, upserts)
    chain = previous.source_tables if previous and not restart else []
    return manifest(
        version=version,
        previous_version=previous.version if previous else None,
        shards=kept_shards + new_shards,
        source_tables=write_sources(root, version, chain, sources, delta, storage, token),
        num_sources=len(sources),
        errors=errors_path,
    )
