"""The versioned-dataset core on both backends: racing writers, remembered failures, run records and gc."""

from __future__ import annotations

import json
import logging
import time

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.dataset.failures import failures_changed, read_failures, version_failures
from pipeline.dataset.gc import collect_garbage
from pipeline.dataset.parts import ShardEntry, publish_table, published_part
from pipeline.dataset.runs import RUNS_DIR, RunRecord, reading_versions
from pipeline.dataset.sources import SourceTable, partition_inputs, read_sources, write_sources
from pipeline.dataset.versions import ManifestError, manifest_location
from pipeline.ingest import commit_ingest, plan_ingest
from pipeline.listing import SourceVideo
from pipeline.manifest import Manifest, SamplingParams, latest_manifest, load_manifest, write_manifest
from pipeline.schema import ERRORS_SCHEMA, ErrorRecord
from pipeline.storage import Storage, parse_uri

SAMPLING = SamplingParams(frames=4, short_side=32, size=28)


def _video(root, name: str, etag: str = "e1") -> SourceVideo:
    return SourceVideo(root.join("src", name).uri, name, 10, etag, "left")


def _result(video: SourceVideo, shard: str | None, error: str | None = None) -> dict:
    """What ingest_group returns for one video: its shard, or its error."""
    record = {"uri": video.uri, "video_id": video.video_id, "etag": video.etag, "size": video.size,
              "label_name": video.label_name, "label": 0, "clips": 1, "padded": False}
    if error:
        return {"videos": [], "errors": [ErrorRecord(video.uri, video.etag, "decode", error, "bad").to_dict()],
                "shard": None, "adopted": False}
    return {"videos": [record], "errors": [], "adopted": False,
            "shard": {"path": shard, "rows": 1, "sha256": "00" * 32, "bytes": 1}}


@pytest.mark.integration
def test_a_writer_that_loses_the_version_race_leaves_the_winners_tables_alone(storage_folder):
    storage, root = storage_folder
    videos = [_video(root, "a.mp4"), _video(root, "b.mp4")]
    plan = plan_ingest(root.uri, root.join("src").uri, videos, videos, [], "dirs", SAMPLING, None, None)
    for name in ("a", "b"):
        publish_table(storage, root.join(f"shards/part-{name}.parquet"), pa.table({"video_id": [f"{name}.mp4"]}))
    # Both runs decoded the same listing, each failing on another video: both build version 1.
    winner = commit_ingest(plan, [_result(videos[0], "shards/part-a.parquet"), _result(videos[1], None, "Boom")],
                           storage).manifest
    loser = commit_ingest(plan, [_result(videos[0], None, "Crash"), _result(videos[1], "shards/part-b.parquet")],
                          storage).manifest
    assert winner.version == loser.version == 1
    write_manifest(root, winner, storage)
    with pytest.raises(ManifestError, match="already exists"):
        write_manifest(root, loser, storage)

    published = latest_manifest(root, storage)
    assert published.errors != loser.errors and published.source_tables != loser.source_tables
    failures = read_failures(root, published.errors, storage)
    assert [(error.source_uri, error.error_type) for error in failures.values()] == [(videos[1].uri, "Boom")]
    assert read_sources(root, published, storage).present(["a.mp4", "b.mp4"]) == {"a.mp4"}


@pytest.mark.integration
def test_a_run_whose_part_was_removed_while_it_ran_publishes_nothing(storage_folder):
    storage, root = storage_folder
    videos = [_video(root, "a.mp4")]
    plan = plan_ingest(root.uri, root.join("src").uri, videos, videos, [], "dirs", SAMPLING, None, None)
    with pytest.raises(RuntimeError, match="removed while it ran .*shards/part-gone.parquet"):
        commit_ingest(plan, [_result(videos[0], "shards/part-gone.parquet")], storage)  # as if gc had removed it
    assert latest_manifest(root, storage) is None


def test_failures_are_remembered_by_key_and_etag():
    root_video = SourceVideo("/src/a.mp4", "a.mp4", 1, "e1")
    failed = ErrorRecord("/src/a.mp4", "e1", "decode", "VideoDecodeError", "bad")
    failures = {(failed.source_uri, failed.source_etag): failed}
    nothing_done = SourceTable.empty()

    known = partition_inputs([root_video], nothing_done, ("etag",), failures)
    assert (list(known.pending), known.known_failures) == ([], [failed])
    retried = partition_inputs([root_video], nothing_done, ("etag",), failures, retry_errors=True)
    assert list(retried.pending) == [root_video]
    changed = SourceVideo("/src/a.mp4", "a.mp4", 1, "e2")
    assert list(partition_inputs([changed], nothing_done, ("etag",), failures).pending) == [changed]

    again = ErrorRecord("/src/a.mp4", "e1", "decode", "VideoDecodeError", "another message")
    assert version_failures([failed], [again]) == [again]
    assert not failures_changed(failures, [again])  # the same failure again is nothing new
    assert failures_changed(failures, [])


def _dataset_with_two_versions(storage, root) -> dict[str, str]:
    """v1: shards old + shared; v2: shared + new (old left). Returns {name: relative path} of what was written."""
    table = pa.table({"video_id": ["x"]})
    paths = {name: f"shards/part-{name}.parquet" for name in ("old", "shared", "new", "leftover")}
    for path in paths.values():
        publish_table(storage, root.join(path), table)
    errors = pa.Table.from_pylist([ErrorRecord("/s/bad", "e", "decode", "X", "m").to_dict()], schema=ERRORS_SCHEMA)
    paths["errors_v1"] = "errors/v000001-run1.parquet"
    publish_table(storage, root.join(paths["errors_v1"]), errors)
    manifest, sources = None, SourceTable.empty()
    for version, (removed, added) in enumerate(((set(), ("old", "shared")), ({"old"}, ("new",))), start=1):
        upserts = SourceTable.from_rows([{"video_id": name, "uri": f"/s/{name}", "etag": "e", "size": 1,
                                          "label_name": "a", "clips": 1, "shard": paths[name]} for name in added])
        sources, delta = sources.updated(removed, upserts.table)
        chain = write_sources(root, version, manifest.source_tables if manifest else [], sources, delta, storage,
                              token=f"run{version}")
        shards = sorted(sources.to_dict(), key=("old", "shared", "new").index)
        manifest = Manifest(version, "/s", SAMPLING, "dirs", {"a": 0},
                            [ShardEntry(paths[name], 1, "00" * 32, 1) for name in shards], chain, len(sources), {},
                            errors=paths["errors_v1"] if version == 1 else None)
        write_manifest(root, manifest, storage)
    paths.update(sources_v1="sources/v000001-run1.parquet", sources_v2="sources/v000002-run2.parquet")
    return paths


def _exists(storage, root, path: str) -> bool:
    return storage.exists(root.join(path))


@pytest.mark.integration
def test_gc_removes_what_no_kept_version_or_running_job_uses(storage_folder, s3_server):
    storage, root = storage_folder
    paths = _dataset_with_two_versions(storage, root)
    if root.scheme == "s3":  # a killed writer's multipart upload: S3's staging, invisible but stored
        upload = s3_server.client().create_multipart_upload(Bucket=root.bucket, Key=root.join("shards/part-k").path)
        s3_server.client().upload_part(Bucket=root.bucket, Key=upload["Key"], UploadId=upload["UploadId"],
                                       PartNumber=1, Body=b"x" * 1024)
        staged = {"shards/part-k (incomplete upload)"}
    else:  # a killed writer's staging file beside the final name
        staged = {"shards/.tmp-part-k.parquet-0123456789ab"}
        with open(root.join(*staged).path, "wb") as handle:
            handle.write(b"x" * 1024)
    claimed = "shards/part-claimed.parquet"
    publish_table(storage, root.join(claimed), pa.table({"video_id": ["y"]}))
    storage.put_bytes(root.join(RUNS_DIR, "dead.json"), json.dumps({"started_at": 0, "expires_at": 1}).encode())

    dry = collect_garbage(root, storage, keep_versions=1, dry_run=True, min_age_s=0)
    assert dry.dropped_versions == [1] and dry.kept_versions == [2]
    assert _exists(storage, root, "manifests/v000001.json") and _exists(storage, root, paths["old"])

    run = RunRecord(storage, root, "ingest", ttl_s=7200)
    run.started_at += 3600  # gc runs an hour later, and the run started after every file above was written
    with run:
        run.claim([claimed])  # a leftover the run adopts: older than the run, kept only because it is claimed
        report = collect_garbage(root, storage, keep_versions=1, min_age_s=0, now=time.time() + 3600)
        assert _exists(storage, root, claimed) and claimed in report.protected
    removed = {path for path, _ in report.removed}
    assert removed | {claimed} == {path for path, _ in dry.removed}  # what the dry run listed, less the claim
    assert removed == {"manifests/v000001.json", paths["old"], paths["leftover"], paths["errors_v1"],
                       "runs/dead.json"} | staged
    if root.scheme == "s3":
        assert "Uploads" not in s3_server.client().list_multipart_uploads(Bucket=root.bucket)
    assert report.bytes_freed == sum(size for _, size in report.removed) > 0
    for path in removed:
        assert not _exists(storage, root, path.removesuffix(" (incomplete upload)"))
    for path in (paths["shared"], paths["new"], paths["sources_v1"], paths["sources_v2"]):
        assert _exists(storage, root, path)  # v2's shards and its chain of source tables (v1's table starts it)
    assert not _exists(storage, root, run.location.relative_to(root))  # the record left with its run
    v2 = latest_manifest(root, storage)
    assert set(read_sources(root, v2, storage).to_dict()) == {"shared", "new"}

    # Young unreferenced files stay: a writer that keeps no record may still be publishing them.
    publish_table(storage, root.join("shards/part-young.parquet"), pa.table({"video_id": ["z"]}))
    young = collect_garbage(root, storage, keep_versions=1, min_age_s=3600)
    assert "shards/part-young.parquet" in young.protected and _exists(storage, root, "shards/part-young.parquet")
    with pytest.raises(ValueError, match="keep_versions"):
        collect_garbage(root, storage, keep_versions=0)


def test_gc_of_an_empty_destination_removes_nothing(tmp_path):
    report = collect_garbage(parse_uri(str(tmp_path)), Storage(), keep_versions=3)
    assert (report.removed, report.kept_versions) == ([], [])
    assert report.lines()[-1].startswith("gc: kept versions none; removed 0 files, 0 bytes freed")


def test_an_errors_table_reads_back_by_key_and_etag(tmp_path):
    root, storage = parse_uri(str(tmp_path)), Storage()
    record = ErrorRecord("/s/a.mp4", "e1", "decode", "VideoDecodeError", "bad")
    pq.write_table(pa.Table.from_pylist([record.to_dict()], schema=ERRORS_SCHEMA), tmp_path / "errors.parquet")
    assert read_failures(root, "errors.parquet", storage) == {("/s/a.mp4", "e1"): record}
    assert read_failures(root, None, storage) == {}


def _record_files(storage, root) -> list:
    return list(storage.list_objects(root.join(RUNS_DIR)))


@pytest.mark.integration
def test_gc_keeps_the_versions_a_running_reader_reads_until_its_record_ends(storage_folder):
    storage, root = storage_folder
    paths = _dataset_with_two_versions(storage, root)
    only_v1 = {"manifests/v000001.json", paths["old"], paths["errors_v1"]}

    with reading_versions(storage, [(root, 1), (root, 2)], "train", ManifestError):
        [record] = _record_files(storage, root)  # one record per dataset, naming both versions
        assert json.loads(storage.read_bytes(record.location))["reads"] == [1, 2]
        kept = collect_garbage(root, storage, keep_versions=1, min_age_s=0)
        assert (kept.kept_versions, kept.read_versions, kept.dropped_versions) == ([2], [1], [])
        assert "gc: kept v000001 too, and all it names: a running job reads it" in kept.lines()
        for path in only_v1 | {paths["sources_v1"]}:
            assert _exists(storage, root, path), path
        # a reader writes nothing: unlike a writer's, its record holds back no young unreferenced file
        assert {path for path, _ in kept.removed} == {paths["leftover"]}
        # a killed reader's record expires: an hour later gc sees no reader, and drops version 1
        expired = collect_garbage(root, storage, keep_versions=1, min_age_s=0, dry_run=True, now=time.time() + 3600)
        assert {path for path, _ in expired.removed} == only_v1 | {record.location.relative_to(root)}
    assert not _record_files(storage, root)  # the record left with its reader

    report = collect_garbage(root, storage, keep_versions=1, min_age_s=0)
    assert (report.dropped_versions, report.read_versions) == ([1], [])
    assert {path for path, _ in report.removed} == only_v1
    assert all(not _exists(storage, root, path) for path in only_v1)

    with pytest.raises(ManifestError, match="version 1 of .* was removed .*before this evaluate began"):
        with reading_versions(storage, [(root, 1)], "evaluate", ManifestError):
            pass
    assert not _record_files(storage, root)


class _ReaderStartsWhileGcDeletes(Storage):
    """The store as a reader racing gc sees it: the reader writes its record of version 1 just before gc deletes that
    version's manifest, after gc read the records without it."""

    def __init__(self, endpoint_url, root):
        super().__init__(endpoint_url)
        self.root, self.reader = root, None
        self.deleted_while_read = False

    def delete(self, location) -> None:
        if location == manifest_location(self.root, 1) and self.reader is None:
            self.reader = RunRecord(Storage(self.endpoint_url), self.root, "evaluate", reads=[1]).__enter__()
            super().delete(location)
            self.deleted_while_read = not self.exists(location)
            return
        super().delete(location)


@pytest.mark.integration
def test_gc_puts_back_a_version_a_reader_recorded_while_gc_dropped_it(storage_folder):
    storage, root = storage_folder
    paths = _dataset_with_two_versions(storage, root)
    v1 = storage.read_bytes(manifest_location(root, 1))
    racing = _ReaderStartsWhileGcDeletes(storage.endpoint_url, root)
    try:
        report = collect_garbage(root, racing, keep_versions=1, min_age_s=0)
        assert racing.reader is not None and racing.deleted_while_read  # the race really happened
        assert (report.dropped_versions, report.read_versions) == ([], [1])
        assert storage.read_bytes(manifest_location(root, 1)) == v1  # put back as it was
        for path in (paths["old"], paths["errors_v1"], paths["sources_v1"]):
            assert _exists(storage, root, path), path
        assert {path for path, _ in report.removed} == {paths["leftover"]}
    finally:
        racing.reader.__exit__(None, None, None)
    assert collect_garbage(root, storage, keep_versions=1, min_age_s=0).dropped_versions == [1]


@pytest.mark.integration
def test_a_reader_that_may_not_write_the_dataset_reads_unrecorded_and_says_what_gc_may_do(
    s3_server, s3_bucket, monkeypatch, caplog
):
    import pipeline.storage

    root, storage = parse_uri(f"s3://{s3_bucket}/clips"), Storage(s3_server.endpoint_url)
    paths = _dataset_with_two_versions(storage, root)
    iam = boto3.client("iam", endpoint_url=s3_server.endpoint_url)
    user = f"reader-{s3_bucket}"
    iam.create_user(UserName=user)
    # Real S3 authorises listing as s3:ListBucket; moto from 5.2.6 on authorises it as the API call's name
    # (s3:ListObjectsV2 / s3:ListObjects). The reader is granted listing under every name, and nothing that writes.
    listing = ["s3:ListBucket", "s3:ListObjectsV2", "s3:ListObjects"]
    iam.put_user_policy(UserName=user, PolicyName="read-only", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", *listing], "Resource": "*"}],
    }))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    monkeypatch.setattr(pipeline.storage, "_clients", {})  # clients made with the test's own keys
    s3_server.require_credentials(True)
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.dataset.runs"):
            with reading_versions(storage, [(root, 1)], "train", ManifestError):
                with pytest.raises(PermissionError):  # the store really refuses this reader's writes
                    storage.put_bytes(root.join(RUNS_DIR, "probe.json"), b"{}")
                assert not _record_files(storage, root)
                s3_server.require_credentials(False)  # the dataset's owner runs gc meanwhile
                report = collect_garbage(root, storage, keep_versions=1, min_age_s=0)
    finally:
        s3_server.require_credentials(False)
    [warning] = [record.getMessage() for record in caplog.records if record.name == "pipeline.dataset.runs"]
    assert f"this train may not write s3://{s3_bucket}/clips/runs/" in warning
    assert (f"so no record keeps version 1 of {root.uri} from gc: `uniformer gc {root.uri} --keep-versions N` removes "
            "version 1 while this train runs as soon as N newer versions exist") in warning
    assert f"Allow writes under {root.uri}/runs/ to protect it" in warning
    # which is what the warning said gc may do
    assert report.dropped_versions == [1] and not _exists(storage, root, paths["old"])


def _described_part(storage, location) -> None:
    table = pa.table({"video_id": ["a.mp4"]}).replace_schema_metadata({b"uniformer.test": b'{"videos": ["a.mp4"]}'})
    publish_table(storage, location, table)


@pytest.mark.integration
def test_adoption_takes_a_part_gone_or_not_whole_for_a_leftover(storage_folder):
    storage, root = storage_folder
    whole = root.join("shards/part-whole.parquet")
    _described_part(storage, whole)
    adopted = published_part(storage, whole, "shards/part-whole.parquet", b"uniformer.test")
    assert adopted["videos"] == ["a.mp4"] and adopted["shard"]["rows"] == 1 and adopted["adopted"]

    data = storage.read_bytes(whole)
    for name, content in (("cut", data[: len(data) // 2]), ("empty", b""), ("text", b"not parquet")):
        storage.put_bytes(root.join(f"shards/part-{name}.parquet"), content)
        assert published_part(storage, root.join(f"shards/part-{name}.parquet"), "x", b"uniformer.test") is None
    assert published_part(storage, root.join("shards/part-gone.parquet"), "x", b"uniformer.test") is None


@pytest.mark.integration
def test_adoption_raises_a_store_that_refuses_instead_of_taking_the_part_for_a_leftover(s3_server, s3_bucket):
    storage, root = Storage(s3_server.endpoint_url), parse_uri(f"s3://{s3_bucket}/clips")
    part = root.join("shards/part-whole.parquet")
    _described_part(storage, part)
    s3_server.require_credentials(True)  # every key refused from now on
    try:
        with pytest.raises(OSError, match="ACCESS_DENIED"):
            published_part(storage, part, "shards/part-whole.parquet", b"uniformer.test")
    finally:
        s3_server.require_credentials(False)
    assert published_part(storage, part, "shards/part-whole.parquet", b"uniformer.test")["adopted"]


def _all_files(storage, root) -> dict[str, bytes]:
    return {info.location.relative_to(root): storage.read_bytes(info.location)
            for folder in ("manifests", "shards", "sources", "errors") for info in storage.list_objects(root.join(folder))}


def _without_shards(body: dict) -> dict:
    return {key: value for key, value in body.items() if key != "shards"}


@pytest.mark.parametrize(("damage", "message"), [
    (lambda storage, root, paths: _rewrite_v2(storage, root, _without_shards), "v000002.json lacks shards"),
    (lambda storage, root, paths: storage.put_bytes(root.join("manifests/v000002.json"), b'{"version": 2, "shar'),
     "v000002.json is not valid JSON"),
    (lambda storage, root, paths: storage.put_bytes(root.join("manifests/v000002.json"), b"[1, 2]"),
     "v000002.json holds a JSON list, not a manifest's object"),
    (lambda storage, root, paths: storage.delete(root.join(paths["sources_v2"])), "names 1 file(s) that are not there"),
    (lambda storage, root, paths: storage.put_bytes(root.join(paths["sources_v2"]), b"PAR1 not parquet"),
     "its chain of source tables cannot be read"),
    (lambda storage, root, paths: storage.delete(root.join(paths["new"])), "shards/part-new.parquet"),
])
def test_gc_over_a_damaged_kept_version_deletes_nothing_and_exits_1(tmp_path, damage, message):
    from typer.testing import CliRunner

    from jobs.cli import app

    storage, root = Storage(), parse_uri(str(tmp_path / "clips"))
    paths = _dataset_with_two_versions(storage, root)
    damage(storage, root, paths)
    before = _all_files(storage, root)
    assert "manifests/v000001.json" in before  # the version gc would drop: still there after the refusal
    result = CliRunner().invoke(app, ["gc", str(tmp_path / "clips"), "--keep-versions", "1", "--min-age", "0"])
    assert result.exit_code == 1, result.output
    assert message in result.output and "gc deleted nothing" in result.output, result.output
    assert "Traceback" not in result.output
    assert _all_files(storage, root) == before


def _rewrite_v2(storage, root, change) -> None:
    location = root.join("manifests/v000002.json")
    storage.put_bytes(location, json.dumps(change(json.loads(storage.read_bytes(location)))).encode())


@pytest.mark.parametrize(("content", "message"), [
    (b"[]", "holds a JSON list, not a manifest's object"),
    (b"\xff\xfe", "is not valid JSON"),
    ("extra", "has keys a clip dataset manifest does not: surprise"),
    ("no shards", "lacks shards"),
    ("shards a string", "shards is 'x', not list"),
    ("shard without rows", "lacks shards[0].rows"),
])
def test_every_reader_of_a_damaged_manifest_gets_a_clear_error_naming_the_file(tmp_path, content, message):
    storage, root = Storage(), parse_uri(str(tmp_path / "clips"))
    _dataset_with_two_versions(storage, root)
    changes = {
        "extra": lambda body: {**body, "surprise": 1},
        "no shards": _without_shards,
        "shards a string": lambda body: {**body, "shards": "x"},
        "shard without rows": lambda body: {**body, "shards": [{"path": "shards/a.parquet", "sha256": "0", "bytes": 1}]},
    }
    if isinstance(content, bytes):
        storage.put_bytes(root.join("manifests/v000002.json"), content)
    else:
        _rewrite_v2(storage, root, changes[content])
    with pytest.raises(ManifestError) as refused:
        load_manifest(str(tmp_path / "clips"))
    assert "manifests/v000002.json" in str(refused.value) and message in str(refused.value), refused.value
