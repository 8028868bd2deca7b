"""Storage against a real S3-compatible server (moto over HTTP on 127.0.0.1), reached as production reaches S3."""

import socket
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.storage import Storage, StorageError, VersionMismatch, parse_uri
from tests.conftest import ignore_conditional_writes

pytestmark = pytest.mark.integration


def test_parse_uri_forms(tmp_path):
    assert parse_uri("s3://bucket/a/b").path == "a/b"
    assert parse_uri("s3://bucket").path == ""
    assert parse_uri("s3://bucket/take #2?.mp4").path == "take #2?.mp4"
    with pytest.raises(ValueError, match="without a bucket"):
        parse_uri("s3:///key")
    assert parse_uri(f"file://{tmp_path}").path == str(tmp_path)
    assert parse_uri("relative/dir").path.endswith("relative/dir")
    with pytest.raises(ValueError, match="unsupported"):
        parse_uri("gs://bucket/x")
    assert parse_uri("s3://b/videos").join("left", "a b.mp4").uri == "s3://b/videos/left/a b.mp4"


def test_listing_gives_keys_sizes_and_etags(s3_server, s3_bucket):
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="raw/left/clip one.mp4", Body=b"12345")
    client.put_object(Bucket=s3_bucket, Key="raw/日本/ビデオ.mp4", Body=b"abc")
    client.put_object(Bucket=s3_bucket, Key="raw/take #2?.mp4", Body=b"hash")
    client.put_object(Bucket=s3_bucket, Key="rawer/not-below.mp4", Body=b"x")
    storage = Storage(s3_server.endpoint_url)
    objects = list(storage.list_objects(parse_uri(f"s3://{s3_bucket}/raw")))
    assert [o.location.path for o in objects] == ["raw/left/clip one.mp4", "raw/take #2?.mp4", "raw/日本/ビデオ.mp4"]
    head = client.head_object(Bucket=s3_bucket, Key="raw/left/clip one.mp4")
    assert objects[0].size == 5 and objects[0].etag == head["ETag"].strip('"')
    assert storage.read_bytes(objects[2].location) == b"abc"
    # jobs carry URIs as text: a key with '#' or '?' reads back whole from its URI, not cut at them
    assert storage.read_bytes(parse_uri(objects[1].location.uri)) == b"hash"


def test_endpoint_comes_from_the_environment(s3_server, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    storage = Storage()
    assert storage.endpoint_url == s3_server.endpoint_url
    storage.check_access(parse_uri(f"s3://{s3_bucket}"))


def test_parquet_goes_through_pyarrow_s3_with_the_endpoint_override(s3_server, s3_bucket):
    storage = Storage(s3_server.endpoint_url)
    location = parse_uri(f"s3://{s3_bucket}/data/t.parquet")
    staging = storage.staging_path(location)
    pq.write_table(pa.table({"x": [1, 2, 3]}), staging)
    storage.commit_staged(staging, location)
    table = pq.read_table(storage.arrow_path(location), filesystem=storage.arrow_filesystem(location))
    assert table.column("x").to_pylist() == [1, 2, 3]


def test_put_if_absent_refuses_to_replace(s3_server, s3_bucket):
    storage = Storage(s3_server.endpoint_url)
    location = parse_uri(f"s3://{s3_bucket}/manifests/v000001.json")
    storage.put_bytes(location, b"first", if_absent=True)
    with pytest.raises(FileExistsError):
        storage.put_bytes(location, b"second", if_absent=True)
    assert storage.read_bytes(location) == b"first"


def test_a_missing_object_reads_as_file_not_found_on_both_backends(storage_folder):
    storage, root = storage_folder
    for read in (storage.read_bytes, storage.read_versioned):
        with pytest.raises(FileNotFoundError):
            read(root.join("nothing-here"))


def test_a_conditional_replace_takes_effect_only_on_the_version_read(storage_folder):
    storage, root = storage_folder
    location = root.join("lease")
    first = storage.put_bytes(location, b"first", if_absent=True)
    assert storage.read_versioned(location) == (b"first", first)
    second = storage.put_bytes(location, b"second", if_match=first)
    assert second != first
    with pytest.raises(VersionMismatch):
        storage.put_bytes(location, b"late", if_match=first)
    assert storage.read_versioned(location) == (b"second", second)
    with pytest.raises(FileNotFoundError):
        storage.put_bytes(root.join("absent"), b"x", if_match=first)
    assert not storage.exists(root.join("absent"))


def test_conditional_writes_are_probed_and_the_probe_leaves_nothing(storage_folder):
    storage, root = storage_folder
    storage.check_conditional_writes(root)
    assert [info.location.uri for info in storage.list_objects(root) if "probe" in info.location.path] == []


@pytest.mark.parametrize("condition, header", [("if_absent", "If-None-Match"), ("if_match", "If-Match")])
def test_a_store_that_ignores_conditional_writes_is_refused(s3_server, s3_bucket, monkeypatch, condition, header):
    ignored = ignore_conditional_writes(monkeypatch, condition)
    with pytest.raises(StorageError, match=f"ignores {header}") as caught:
        Storage(s3_server.endpoint_url).check_conditional_writes(parse_uri(f"s3://{s3_bucket}/out"))
    assert ignored  # the fault really happened: a conditional write went through unconditionally
    assert s3_server.endpoint_url in str(caught.value)
    assert "Contents" not in s3_server.client().list_objects_v2(Bucket=s3_bucket)  # the probe is gone


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_endpoint_fails_fast_naming_it_and_not_the_secret():
    endpoint = f"http://127.0.0.1:{_unused_port()}"
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        Storage(endpoint).check_access(parse_uri("s3://videos/raw"))
    assert time.monotonic() - started < 15
    message = str(caught.value)
    assert endpoint in message and "cannot reach" in message
    assert "testing-secret-key" not in message


def test_bad_credentials_fail_fast_naming_the_endpoint_and_not_the_secret(s3_server, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-do-not-print")
    s3_server.require_credentials(True)
    try:
        with pytest.raises(StorageError) as caught:
            Storage(s3_server.endpoint_url).check_access(parse_uri(f"s3://{s3_bucket}/raw"))
    finally:
        s3_server.require_credentials(False)
    message = str(caught.value)
    assert "access denied" in message and s3_server.endpoint_url in message and s3_bucket in message
    assert "wrong-secret-do-not-print" not in message


def test_missing_bucket_is_named(s3_server):
    with pytest.raises(StorageError, match="does not exist") as caught:
        Storage(s3_server.endpoint_url).check_access(parse_uri("s3://no-such-bucket-here/raw"))
    assert s3_server.endpoint_url in str(caught.value)


def test_missing_local_source_is_named(tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        Storage().check_access(parse_uri(str(tmp_path / "nowhere")))
