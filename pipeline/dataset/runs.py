"""Running jobs: a run record under `runs/` says that a job is alive (renewed in the background), which parts it may
publish or adopt, and which versions it reads, so that gc (pipeline.dataset.gc) leaves all of that alone."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator

from pipeline.dataset.versions import manifest_location, new_run_token
from pipeline.storage import Location, ObjectInfo, Storage

RUNS_DIR = "runs"

log = logging.getLogger(__name__)


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
