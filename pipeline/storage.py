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
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import pyarrow.fs as pafs

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
    """Storage cannot be used: unreachable endpoint, bad credentials, missing bucket or folder."""


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
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise ValueError(f"S3 URI without a bucket: {uri!r}")
        return Location("s3", parsed.netloc, parsed.path.lstrip("/"))
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif "://" in uri:
        raise ValueError(f"unsupported storage scheme in {uri!r}: use s3://bucket/prefix or a local path")
    return Location("file", "", os.path.abspath(os.path.expanduser(uri)))


@dataclass(frozen=True)
class ObjectInfo:
    location: Location
    size: int
    etag: str  # S3 ETag without quotes, or "<size>-<mtime_ns>" for local files


def resolve_endpoint_url(endpoint_url: str | None) -> str | None:
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


# One boto3 client per process and configuration: creating one costs tens of milliseconds, and Ray reuses worker
# processes across tasks.
_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


class Storage:
    """Reads, lists and writes objects under s3:// or local URIs. Pickles small: clients live per process."""

    def __init__(self, endpoint_url: str | None = None, spill_threshold_bytes: int = DEFAULT_SPILL_THRESHOLD_BYTES):
        self.endpoint_url = resolve_endpoint_url(endpoint_url)
        self.spill_threshold_bytes = spill_threshold_bytes

    def __repr__(self) -> str:
        return f"Storage(endpoint_url={self.endpoint_url!r})"

    @property
    def endpoint_name(self) -> str:
        return self.endpoint_url or "the default AWS S3 endpoint"

    # ---- clients -------------------------------------------------------------------------------------------------
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
        if location.scheme == "file":
            return pafs.LocalFileSystem()
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

    @staticmethod
    def arrow_path(location: Location) -> str:
        return f"{location.bucket}/{location.path}" if location.scheme == "s3" else location.path

    # ---- fail fast -----------------------------------------------------------------------------------------------
    def check_access(self, location: Location, must_exist: bool = True) -> None:
        """Raise StorageError within seconds when `location` cannot be used; the message names the endpoint only."""
        if location.scheme == "file":
            if must_exist and not os.path.isdir(location.path):
                raise StorageError(f"local folder {location.path} does not exist")
            return
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        where = f"S3 endpoint {self.endpoint_name} (bucket {location.bucket!r})"
        try:
            self._client(quick=True).head_bucket(Bucket=location.bucket)
        except NoCredentialsError:
            raise StorageError(
                f"no AWS credentials found for {where}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, "
                "or an instance role"
            ) from None
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
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

    # ---- listing and reading -------------------------------------------------------------------------------------
    def list_objects(self, root: Location) -> Iterator[ObjectInfo]:
        """Every object (file) below `root`, recursively, in key order, with its fingerprint."""
        if root.scheme == "file":
            for dirpath, dirnames, filenames in os.walk(root.path):
                dirnames.sort()
                for name in sorted(filenames):
                    full = os.path.join(dirpath, name)
                    stat = os.stat(full)
                    yield ObjectInfo(Location("file", "", full), stat.st_size, f"{stat.st_size}-{stat.st_mtime_ns}")
            return
        prefix = root.path.rstrip("/") + "/" if root.path.rstrip("/") else ""
        paginator = self._client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=root.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                if item["Key"].endswith("/"):
                    continue  # folder placeholder objects made by consoles
                yield ObjectInfo(
                    Location("s3", root.bucket, item["Key"]), int(item["Size"]), item["ETag"].strip('"')
                )

    def exists(self, location: Location) -> bool:
        if location.scheme == "file":
            return os.path.exists(location.path)
        from botocore.exceptions import ClientError

        try:
            self._client().head_object(Bucket=location.bucket, Key=location.path)
            return True
        except ClientError as error:
            if str(error.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def read_bytes(self, location: Location) -> bytes:
        if location.scheme == "file":
            return Path(location.path).read_bytes()
        response = self._client().get_object(Bucket=location.bucket, Key=location.path)
        return response["Body"].read()

    def download(self, location: Location, local_path: str) -> None:
        """Stream an object to a local file without holding it in memory."""
        self._client().download_file(location.bucket, location.path, local_path)

    @contextmanager
    def fetched(self, location: Location, size: int) -> Iterator[bytes | str]:
        """The object as something a decoder takes: a local file's path as is, a small S3 object as bytes, a large
        one spilled to a local temporary file (decord copies a file-like input whole, a path it streams)."""
        if location.scheme == "file":
            yield location.path
            return
        if size <= self.spill_threshold_bytes:
            yield self.read_bytes(location)
            return
        handle, spill_path = tempfile.mkstemp(suffix=".video")
        os.close(handle)
        try:
            self.download(location, spill_path)
            yield spill_path
        finally:
            os.unlink(spill_path)

    def put_bytes(self, location: Location, data: bytes, if_absent: bool = False) -> None:
        """Write a small object atomically; with `if_absent`, raise FileExistsError instead of replacing one."""
        if location.scheme == "file":
            staging = self.staging_path(location)
            with open(staging, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            if if_absent:
                try:
                    os.link(staging, location.path)  # fails when the final name exists, unlike rename
                except FileExistsError:
                    raise FileExistsError(location.uri) from None
                finally:
                    os.unlink(staging)
            else:
                os.replace(staging, location.path)
            return
        from botocore.exceptions import ClientError

        extra = {"IfNoneMatch": "*"} if if_absent else {}
        try:
            self._client().put_object(Bucket=location.bucket, Key=location.path, Body=data, **extra)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise FileExistsError(location.uri) from None
            raise

    def delete(self, location: Location) -> None:
        """Remove one object; a missing one is not an error."""
        if location.scheme == "file":
            try:
                os.unlink(location.path)
            except FileNotFoundError:
                pass
            return
        self._client().delete_object(Bucket=location.bucket, Key=location.path)

    # ---- atomic file publishing ----------------------------------------------------------------------------------
    def staging_path(self, final: Location) -> str:
        """A local path to write `final`'s content to before `commit_staged`."""
        name = f"{STAGING_PREFIX}{os.path.basename(final.path)}-{uuid.uuid4().hex[:12]}"
        if final.scheme == "file":
            os.makedirs(os.path.dirname(final.path), exist_ok=True)
            return os.path.join(os.path.dirname(final.path), name)
        return os.path.join(tempfile.gettempdir(), name)

    def commit_staged(self, staging: str, final: Location) -> None:
        """Publish a complete staged file under its final name and remove the staging copy."""
        try:
            if final.scheme == "file":
                with open(staging, "rb") as handle:
                    os.fsync(handle.fileno())
                os.replace(staging, final.path)
            else:
                self._client().upload_file(staging, final.bucket, final.path)
        finally:
            if os.path.exists(staging):
                os.unlink(staging)

    def remove_stale_staging(self, folder: Location, older_than_s: float = 3600.0) -> int:
        """Delete staging files a killed local run left behind; young ones may belong to a run still going."""
        if folder.scheme != "file" or not os.path.isdir(folder.path):
            return 0
        removed = 0
        cutoff = time.time() - older_than_s
        for entry in os.scandir(folder.path):
            if entry.name.startswith(STAGING_PREFIX) and entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)
                removed += 1
        return removed
