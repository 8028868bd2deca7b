"""Leases: an object in storage that at most one holder holds at a time, for work two jobs must not do at once (a
retrain moving the champion alias, a training run writing its run directory).

Acquired by an if-absent write, or by replacing an expired lease (a crashed holder's) with a write conditioned on the
version read, so that of two waiters that saw it expire only one can replace it. Renewed in the background while
held; `ensure_held` checks that it is still ours right before an action only the holder may take. Released by marking
it expired, again conditioned on our version: a lease taken over or removed meanwhile is someone else's, and is left
alone. All of it rests on the store honouring conditional writes (`Storage.check_conditional_writes`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from pipeline.storage import Location, Storage, VersionMismatch

log = logging.getLogger(__name__)


class LeaseHeld(TimeoutError):
    """Another holder still held the lease when the wait for it ended."""

    def __init__(self, message: str, owner: str | None, expires_at: float | None):
        super().__init__(message)
        self.owner, self.expires_at = owner, expires_at


class LeaseLost(RuntimeError):
    """The lease expired and was taken over (or removed) while we held it."""


class Lease:
    """A lease object at `location`, held for `ttl_s` seconds at a time and renewed every `renew_every_s` (a third of
    it by default); `__enter__` waits up to `wait_s` for a holder to release it or let it expire."""

    name = "lease"  # what the messages call it
    contender = "another holder"  # who holds it when we cannot
    on_loss = ""  # what losing it means for the holder's work, for LeaseLost's message

    def __init__(self, storage: Storage, location: Location, ttl_s: float = 900, wait_s: float = 600,
                 renew_every_s: float | None = None):
        self.storage, self.location, self.ttl_s, self.wait_s = storage, location, ttl_s, wait_s
        self.renew_every_s = ttl_s / 3 if renew_every_s is None else renew_every_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._version: str | None = None  # the lease object's version as we last wrote it; None: not ours
        self._holder: dict = {}  # the other holder's lease as last read, for LeaseHeld
        self._guard = threading.Lock()  # renewal against ensure_held, which compares _version with the store
        self._stop = threading.Event()
        self._renewal: threading.Thread | None = None

    def _body(self, expires_at: float) -> bytes:
        return json.dumps({"owner": self.owner, "expires_at": expires_at}).encode()

    def __enter__(self) -> Lease:
        deadline = time.monotonic() + self.wait_s
        delay = 0.1
        while True:
            try:
                self._version = self.storage.put_bytes(self.location, self._body(time.time() + self.ttl_s),
                                                       if_absent=True)
            except FileExistsError:
                self._version = self._take_over_if_expired()
            if self._version is not None:
                break
            if time.monotonic() > deadline:
                owner, expires_at = self._holder.get("owner"), self._holder.get("expires_at")
                until = f" until {time.strftime('%H:%M:%S UTC', time.gmtime(expires_at))}" if expires_at else ""
                raise LeaseHeld(f"{self.name} {self.location.uri} is held by {self.contender} ({owner}{until})",
                                owner, expires_at)
            time.sleep(delay)
            delay = min(2.0, delay * 2)
        self._stop.clear()
        self._renewal = threading.Thread(target=self._renew, name=f"renew {self.location.uri}", daemon=True)
        self._renewal.start()
        return self

    def _take_over_if_expired(self) -> str | None:
        try:
            data, version = self.storage.read_versioned(self.location)
            self._holder = json.loads(data)
        except (FileNotFoundError, ValueError):
            return None
        if self._holder.get("expires_at", 0) >= time.time():
            return None
        try:
            return self.storage.put_bytes(self.location, self._body(time.time() + self.ttl_s), if_match=version)
        except (VersionMismatch, FileNotFoundError):
            return None  # another waiter replaced it first, or it was removed

    def _renew(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        while not self._stop.wait(self.renew_every_s):
            with self._guard:
                try:
                    self._version = self.storage.put_bytes(self.location, self._body(time.time() + self.ttl_s),
                                                           if_match=self._version)
                except (VersionMismatch, FileNotFoundError):
                    self._version = None  # expired and taken over, or removed: it never becomes ours again
                    return
                except (OSError, BotoCoreError, ClientError) as error:
                    # The store failing past its clients' retries: try again at the next renewal. Stopping here
                    # would let the lease lapse while its holder works on, and another take it.
                    log.warning("could not renew %s %s (%s); trying again in %.0f s", self.name, self.location.uri,
                                type(error).__name__, self.renew_every_s)

    def ensure_held(self) -> None:
        """Raise LeaseLost unless the lease in storage is still the one we last wrote, and unexpired."""
        with self._guard:
            try:
                data, version = self.storage.read_versioned(self.location)
                unexpired = json.loads(data).get("expires_at", 0) > time.time()
            except FileNotFoundError:
                version, unexpired = None, False
            if self._version is None or version != self._version or not unexpired:
                raise LeaseLost(
                    f"{self.name} {self.location.uri} is no longer held by {self.owner} (it expired and was taken "
                    f"over, or was removed){': ' + self.on_loss if self.on_loss else ''}"
                )

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._renewal.join()
        version, self._version = self._version, None
        if version is None:
            return  # lost while held: what is there now belongs to someone else
        try:
            self.storage.put_bytes(self.location, self._body(0.0), if_match=version)
        except (VersionMismatch, FileNotFoundError):
            pass  # taken over after it expired, or removed: nothing of ours left to release
