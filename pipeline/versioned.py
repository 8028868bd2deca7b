"""The versioned-dataset core that clip datasets (pipeline.ingest) and prediction datasets (jobs.scoring.results) share.

A dataset root holds immutable parts (Parquet files named by what they hold), per-version tables (errors, sources)
and one JSON manifest per version, published last and if-absent: the manifest is the only thing that makes a part
visible. Around that contract this module keeps what both kinds of dataset do alike:

    versions          manifests/vNNNNNN.json, numbered from 1, never overwritten (`publish_manifest`)
    inputs            listed inputs -> pending, already done, known failures (`partition_inputs`), matched by columns
                      against the previous version's sources (pipeline.manifest.SourceTable, a chain of delta tables
                      the manifest names): an input that gave no output is remembered by key and ETag in the
                      version's errors table, and tried again only when it changed or when the run asks to retry
    run tables        a version's tables get names unique to the run that wrote them (`run_table_path`), so a run
                      that loses the race for a version number never overwrites the winner's tables
    adoption          a part a killed run published is taken over from the description in its footer (`published_part`)
    running jobs      a run record (`RunRecord`): heartbeat, the parts a run may publish or adopt, and the versions
                      a reader (training, evaluation) reads (`reading_versions`)
    garbage           `collect_garbage` removes what no kept version and no running job refers to
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.listing import VideoListing
from pipeline.schema import ERRORS_SCHEMA, ErrorRecord, errors_table
from pipeline.shards import measure_published, publish_table
from pipeline.storage import Location, ObjectInfo, Storage

if TYPE_CHECKING:  # pipeline.manifest imports this module
    from pipeline.manifest import SourceTable

MANIFESTS_DIR = "manifests"
RUNS_DIR = "runs"
ERRORS_DIR = "errors"
# What a dataset root may hold besides manifests and run records: the folders `collect_garbage` sweeps.
DATA_DIRS = ("shards", "predictions", "sources", "errors")
_MANIFEST_NAME = re.compile(r"^v(\d{6,})\.json$")
# Files a running job wrote shortly before the run record it started with are left alone too (clock skew).
_RUN_START_MARGIN_S = 300.0

log = logging.getLogger(__name__)


class ManifestError(RuntimeError):
    """No manifest, an unreadable one, or a dataset that does not match its manifest."""


# ---- manifests -----------------------------------------------------------------------------------------------------
# What every manifest, of a clip or a predictions dataset, holds for readers and gc, with the type of each value
_MANIFEST_KEYS = {"version": int, "shards": list, "source_tables": list, "num_sources": int}
_PART_KEYS = {"path": str, "rows": int, "sha256": str, "bytes": int}
_TABLE_KEYS = {"path": str, "rows": int}


def check_inside_root(path: str, what: str) -> None:
    """Refuse a path a manifest names (a shard, a source or errors table) unless it stays inside the dataset root:
    relative, `/`-separated, without `..`, and not a URI. A manifest that could point anywhere would let whoever
    writes one make readers load, and gc delete, objects of other datasets or buckets."""
    if not isinstance(path, str) or "://" in path or "\\" in path or {"", ".", ".."} & set(path.split("/")):
        raise ManifestError(
            f"the manifest names {what} {path!r}, which is not a relative path inside the dataset root (no leading "
            "'/', '..', '.', empty parts, backslashes or URIs): refused; the manifest was not written by uniformer "
            "or was edited"
        )



def manifest_json(text: bytes | str, where: str) -> dict:
    """The JSON object in a manifest file; ManifestError naming `where` when it is not JSON or not an object."""
    try:
        body = json.loads(text)
    except ValueError as error:  # a UnicodeDecodeError too
        raise ManifestError(f"{where} is not valid JSON ({error}): the manifest is damaged") from None
    if not isinstance(body, dict):
        raise ManifestError(f"{where} holds a JSON {type(body).__name__}, not a manifest's object")
    return body


def manifest_body(text: bytes | str | dict, where: str, kind: type | None = None, what: str = "") -> dict:
    """A manifest's object (`manifest_json`) with what readers and gc rely on checked: its version, parts, chain of
    source tables and errors table, each of the right type and inside the root, and with `kind` (the manifest's
    dataclass, `what` naming it in messages) no key that class lacks. A manifest that lacks or mistypes one of them is
    a ManifestError naming `where`, never a KeyError or TypeError later."""
    body = text if isinstance(text, dict) else manifest_json(text, where)
    if kind is not None:
        unknown = set(body) - {item.name for item in fields(kind)}
        if unknown:
            raise ManifestError(f"{where} has keys a {what} does not: {', '.join(sorted(unknown))}")
    _check_keys(body, _MANIFEST_KEYS, where, "")
    for index, part in enumerate(body["shards"]):
        _check_keys(part, _PART_KEYS, where, f"shards[{index}].")
        check_inside_root(part["path"], "shard")
    for index, table in enumerate(body["source_tables"]):
        _check_keys(table, _TABLE_KEYS, where, f"source_tables[{index}].")
        check_inside_root(table["path"], "source table")
    if body.get("errors") is not None:
        check_inside_root(body["errors"], "errors table")
    return body


def _check_keys(body, kinds: dict[str, type], where: str, prefix: str) -> None:
    if not isinstance(body, dict):
        raise ManifestError(f"{where}: {prefix.rstrip('.')} is a {type(body).__name__}, not an object")
    for key, kind in kinds.items():
        if key not in body:
            raise ManifestError(f"{where} lacks {prefix}{key}: the manifest is incomplete or was not written by uniformer")
        if not isinstance(body[key], kind) or isinstance(body[key], bool):
            raise ManifestError(f"{where}: {prefix}{key} is {body[key]!r}, not {kind.__name__}")


# ---- versions ------------------------------------------------------------------------------------------------------
def manifest_location(root: Location, version: int) -> Location:
    return root.join(MANIFESTS_DIR, f"v{version:06d}.json")


def list_manifest_versions(root: Location, storage: Storage) -> list[int]:
    versions = []
    for info in storage.list_objects(root.join(MANIFESTS_DIR)):
        match = _MANIFEST_NAME.match(_basename(info.location))
        if match:
            versions.append(int(match.group(1)))
    return sorted(versions)


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


def new_run_token() -> str:
    return uuid.uuid4().hex[:12]


def run_table_path(folder: str, version: int, token: str) -> str:
    """Where a run that writes `version` puts one of its tables: a name no other run uses, so that of two runs
    racing for one version number the loser's table never replaces the winner's (the manifest names the table)."""
    return f"{folder}/v{version:06d}-{token}.parquet"


# ---- inputs and failures -------------------------------------------------------------------------------------------
def failure_key(record: ErrorRecord) -> tuple[str, str]:
    return record.source_uri, record.source_etag


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
    version's pipeline.manifest.SourceTable: already done (its video id is there with the same `compared` columns),
    known failures (`failures`, keyed by `failure_key`, holds the same key and ETag; unless `retry_errors`), and
    pending, both as selections of the listing. The match is a join of columns: a million done videos are never a
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
    """Video ids of the previous version (`done`, a pipeline.manifest.SourceTable) that the source no longer lists:
    they leave the next version, unless `keep_deleted`."""
    if keep_deleted or not len(done):
        return set()
    listed_ids = VideoListing.of(listed).column("video_id").combine_chunks().cast(pa.string())
    return set(done.ids.filter(pc.invert(pc.is_in(done.ids, value_set=listed_ids))).to_pylist())


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


def check_accounting(counts: dict[str, int], done_keys: tuple[str, ...], job: str) -> None:
    """listed = the sum of `done_keys` counts (every input accounted for once); a mismatch is a bug, not bad input."""
    if counts["listed"] != sum(counts[key] for key in done_keys):
        raise RuntimeError(f"{job} lost track of inputs: {counts}")


def nothing_new_line(counts: dict[str, int], done_word: str) -> str:
    return (
        f"nothing new: {counts['listed']} listed, {counts['already_done']} already {done_word}, "
        f"{counts['known_failures']} known failures"
    )


# ---- adoption ------------------------------------------------------------------------------------------------------
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


def check_parts_present(storage: Storage, root: Location, paths: Iterable[str], job: str) -> None:
    """Right before a manifest names them, the parts a run wrote or adopted must still be there: a leftover of a killed
    run that a `gc` listed before this run claimed it may be gone. One listing per folder, not a request per part."""
    paths = set(paths)
    folders = {path.rsplit("/", 1)[0] for path in paths}
    present = {info.location.relative_to(root) for folder in folders for info in storage.list_objects(root.join(folder))}
    missing = sorted(paths - present)
    if missing:
        raise RuntimeError(
            f"{len(missing)} parts of this {job} were removed while it ran ({', '.join(missing[:3])}): nothing "
            "published; re-run"
        )


# ---- running jobs --------------------------------------------------------------------------------------------------
class RunRecord:
    """A running job's record under `DST/runs/`: when it started, until when it is alive (renewed in the background),
    the parts it may publish or adopt, and the versions it reads. `collect_garbage` removes nothing a live record
    claims, no version it reads (nor anything that version names), and nothing written after the start of the oldest
    live writer. Written before the run looks at any part, removed at its end; a killed run's record expires."""

    def __init__(self, storage: Storage, root: Location, job: str, ttl_s: float = 600.0, reads: Iterable[int] = ()):
        self.storage, self.job, self.ttl_s = storage, job, ttl_s
        self.token = new_run_token()
        self.location = root.join(RUNS_DIR, f"{self.token}.json")
        self.started_at = time.time()
        self.parts: list[str] = []
        self.reads = sorted(set(reads))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._renewal: threading.Thread | None = None

    def _write(self) -> None:
        with self._lock:
            body = {"job": self.job, "started_at": self.started_at, "expires_at": time.time() + self.ttl_s,
                    "parts": self.parts, "reads": self.reads}
            self.storage.put_bytes(self.location, json.dumps(body).encode("utf-8"))

    def claim(self, parts: Iterable[str]) -> None:
        """Add parts (relative paths) this run may publish or adopt; written before it looks at them."""
        self.parts = sorted(set(self.parts) | set(parts))
        self._write()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self._write()
            except Exception:  # a store that failed once is tried again next time; the record lasts ttl_s meanwhile
                continue

    def __enter__(self) -> RunRecord:
        self._write()
        self._renewal = threading.Thread(target=self._renew, name=f"run record {self.token}", daemon=True)
        self._renewal.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._renewal.join()
        self.storage.delete(self.location)


@contextlib.contextmanager
def reading_versions(storage: Storage, reads: Iterable[tuple[Location, int]], job: str,
                     error: type[Exception]) -> Iterator[None]:
    """While the body runs, a run record under each dataset root names the versions this `job` reads (`reads`:
    (dataset root, version) pairs), so that `collect_garbage` keeps them and everything they name. The versions are
    resolved before, so each is checked to be still there once its record is written: a gc that removed one in
    between fails the job with `error`, before it read anything of it.

    A dataset the job may read but not write (read-only credentials, a read-only mount) gets no record, and a warning
    says what gc may then do: the job goes on rather than demand write access that reading never needed."""
    by_root: dict[str, tuple[Location, set[int]]] = {}
    for root, version in reads:
        by_root.setdefault(root.uri, (root, set()))[1].add(version)
    with contextlib.ExitStack() as records:
        for root, versions in by_root.values():
            record = RunRecord(storage, root, job, reads=versions)
            try:
                records.enter_context(record)
            except OSError as refused:
                if not isinstance(refused, PermissionError) and refused.errno != errno.EROFS:
                    raise
                what = _version_list(versions)
                log.warning(
                    "this %s may not write %s (%s), so no record keeps %s of %s from gc: `uniformer gc %s "
                    "--keep-versions N` removes %s while this %s runs as soon as N newer versions exist, and the %s "
                    "then fails on a missing file. Allow writes under %s/ to protect it.", job, record.location.uri,
                    type(refused).__name__, what, root.uri, root.uri, what, job, job, root.join(RUNS_DIR).uri,
                )
                continue
            gone = [version for version in sorted(versions) if not storage.exists(manifest_location(root, version))]
            if gone:
                raise error(
                    f"{_version_list(gone)} of {root.uri} was removed (uniformer gc) before this {job} began to read "
                    "it: re-run to read a version gc keeps"
                )
        yield


def _version_list(versions: Iterable[int]) -> str:
    versions = sorted(versions)
    return f"version{'s' if len(versions) > 1 else ''} {', '.join(map(str, versions))}"


def live_runs(root: Location, storage: Storage, now: float) -> tuple[list[dict], list[ObjectInfo]]:
    """(live run records, expired record files) under `root`."""
    live, expired = [], []
    for info in storage.list_objects(root.join(RUNS_DIR)):
        try:
            body = json.loads(storage.read_bytes(info.location))
        except FileNotFoundError:
            continue  # the run ended while we listed
        except ValueError:
            expired.append(info)  # not a record: nothing can be alive in it
            continue
        if body.get("expires_at", 0) > now:
            live.append(body)
        else:
            expired.append(info)
    return live, expired


# ---- garbage -------------------------------------------------------------------------------------------------------
@dataclass
class GarbageReport:
    kept_versions: list[int]  # the newest, as asked
    dropped_versions: list[int]
    read_versions: list[int] = field(default_factory=list)  # older, kept because a running job reads them
    removed: list[tuple[str, int]] = field(default_factory=list)  # (path relative to the root, bytes)
    protected: list[str] = field(default_factory=list)  # unreferenced, but a running job's or younger than min_age
    dry_run: bool = False

    @property
    def bytes_freed(self) -> int:
        return sum(size for _, size in self.removed)

    def lines(self) -> list[str]:
        verb = "would remove" if self.dry_run else "removed"
        lines = [f"{verb} {path} ({size:,} bytes)" for path, size in self.removed]
        kept = ", ".join(f"v{version:06d}" for version in self.kept_versions) or "none"
        lines.append(f"gc: kept versions {kept}; {verb} {len(self.removed)} files, "
                     f"{self.bytes_freed:,} bytes {'to free' if self.dry_run else 'freed'}")
        if self.read_versions:
            read = ", ".join(f"v{version:06d}" for version in self.read_versions)
            lines.append(f"gc: kept {read} too, and all it names: a running job reads it")
        if self.protected:
            lines.append(f"gc: left {len(self.protected)} unreferenced files that a running job may use or that are "
                         "younger than --min-age")
        return lines


def manifest_references(body: dict) -> set[str]:
    """Every path (relative to the root) a manifest names: parts, source tables, the errors table."""
    paths = {shard["path"] for shard in body.get("shards", [])}
    paths |= {table["path"] for table in body.get("source_tables", [])}
    if body.get("errors"):
        paths.add(body["errors"])
    return paths


def collect_garbage(
    root: Location, storage: Storage, keep_versions: int, dry_run: bool = False, min_age_s: float = 3600.0,
    now: float | None = None,
) -> GarbageReport:
    """Keep the newest `keep_versions` manifests, every version a live run record reads, and everything they name;
    remove older manifests, then every part, table and staging file under the data folders that no kept manifest
    names, except files a live run record claims, files written after the oldest live writer started (they may be its
    parts), and files younger than `min_age_s`. On S3 incomplete multipart uploads below the root are aborted by the
    same rules.

    The files are listed before the run records are read: a run that starts after that writes only files this pass
    did not list, and checks before it publishes that the leftovers it adopted are still there. The records are read
    again once the older manifests are gone: a reader that recorded one of those versions in between (it checks, after
    writing its record, that its versions are still there) has its manifest put back and everything it names kept."""
    if keep_versions < 1:
        raise ValueError("keep_versions must be >= 1: the newest version is always kept")
    now = time.time() if now is None else now
    versions = list_manifest_versions(root, storage)
    files = [(info, None) for folder in (*DATA_DIRS, MANIFESTS_DIR) for info in storage.list_objects(root.join(folder))]
    files += list(storage.incomplete_uploads(root))  # on S3, the staging of killed (or running) writers
    live, expired = live_runs(root, storage, now)
    read = _versions_read(live)
    kept = versions[-keep_versions:]
    dropped = [version for version in versions[:-keep_versions] if version not in read]
    manifests = {version: storage.read_bytes(manifest_location(root, version)) for version in versions}
    bodies = _checked_manifests(root, storage, manifests, [*kept, *read], files)
    report = GarbageReport(kept, dropped, [version for version in versions[:-keep_versions] if version in read],
                           dry_run=dry_run)
    # the dropped manifests first, so that readers stop seeing those versions
    for version in dropped:
        if not dry_run:
            storage.delete(manifest_location(root, version))
        report.removed.append((manifest_location(root, version).relative_to(root), len(manifests[version])))
    if dropped and not dry_run:
        late, _ = live_runs(root, storage, now)
        for version in sorted(_versions_read(late) & set(dropped)):
            try:
                storage.put_bytes(manifest_location(root, version), manifests[version], if_absent=True)
            except FileExistsError:
                pass
            report.dropped_versions.remove(version)
            report.read_versions = sorted({*report.read_versions, version})
            report.removed.remove((manifest_location(root, version).relative_to(root), len(manifests[version])))
        live += late
    referenced: set[str] = set()
    for version in (*report.kept_versions, *report.read_versions):
        referenced |= manifest_references(bodies[version])
    claimed = {path for run in live for path in run.get("parts", [])}
    # a reader (a record of versions read, no parts) writes nothing, so it holds back no young file
    writers = [run for run in live if run.get("parts") or not run.get("reads")]
    cutoff = min([now - min_age_s] + [run["started_at"] - _RUN_START_MARGIN_S for run in writers])
    # (location, bytes, multipart upload id)
    removals = []
    for info, upload_id in files:
        if not _unreferenced(info, root, referenced):
            continue
        relative = info.location.relative_to(root)
        if relative in claimed or _modified(info) > cutoff:
            report.protected.append(relative)
        else:
            removals.append((info.location, info.size, upload_id))
    removals += [(info.location, info.size, None) for info in expired]
    for location, size, upload_id in removals:
        if dry_run:
            pass
        elif upload_id:
            storage.abort_upload(location, upload_id)
        else:
            storage.delete(location)
        relative = location.relative_to(root)
        report.removed.append((f"{relative} (incomplete upload)" if upload_id else relative, size))
    return report


def _checked_manifests(root: Location, storage: Storage, manifests: dict[int, bytes], whole: Iterable[int],
                       files: list[tuple[ObjectInfo, str | None]]) -> dict[int, dict]:
    """Every manifest's checked body (`manifest_body`); for the versions in `whole` (those gc keeps) also their chain
    of source tables, replayed, and every file they name, present. gc deletes by what the manifests name: one it could
    not read whole would make it delete what a kept version needs, so any fault stops it before it deletes anything."""
    from types import SimpleNamespace

    from pipeline.manifest import read_sources  # pipeline.manifest imports this module

    present = {info.location.relative_to(root) for info, upload_id in files if upload_id is None}
    bodies = {}
    for version, raw in manifests.items():
        where = manifest_location(root, version).uri
        try:
            bodies[version] = body = manifest_body(raw, where)
            if body["version"] != version:
                raise ManifestError(f"{where} says it is version {body['version']}")
            if version not in whole:
                continue
            missing = sorted(manifest_references(body) - present)
            if missing:
                raise ManifestError(f"{where} names {len(missing)} file(s) that are not there: {', '.join(missing[:3])}")
            try:
                read_sources(root, SimpleNamespace(**{key: body[key] for key in _SOURCE_KEYS}), storage)
            except (OSError, ValueError, pa.ArrowException) as error:
                raise ManifestError(f"{where}: its chain of source tables cannot be read ({type(error).__name__}: "
                                    f"{error})") from None
        except ManifestError as error:
            raise ManifestError(f"{error}. gc deleted nothing: restore or repair that version (or remove its manifest "
                                "by hand if it is not wanted), then run gc again") from None
    return bodies


_SOURCE_KEYS = ("version", "source_tables", "num_sources")  # what read_sources needs of a manifest


def _versions_read(runs: list[dict]) -> set[int]:
    return {version for run in runs for version in run.get("reads", [])}


def _unreferenced(info: ObjectInfo, root: Location, referenced: set[str]) -> bool:
    relative = info.location.relative_to(root)
    if relative.startswith(f"{MANIFESTS_DIR}/"):
        return _basename(info.location).startswith(".tmp-")  # manifests are removed by version, staging by age
    return relative not in referenced


def _modified(info: ObjectInfo) -> float:
    return info.modified if info.modified is not None else float("inf")


def _basename(location: Location) -> str:
    return os.path.basename(location.path.replace("\\", "/"))
