"""Garbage: `collect_garbage` removes the versions older than those kept, and every file under a dataset's data
folders that no kept version names and no running job (pipeline.dataset.runs) may use."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import SimpleNamespace

import pyarrow as pa

from pipeline.dataset.runs import live_runs
from pipeline.dataset.sources import read_sources
from pipeline.dataset.versions import (
    MANIFESTS_DIR,
    ManifestError,
    basename,
    list_manifest_versions,
    manifest_body,
    manifest_location,
    manifest_references,
)
from pipeline.storage import Location, ObjectInfo, Storage

# What a dataset root may hold besides manifests and run records: the folders `collect_garbage` sweeps.
DATA_DIRS = ("shards", "predictions", "sources", "errors")
# Files a running job wrote shortly before the run record it started with are left alone too (clock skew).
_RUN_START_MARGIN_S = 300.0


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
        return basename(info.location).startswith(".tmp-")  # manifests are removed by version, staging by age
    return relative not in referenced


def _modified(info: ObjectInfo) -> float:
    return info.modified if info.modified is not None else float("inf")

