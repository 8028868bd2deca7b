"""Object storage behind one small interface: `s3://bucket/prefix` (S3 or any S3-compatible store) or a local folder.

boto3 does listing, object reads and uploads; pyarrow's S3FileSystem reads Parquet. Both take the standard AWS
credential chain and an endpoint override (`endpoint_url`, else `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`).
Transient failures (throttling, dropped connections, a restarting server) are retried with backoff by the clients'
own retry strategies; `check_access` instead fails fast with a message naming the endpoint, never the secret.

Fingerprints: for S3 the object's ETag; for local files `"<size>-<mtime_ns>"` (cheap, and changes whenever the file
is rewritten in place or replaced). Together with the key and size they decide whether a video is already ingested.

Atomic writes: a writer stages a complete file on local disk (`staging_path`) and `commit_staged` publishes it. On a
local destination the staging file sits beside the final name and is renamed over it; on S3 the upload is a single
PUT or a multipart upload that only becomes visible when complete (an aborted upload never shows). A reader
therefore sees either nothing or the whole file under a final name.

Conditional writes: `put_bytes(if_absent=True)` (S3 `If-None-Match: *`, locally a hard link, which fails when the
name exists) publishes manifests; `put_bytes(if_match=version)` (S3 `If-Match: <ETag>`, locally a version check and
rename under a file lock) replaces an object only if it is still the version read, a compare-and-swap that the
promotion lease is built on. Some S3-compatible stores ignore these headers, so jobs probe the store once
(`check_conditional_writes`). A missing object reads as FileNotFoundError on both backends, and a write the
credentials may not make raises PermissionError.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager, Iterator, Protocol
from urllib.parse import urlparse

import pyarrow.fs as pafs

from pipeline.redaction import redact

# Objects at most this large are decoded from memory; larger ones are spilled to local disk first because decord
# copies a file-like input whole, so memory per task would grow with the video's length.
DEFAULT_SPILL_THRESHOLD_BYTES = 64 * 1024 * 1024

# Retries cover a store that restarts or throttles for several seconds; standard mode backs off exponentially
# with jitter (capped at 20 s per wait).
_MAX_ATTEMPTS = 10
_CONNECT_TIMEOUT_S = 5.0
_READ_TIMEOUT_S = 60.0
# The access check runs once per job and must answer within seconds when the endpoint is wrong.
_CHECK_MAX_ATTEMPTS = 2
_CHECK_CONNECT_TIMEOUT_S = 3.0

STAGING_PREFIX = ".tmp-"


class StorageError(RuntimeError):
    """Storage cannot be used: unreachable endpoint, bad credentials, missing bucket or folder, or a store that
    ignores conditional writes."""


class VersionMismatch(Exception):
    """A write conditioned on an object's version found another version there."""


_NOT_FOUND_CODES = ("404", "NoSuchKey", "NotFound")
# 412: the condition does not hold; 409: a concurrent conditional write to the same key is in flight.
_PRECONDITION_CODES = ("PreconditionFailed", "ConditionalRequestConflict")
_ACCESS_DENIED_CODES = ("AccessDenied", "403")


def _error_code(error) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def is_object_error(error: Exception) -> bool:
    """Whether an error reading one object is that object's own (it is gone, or this process may not read that
    file), so that it fails that input alone. Any other (a store that cannot be reached or refuses the credentials,
    a full local disk) is the job's: recorded per input, it would fail every input and remember them as failed."""
    return isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError))


def is_input_error(stage: str, error: Exception) -> bool:
    """Whether `error`, raised while reading (`stage` "read") or decoding one input, fails that input alone: any
    decoding error does, a reading error only when it is the object's own (`is_object_error`). Otherwise the task
    fails, and a re-run resumes, rather than every input being remembered as failed."""
    return stage != "read" or is_object_error(error)


@dataclass(frozen=True)
class Location:
    """A parsed storage URI. For S3 `path` is the key (no leading slash); for local it is an absolute path."""

    scheme: str  # "s3" or "file"
    bucket: str
    path: str

    @property
    def uri(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.path}" if self.path else f"s3://{self.bucket}"
        return self.path

    def join(self, *parts: str) -> "Location":
        tail = "/".join(p.strip("/") for p in parts if p.strip("/"))
        if not tail:
            return self
        if self.scheme == "s3":
            path = f"{self.path.rstrip('/')}/{tail}" if self.path.rstrip("/") else tail
        else:
            path = os.path.join(self.path, tail)
        return Location(self.scheme, self.bucket, path)

    def relative_to(self, root: "Location") -> str:
        """The part of this location's path below `root`, with forward slashes."""
        if (self.scheme, self.bucket) != (root.scheme, root.bucket):
            raise ValueError(f"{self.uri} is not under {root.uri}")
        base = root.path.rstrip("/")
        if self.scheme == "file":
            return Path(self.path).relative_to(base).as_posix()
        if base and not self.path.startswith(base + "/"):
            raise ValueError(f"{self.uri} is not under {root.uri}")
        return self.path[len(base) + 1 :] if base else self.path


def parse_uri(uri: str) -> Location:
    """`s3://bucket/key`, `file:///abs/path` or a plain local path (made absolute)."""
    if uri.startswith("s3://"):
        # not urlparse: a key may hold '#' or '?' (`clip#2.mp4`), which it would cut off as a fragment or a query
        bucket, _, key = uri[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError(f"S3 URI without a bucket: {uri!r}")
        return Location("s3", bucket, key.lstrip("/"))
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif "://" in uri:
        raise ValueError(f"unsupported storage scheme in {uri!r}: use s3://bucket/prefix or a local path")
    return Location("file", "", os.path.abspath(os.path.expanduser(uri)))


def uri_prefixes(text: str | None) -> tuple[str, ...]:
    """The prefixes of a comma-separated list (`--allow-uris`, UNIFORMER_ALLOW_URIS), blanks dropped."""
    return tuple(prefix.strip() for prefix in (text or "").split(",") if prefix.strip())


def uri_within(uri: str, prefixes: tuple[str, ...]) -> bool:
    """Whether `uri` names an object under one of `prefixes`: local paths compared after resolving symbolic links and
    `..`, S3 keys refused when they hold a `..` segment (stores that normalise keys would leave the prefix)."""
    try:
        location = parse_uri(uri)
    except ValueError:
        return False
    if location.scheme == "s3" and ".." in location.path.split("/"):
        return False
    for prefix in prefixes:
        root = parse_uri(prefix)
        if location.scheme == root.scheme == "file":
            path, base = os.path.realpath(location.path), os.path.realpath(root.path)
            if os.path.commonpath([path, base]) == base:
                return True
        elif (location.scheme, location.bucket) == (root.scheme, root.bucket):
            base = root.path.rstrip("/")
            if not base or location.path.startswith(base + "/"):
                return True
    return False


@dataclass(frozen=True)
class ObjectInfo:
    location: Location
    size: int
    etag: str  # S3 ETag without quotes, or "<size>-<mtime_ns>" for local files
    modified: float | None = None  # seconds since the epoch, when the listing says


def _check_writable_folder(path: str) -> None:
    """StorageError unless `path` is a writable folder, or one that can be made below the nearest that exists (made
    to see, and removed again: a refused job leaves nothing behind)."""
    existing = path
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise StorageError(f"cannot write under {path}: {existing} is a file, not a folder")
    if existing == path:
        if not os.access(path, os.W_OK | os.X_OK):
            raise StorageError(f"cannot write under {path}: the folder is not writable by this user")
        return
    try:
        os.makedirs(path)
    except OSError as error:
        raise StorageError(f"cannot create the folder {path}: {error.strerror or error}") from None
    made = path
    while made != existing:
        os.rmdir(made)
        made = os.path.dirname(made)


def resolve_endpoint_url(endpoint_url: str | None) -> str | None:
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


# One boto3 client per process and configuration: creating one costs tens of milliseconds, and Ray reuses worker
# processes across tasks.
_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


class Backend(Protocol):
    """What one kind of store does for `Storage`; the methods' contracts are `Storage`'s."""

    name: str  # how messages name the store
    checks_versions_itself: bool  # whether the If-Match check is this module's own, so the store cannot ignore it

    def arrow_filesystem(self, location: Location) -> pafs.FileSystem: ...
    def arrow_path(self, location: Location) -> str: ...
    def check_access(self, location: Location, must_exist: bool) -> None: ...
    def list_objects(self, root: Location) -> Iterator[ObjectInfo]: ...
    def exists(self, location: Location) -> bool: ...
    def size(self, location: Location) -> int: ...
    def read_bytes(self, location: Location) -> bytes: ...
    def read_versioned(self, location: Location) -> tuple[bytes, str]: ...
    def fetched(self, location: Location, size: int) -> ContextManager[bytes | str]: ...
    def put_bytes(self, location: Location, data: bytes, if_absent: bool, if_match: str | None) -> str: ...
    def delete(self, location: Location) -> None: ...
    def incomplete_uploads(self, root: Location) -> Iterator[tuple[ObjectInfo, str]]: ...
    def staging_path(self, final: Location) -> str: ...
    def publish(self, staging: str, final: Location) -> None: ...
    def remove_stale_staging(self, folder: Location, older_than_s: float) -> int: ...


class LocalBackend:
    """A local folder. Staging files sit beside their final names, so publishing is a rename."""

    name = "the local filesystem"
    checks_versions_itself = True

    def arrow_filesystem(self, location: Location) -> pafs.FileSystem:
        return pafs.LocalFileSystem()

    def arrow_path(self, location: Location) -> str:
        return location.path

    def check_access(self, location: Location, must_exist: bool) -> None:
        if must_exist and not os.path.isdir(location.path):
            raise StorageError(f"local folder {location.path} does not exist")
        if not must_exist:  # a destination: a folder that is there or can be made, and written
            _check_writable_folder(location.path)

    def list_objects(self, root: Location) -> Iterator[ObjectInfo]:
        for dirpath, dirnames, filenames in os.walk(root.path):
            dirnames.sort()
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                try:
                    stat = os.stat(full)
                except FileNotFoundError:
                    continue  # renamed or removed by a writer since the folder was read
                yield ObjectInfo(
                    Location("file", "", full), stat.st_size, f"{stat.st_size}-{stat.st_mtime_ns}", stat.st_mtime
                )

    def exists(self, location: Location) -> bool:
        return os.path.exists(location.path)

    def size(self, location: Location) -> int:
        if not os.path.isfile(location.path):
            raise FileNotFoundError(location.uri)
        return os.path.getsize(location.path)

    def read_bytes(self, location: Location) -> bytes:
        return Path(location.path).read_bytes()

    def read_versioned(self, location: Location) -> tuple[bytes, str]:
        data = Path(location.path).read_bytes()
        return data, _md5(data)

    @contextmanager
    def fetched(self, location: Location, size: int) -> Iterator[bytes | str]:
        yield location.path

    def put_bytes(self, location: Location, data: bytes, if_absent: bool, if_match: str | None) -> str:
        staging = self.staging_path(location)
        with open(staging, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            if if_absent:
                try:
                    os.link(staging, location.path)  # fails when the final name exists, unlike rename
                except FileExistsError:
                    raise FileExistsError(location.uri) from None
            elif if_match is not None:
                with _conditional_writes_of(location):
                    if _md5(Path(location.path).read_bytes()) != if_match:
                        raise VersionMismatch(location.uri)
                    os.replace(staging, location.path)
            else:
                os.replace(staging, location.path)
        finally:
            if os.path.exists(staging):
                os.unlink(staging)
        return _md5(data)

    def delete(self, location: Location) -> None:
        try:
            os.unlink(location.path)
        except FileNotFoundError:
            pass

    def incomplete_uploads(self, root: Location) -> Iterator[tuple[ObjectInfo, str]]:
        return iter(())

    def staging_path(self, final: Location) -> str:
        os.makedirs(os.path.dirname(final.path), exist_ok=True)
        return os.path.join(os.path.dirname(final.path), _staging_name(final))

    def publish(self, staging: str, final: Location) -> None:
        with open(staging, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(staging, final.path)

    def remove_stale_staging(self, folder: Location, older_than_s: float) -> int:
        if not os.path.isdir(folder.path):
            return 0
        removed = 0
        cutoff = time.time() - older_than_s
        for entry in os.scandir(folder.path):
            if entry.name.startswith(STAGING_PREFIX) and entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)
                removed += 1
        return removed


class S3Backend:
    """S3 or an S3-compatible store: boto3 for objects, pyarrow's S3FileSystem for Parquet. Staging files sit in the
    local temporary folder and are uploaded whole."""

    checks_versions_itself = False

    def __init__(self, endpoint_url: str | None, spill_threshold_bytes: int):
        self.endpoint_url = endpoint_url
        self.spill_threshold_bytes = spill_threshold_bytes
        self.name = f"S3 endpoint {redact(endpoint_url) if endpoint_url else 'the default AWS S3 endpoint'}"

    def _client(self, quick: bool = False):
        key = (self.endpoint_url, quick, os.getpid())
        with _clients_lock:
            client = _clients.get(key)
            if client is None:
                import boto3
                from botocore.config import Config

                config = Config(
                    retries={
                        "mode": "standard",
                        "total_max_attempts": _CHECK_MAX_ATTEMPTS if quick else _MAX_ATTEMPTS,
                    },
                    connect_timeout=_CHECK_CONNECT_TIMEOUT_S if quick else _CONNECT_TIMEOUT_S,
                    read_timeout=_CHECK_CONNECT_TIMEOUT_S * 3 if quick else _READ_TIMEOUT_S,
                    max_pool_connections=32,
                )
                client = boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=config)
                _clients[key] = client
            return client

    def arrow_filesystem(self, location: Location) -> pafs.FileSystem:
        import boto3

        kwargs: dict = {
            "region": boto3.session.Session().region_name or "us-east-1",
            "connect_timeout": _CONNECT_TIMEOUT_S,
            "request_timeout": _READ_TIMEOUT_S,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=_MAX_ATTEMPTS),
        }
        if self.endpoint_url:
            parsed = urlparse(self.endpoint_url)
            kwargs["endpoint_override"] = parsed.netloc or parsed.path
            kwargs["scheme"] = parsed.scheme or "https"
        return pafs.S3FileSystem(**kwargs)

    def arrow_path(self, location: Location) -> str:
        return f"{location.bucket}/{location.path}"

    def check_access(self, location: Location, must_exist: bool) -> None:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        where = f"{self.name} (bucket {location.bucket!r})"
        try:
            self._client(quick=True).head_bucket(Bucket=location.bucket)
        except NoCredentialsError:
            raise StorageError(
                f"no AWS credentials found for {where}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, "
                "or an instance role"
            ) from None
        except ClientError as error:
            code = _error_code(error)
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("404", "NoSuchBucket"):
                raise StorageError(f"bucket {location.bucket!r} does not exist at {where}") from None
            if status in (401, 403) or code in ("403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
                raise StorageError(
                    f"access denied by {where}: the credentials were rejected ({code or status}); check the access "
                    "key, secret and permissions"
                ) from None
            raise StorageError(f"{where} answered {code or status}") from None
        except BotoCoreError as error:
            # Connection errors carry the URL (endpoint) but never the credentials.
            raise StorageError(f"cannot reach {where}: {type(error).__name__}") from None

    def list_objects(self, root: Location) -> Iterator[ObjectInfo]:
        paginator = self._client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=root.bucket, Prefix=_key_prefix(root)):
            for item in page.get("Contents", []):
                if item["Key"].endswith("/"):
                    continue  # folder placeholder objects made by consoles
                yield ObjectInfo(
                    Location("s3", root.bucket, item["Key"]), int(item["Size"]), item["ETag"].strip('"'),
                    item["LastModified"].timestamp(),
                )

    def exists(self, location: Location) -> bool:
        try:
            with _missing_as_not_found(location):
                self._client().head_object(Bucket=location.bucket, Key=location.path)
        except FileNotFoundError:
            return False
        return True

    def size(self, location: Location) -> int:
        with _missing_as_not_found(location):
            return int(self._client().head_object(Bucket=location.bucket, Key=location.path)["ContentLength"])

    def read_bytes(self, location: Location) -> bytes:
        return self.read_versioned(location)[0]

    def read_versioned(self, location: Location) -> tuple[bytes, str]:
        with _missing_as_not_found(location):
            response = self._client().get_object(Bucket=location.bucket, Key=location.path)
        return response["Body"].read(), response["ETag"].strip('"')

    @contextmanager
    def fetched(self, location: Location, size: int) -> Iterator[bytes | str]:
        if size <= self.spill_threshold_bytes:
            yield self.read_bytes(location)
            return
        handle, spill_path = tempfile.mkstemp(suffix=".video")
        os.close(handle)
        try:
            with _missing_as_not_found(location):  # streamed to the file, never held in memory
                self._client().download_file(location.bucket, location.path, spill_path)
            yield spill_path
        finally:
            os.unlink(spill_path)

    def put_bytes(self, location: Location, data: bytes, if_absent: bool, if_match: str | None) -> str:
        from botocore.exceptions import ClientError

        extra = {"IfNoneMatch": "*"} if if_absent else {"IfMatch": f'"{if_match}"'} if if_match is not None else {}
        try:
            response = self._client().put_object(Bucket=location.bucket, Key=location.path, Body=data, **extra)
        except ClientError as error:
            code = _error_code(error)
            if if_absent and code in _PRECONDITION_CODES:
                raise FileExistsError(location.uri) from None
            if if_match is not None and code in _PRECONDITION_CODES:
                raise VersionMismatch(location.uri) from None
            if if_match is not None and code in _NOT_FOUND_CODES:
                raise FileNotFoundError(location.uri) from None
            if code in _ACCESS_DENIED_CODES:
                raise PermissionError(f"{location.uri}: access denied") from None
            raise
        return response["ETag"].strip('"')

    def delete(self, location: Location) -> None:
        self._client().delete_object(Bucket=location.bucket, Key=location.path)

    def incomplete_uploads(self, root: Location) -> Iterator[tuple[ObjectInfo, str]]:
        client = self._client()
        uploads = client.get_paginator("list_multipart_uploads").paginate(Bucket=root.bucket, Prefix=_key_prefix(root))
        for page in uploads:
            for upload in page.get("Uploads", []):
                parts = client.get_paginator("list_parts").paginate(
                    Bucket=root.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                )
                size = sum(part["Size"] for page in parts for part in page.get("Parts", []))
                location = Location("s3", root.bucket, upload["Key"])
                yield ObjectInfo(location, size, "", upload["Initiated"].timestamp()), upload["UploadId"]

    def abort_upload(self, location: Location, upload_id: str) -> None:
        self._client().abort_multipart_upload(Bucket=location.bucket, Key=location.path, UploadId=upload_id)

    def staging_path(self, final: Location) -> str:
        return os.path.join(tempfile.gettempdir(), _staging_name(final))

    def publish(self, staging: str, final: Location) -> None:
        self._client().upload_file(staging, final.bucket, final.path)

    def remove_stale_staging(self, folder: Location, older_than_s: float) -> int:
        return 0  # staging files of S3 destinations are local temporary files, not in the folder


class Storage:
    """Reads, lists and writes objects under s3:// or local URIs, each through the backend of its scheme. Pickles
    small: clients live per process."""

    def __init__(self, endpoint_url: str | None = None, spill_threshold_bytes: int = DEFAULT_SPILL_THRESHOLD_BYTES):
        self._local = LocalBackend()
        self._s3 = S3Backend(resolve_endpoint_url(endpoint_url), spill_threshold_bytes)

    @property
    def endpoint_url(self) -> str | None:
        return self._s3.endpoint_url

    def __repr__(self) -> str:
        return f"Storage(endpoint_url={redact(self.endpoint_url or '')!r})"

    def _backend(self, location: Location) -> Backend:
        return self._s3 if location.scheme == "s3" else self._local

    def arrow_filesystem(self, location: Location) -> pafs.FileSystem:
        return self._backend(location).arrow_filesystem(location)

    def arrow_path(self, location: Location) -> str:
        return self._backend(location).arrow_path(location)

    # ---- fail fast -----------------------------------------------------------------------------------------------
    def check_access(self, location: Location, must_exist: bool = True) -> None:
        """Raise StorageError within seconds when `location` cannot be used; the message names the endpoint only.
        With `must_exist` false, `location` is a destination: a local folder that can be made, and written."""
        self._backend(location).check_access(location, must_exist)

    def check_conditional_writes(self, folder: Location) -> None:
        """Raise StorageError unless the store honours the conditional writes that manifests and the promotion lease
        rely on: a store that ignores them would let two writers both "win". Run once per job; it writes and removes
        one probe object in `folder`."""
        probe = folder.join(f".conditional-write-probe-{uuid.uuid4().hex}")
        backend = self._backend(probe)
        self.put_bytes(probe, b"first", if_absent=True)
        try:
            try:
                self.put_bytes(probe, b"second", if_absent=True)
                ignored = "If-None-Match (a second if-absent write replaced the first)"
            except FileExistsError:
                ignored = None
            if ignored is None and not backend.checks_versions_itself:
                try:
                    self.put_bytes(probe, b"second", if_match=_md5(b"a version that is not there"))
                    ignored = "If-Match (a write conditioned on another version replaced the object)"
                except VersionMismatch:
                    pass
            if ignored:
                raise StorageError(
                    f"{backend.name} ignores {ignored} at {probe.uri}: manifests and the promotion lease need a store "
                    "that honours conditional writes"
                )
        finally:
            self.delete(probe)

    # ---- listing and reading -------------------------------------------------------------------------------------
    def list_objects(self, root: Location) -> Iterator[ObjectInfo]:
        """Every object (file) below `root`, recursively, in key order, with its fingerprint."""
        return self._backend(root).list_objects(root)

    def exists(self, location: Location) -> bool:
        return self._backend(location).exists(location)

    def size(self, location: Location) -> int:
        """The object's size in bytes; FileNotFoundError when there is none, on S3 as locally."""
        return self._backend(location).size(location)

    def read_bytes(self, location: Location) -> bytes:
        """The object's content; FileNotFoundError when there is none, on S3 as locally."""
        return self._backend(location).read_bytes(location)

    def read_versioned(self, location: Location) -> tuple[bytes, str]:
        """The object's content and the version to condition a replacement on (`put_bytes(if_match=...)`): the S3
        ETag, or locally the content's MD5 (what S3 gives a single PUT). FileNotFoundError when there is none."""
        return self._backend(location).read_versioned(location)

    def fetched(self, location: Location, size: int) -> ContextManager[bytes | str]:
        """The object as something a decoder takes: a local file's path as is, a small S3 object as bytes, a large
        one spilled to a local temporary file (decord copies a file-like input whole, a path it streams)."""
        return self._backend(location).fetched(location, size)

    # ---- writing -------------------------------------------------------------------------------------------------
    def put_bytes(self, location: Location, data: bytes, if_absent: bool = False, if_match: str | None = None) -> str:
        """Write a small object atomically and return its version (see `read_versioned`). With `if_absent`, raise
        FileExistsError instead of replacing one; with `if_match`, replace only that version of the object, raising
        VersionMismatch when another is there and FileNotFoundError when none is; PermissionError when the
        credentials may not write it."""
        if if_absent and if_match is not None:
            raise ValueError("if_absent and if_match exclude each other")
        return self._backend(location).put_bytes(location, data, if_absent, if_match)

    def delete(self, location: Location) -> None:
        """Remove one object; a missing one is not an error."""
        self._backend(location).delete(location)

    def incomplete_uploads(self, root: Location) -> Iterator[tuple[ObjectInfo, str]]:
        """S3 multipart uploads below `root` that were neither completed nor aborted (a killed writer's staging: never
        visible, but stored and billed), as (object with the parts' total size and the upload's start time, upload
        id). None on a local destination, whose staging files are listed like any file."""
        return self._backend(root).incomplete_uploads(root)

    def abort_upload(self, location: Location, upload_id: str) -> None:
        """Abort one of `incomplete_uploads`, all of which are S3's."""
        self._s3.abort_upload(location, upload_id)

    # ---- atomic file publishing ----------------------------------------------------------------------------------
    def staging_path(self, final: Location) -> str:
        """A local path to write `final`'s content to before `commit_staged`."""
        return self._backend(final).staging_path(final)

    def commit_staged(self, staging: str, final: Location) -> None:
        """Publish a complete staged file under its final name and remove the staging copy."""
        try:
            self._backend(final).publish(staging, final)
        finally:
            if os.path.exists(staging):
                os.unlink(staging)

    def remove_stale_staging(self, folder: Location, older_than_s: float = 3600.0) -> int:
        """Delete staging files a killed local run left behind; young ones may belong to a run still going."""
        return self._backend(folder).remove_stale_staging(folder, older_than_s)


def _key_prefix(root: Location) -> str:
    """The S3 key prefix of everything below `root`: its path as a folder, or the whole bucket."""
    return root.path.rstrip("/") + "/" if root.path.rstrip("/") else ""


def _staging_name(final: Location) -> str:
    return f"{STAGING_PREFIX}{os.path.basename(final.path)}-{uuid.uuid4().hex[:12]}"


@contextmanager
def _missing_as_not_found(location: Location) -> Iterator[None]:
    """An S3 object that is not there raises FileNotFoundError, as a local file does."""
    from botocore.exceptions import ClientError

    try:
        yield
    except ClientError as error:
        if _error_code(error) in _NOT_FOUND_CODES:
            raise FileNotFoundError(location.uri) from None
        raise


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


@contextmanager
def _conditional_writes_of(location: Location) -> Iterator[None]:
    """Serializes conditional replaces of one local file across processes, which makes check-then-rename a
    compare-and-swap. If-absent writes need no lock: the link fails atomically when the name exists, and a
    conditional replace never leaves the name absent. The lock file stays: removing it would let a waiter lock the
    removed file while a newcomer locks a new one."""
    lock_path = os.path.join(os.path.dirname(location.path), f".{os.path.basename(location.path)}.cas")
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield
