"""A version's failures: every input that gave no output, remembered by key and ETag in the version's errors table
(`errors/vNNNNNN-<run>.parquet`), so that the next run leaves it alone until it changes or the run asks to retry."""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow.parquet as pq

from pipeline.dataset.parts import publish_table
from pipeline.dataset.versions import run_table_path
from pipeline.schema import ERRORS_SCHEMA, ErrorRecord, errors_table
from pipeline.storage import Location, Storage

ERRORS_DIR = "errors"


def failure_key(record: ErrorRecord) -> tuple[str, str]:
    return record.source_uri, record.source_etag


def read_failures(root: Location, errors_path: str | None, storage: Storage) -> dict[tuple[str, str], ErrorRecord]:
    """The failures a version remembers (its errors table), by key and ETag."""
    if not errors_path:
        return {}
    location = root.join(errors_path)
    table = pq.read_table(storage.arrow_path(location), filesystem=storage.arrow_filesystem(location),
                          schema=ERRORS_SCHEMA)
    return {failure_key(record): record for record in (ErrorRecord(**row) for row in table.to_pylist())}


def version_failures(known: Iterable[ErrorRecord], new: Iterable[ErrorRecord]) -> list[ErrorRecord]:
    """A version's errors table: the known failures it carries over and the run's new ones (a new record replaces a
    known one of the same input), in key order."""
    merged = {failure_key(record): record for record in known}
    merged.update((failure_key(record), record) for record in new)
    return [merged[key] for key in sorted(merged)]


def failures_changed(previous: dict[tuple[str, str], ErrorRecord], current: list[ErrorRecord]) -> bool:
    def what(record: ErrorRecord) -> tuple:
        return record.source_uri, record.source_etag, record.stage, record.error_type

    return {what(record) for record in previous.values()} != {what(record) for record in current}


def publish_failures(storage: Storage, root: Location, version: int, token: str,
                     failures: list[ErrorRecord]) -> str | None:
    """Publish a version's errors table under a name unique to this run; its relative path, None when empty."""
    if not failures:
        return None
    path = run_table_path(ERRORS_DIR, version, token)
    publish_table(storage, root.join(path), errors_table(failures))
    return path
