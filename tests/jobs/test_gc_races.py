"""`uniformer gc` racing the jobs that use a dataset: an ingest writing the next version, a training run reading an
older one. Real local Ray, real S3 server, real MLflow server."""

from __future__ import annotations

import json
import threading
import time

import pytest

from jobs.config import build
from jobs.ingest import run_ingest
from jobs.options import EvaluateConfig, IngestConfig
from jobs.training.config import TrainConfig
from pipeline import generate_motion_dataset, iter_clips, load_manifest
from pipeline.dataset.gc import collect_garbage
from pipeline.dataset.runs import RUNS_DIR
from pipeline.storage import Storage, parse_uri
from tests.jobs.test_train import finished, in_background, train_in_background

pytestmark = pytest.mark.integration

SMALL = dict(frames=4, size=28, short_side=32)  # tiny clips keep the tests fast


@pytest.fixture(params=["local", "s3"])
def clips(request, tmp_path, s3_server) -> tuple[str, str | None]:
    """(a clip dataset's root URI, the endpoint it is on): a local folder, and a bucket on the S3 server."""
    if request.param == "s3":
        return f"s3://{s3_server.create_bucket()}/clips", s3_server.endpoint_url
    return str(tmp_path / "clips"), None


def _parts(storage: Storage, root) -> set[str]:
    """The Parquet parts a job has published under shards/ (staging files are not `part-*`)."""
    return {info.location.relative_to(root) for info in storage.list_objects(root.join("shards"))
            if info.location.path.rsplit("/", 1)[-1].startswith("part-")}


def _files_of(manifest) -> set[str]:
    return {shard.path for shard in manifest.shards} | {table["path"] for table in manifest.source_tables}


def _records(storage: Storage, root) -> list[dict]:
    bodies = []
    for info in storage.list_objects(root.join(RUNS_DIR)):
        try:
            bodies.append(json.loads(storage.read_bytes(info.location)))
        except FileNotFoundError:  # its run ended while we listed
            pass
    return bodies


def test_gc_racing_an_ingest_removes_unreferenced_files_and_the_ingest_publishes_a_whole_version(
    clips, tmp_path, make_videos, ray_local, monkeypatch
):
    dst, endpoint_url = clips
    storage, root = Storage(endpoint_url), parse_uri(dst)
    src = tmp_path / "videos"
    ingest = build(IngestConfig, dict(src=str(src), out=dst, labels_from_dirs=True, endpoint_url=endpoint_url, **SMALL))
    make_videos(src, num_per_class=1, classes=("left", "right"))
    run_ingest(ingest)
    (src / "right" / "right_0000.mp4").unlink()
    run_ingest(ingest)  # v2: right_0000's shard is v1's alone
    only_v1 = (_files_of(load_manifest(f"{dst}@1", endpoint_url=endpoint_url))
               - _files_of(load_manifest(f"{dst}@2", endpoint_url=endpoint_url)))
    assert len([path for path in only_v1 if path.startswith("shards/")]) == 1
    # gc leaves what was written from a margin for clock skew before a running writer started; a file's time on S3 is
    # the server's, which cannot be set back, so the margin goes instead (server and writer share one clock here),
    # and the next second starts first (S3 keeps whole seconds)
    monkeypatch.setattr("pipeline.dataset.gc._RUN_START_MARGIN_S", 0.0)
    time.sleep(1.1)
    before = _parts(storage, root)
    make_videos(src / "batch2", num_per_class=8, seed=5)  # 32 new videos, one shard each: a run of several seconds

    thread, outcome = in_background(lambda: run_ingest(ingest))
    deadline = time.monotonic() + 120
    while not (_parts(storage, root) - before) and time.monotonic() < deadline:
        time.sleep(0.01)
    racing = collect_garbage(root, storage, keep_versions=1, min_age_s=0)
    running = thread.is_alive()
    summary = finished(thread, outcome)

    assert running, "the ingest finished before gc ran"
    removed = {path for path, _ in racing.removed}
    assert removed == {"manifests/v000001.json"} | only_v1
    assert any(path.startswith("shards/part-") for path in racing.protected)  # the running ingest's shards
    assert all(not storage.exists(root.join(path)) for path in removed) and racing.bytes_freed > 0
    assert (summary.ingested, summary.already_done, summary.manifest_version) == (32, 1, 3)
    # verifies every shard against the manifest
    rows = list(iter_clips(dst, endpoint_url=endpoint_url, columns=["video_id", "clip_index"]))
    assert len(rows) == 33 and len({(row["video_id"], row["clip_index"]) for row in rows}) == 33
    assert not _records(storage, root)  # the ingest removed its own record


def test_a_training_run_keeps_the_version_it_reads_from_gc_until_it_ends(tmp_path, mlflow_server, ray_local):
    src, dst = tmp_path / "videos", str(tmp_path / "clips")
    storage, root = Storage(), parse_uri(dst)
    generate_motion_dataset(src, num_per_class=4, size=(40, 40), num_frames=16, seed=3)
    ingest = build(IngestConfig, dict(src=str(src), out=dst, labels_from_dirs=True, frames=8, size=32, short_side=40))
    run_ingest(ingest, max_shard_bytes=1 << 30)  # v1: one shard of 16 videos
    (src / "left" / "left_0000.mp4").unlink()
    run_ingest(ingest, max_shard_bytes=1 << 30)  # v2: that shard rewritten without it
    only_v1 = _files_of(load_manifest(f"{dst}@1")) - _files_of(load_manifest(f"{dst}@2"))
    assert any(path.startswith("shards/") for path in only_v1)

    storage_path = tmp_path / "runs"
    cfg = TrainConfig(data=f"{dst}@1", model="uniformerv2_tiny", workers=1, epochs=1, max_steps=2, batch_size=4,
                      hflip=False, augment="crop", storage=str(storage_path), tracking_uri=mlflow_server.uri,
                      experiment="gc-reads", seed=5)
    seen, done = [], threading.Event()  # (a checkpoint of the run exists, the versions the records read)

    def watch() -> None:
        while not done.is_set():
            checkpointed = any(storage_path.glob(f"{cfg.name}/checkpoint_*/progress.json"))
            seen.append((checkpointed, [record.get("reads") for record in _records(storage, root)]))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    thread, outcome = train_in_background(cfg)
    try:
        deadline = time.monotonic() + 120
        while not any(reads for _, reads in seen) and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        racing = collect_garbage(root, storage, keep_versions=1, min_age_s=0)  # v2 is the newest
        running = thread.is_alive()
        result = finished(thread, outcome)  # the workers read every shard of v1 after gc ran
    finally:
        done.set()
        watcher.join()

    assert running, "the training run finished before gc ran"
    assert (racing.kept_versions, racing.read_versions, racing.dropped_versions) == ([2], [1], [])
    assert not {path for path, _ in racing.removed} & only_v1
    assert result.checkpoint and result.metrics["global_step"] == 2
    assert (True, [[1]]) in seen  # the record still held when the run had checkpointed: for the whole fit
    assert not _records(storage, root)  # and gone with the run
    after = collect_garbage(root, storage, keep_versions=1, min_age_s=0)
    assert after.dropped_versions == [1] and {path for path, _ in after.removed} >= only_v1


def test_an_evaluation_keeps_the_version_it_evaluates_from_gc_until_it_ends(tmp_path, s3_server, s3_bucket, ray_local):
    import torch

    import model
    from jobs.evaluate import evaluate_model
    from model.package import ModelCard, save_package

    src, dst, endpoint_url = tmp_path / "videos", f"s3://{s3_bucket}/clips", s3_server.endpoint_url
    storage, root = Storage(endpoint_url), parse_uri(dst)
    generate_motion_dataset(src, num_per_class=2, size=(40, 40), num_frames=16, seed=3)
    ingest = build(IngestConfig, dict(src=str(src), out=dst, labels_from_dirs=True, frames=8, size=32, short_side=40,
                                      endpoint_url=endpoint_url))
    run_ingest(ingest)
    (src / "left" / "left_0000.mp4").unlink()
    run_ingest(ingest)  # v2 without it: v1's source table is v1's alone
    only_v1 = (_files_of(load_manifest(f"{dst}@1", endpoint_url=endpoint_url))
               - _files_of(load_manifest(f"{dst}@2", endpoint_url=endpoint_url)))
    card = ModelCard("uniformerv2_tiny", 4, {"t_size": 8}, ["down", "left", "right", "up"], frames=8, crop_size=32,
                     short_side=40)
    torch.manual_seed(0)
    save_package(model.create_model(card.model, card.num_classes, **card.overrides).eval(), card, tmp_path / "package")

    evaluation = EvaluateConfig(f"{dst}@1", str(tmp_path / "package"), views="1x1", experiment=None,
                                endpoint_url=endpoint_url)
    thread, outcome = in_background(lambda: evaluate_model(evaluation))
    deadline = time.monotonic() + 120
    while not _records(storage, root) and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    records = _records(storage, root)
    racing = collect_garbage(root, storage, keep_versions=1, min_age_s=0)
    running = thread.is_alive()
    evaluation = finished(thread, outcome)

    assert running, "the evaluation finished before gc ran"
    assert [record["reads"] for record in records] == [[1]] and records[0]["job"] == "evaluate"
    assert (racing.kept_versions, racing.read_versions, racing.dropped_versions) == ([2], [1], [])
    assert not {path for path, _ in racing.removed} & only_v1
    # v1's 8 videos, the one since deleted from the source failing to decode
    assert evaluation.dataset == f"{dst}@1" and evaluation.videos == 7
    assert [failed["video_id"] for failed in evaluation.failed] == ["left/left_0000.mp4"]
    assert not _records(storage, root)  # gone with the evaluation
    assert collect_garbage(root, storage, keep_versions=1, min_age_s=0).dropped_versions == [1]
