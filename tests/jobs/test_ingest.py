"""The ingest job end to end on real components: local Ray, real mp4 files, a local folder or moto S3 over HTTP."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.config import build
from jobs.ingest import run_ingest
from jobs.options import IngestConfig
from pipeline import (
    LabelsError,
    ManifestError,
    StorageError,
    iter_clip_batches,
    iter_clips,
    load_manifest,
    read_clips,
    write_motion_video,
)
from pipeline.dataset.sources import read_sources
from pipeline.ingest import IngestConfigError
from pipeline.storage import Storage, parse_uri
from tests.conftest import ignore_conditional_writes, kill_driver_after_first_part

pytestmark = pytest.mark.integration

SMALL = dict(frames=4, size=28, short_side=32)  # tiny clips keep the tests fast


def _rows(dst: str, **options) -> list[dict]:
    return list(iter_clips(dst, **options))


def _sources(dst: str, manifest) -> dict[str, dict]:
    return read_sources(parse_uri(dst), manifest, Storage()).to_dict()


def _assert_each_clip_once(rows: list[dict]) -> None:
    keys = Counter((row["video_id"], row["clip_index"]) for row in rows)
    assert all(count == 1 for count in keys.values()), [key for key, count in keys.items() if count > 1]


def test_keep_aspect_ingest_stores_the_frame_up_to_16_9_and_records_its_shape(tmp_path, ray_local):
    src, dst = tmp_path / "videos", str(tmp_path / "clips")
    for name, size in {"wide": (128, 72), "four_three": (64, 48), "portrait": (48, 64)}.items():
        write_motion_video(src / "right" / f"{name}.mp4", "right", size=size, num_frames=16)
    summary = run_ingest(build(IngestConfig, dict(src=str(src), out=dst, labels_from_dirs=True, keep="aspect",
                                                  **SMALL)))

    assert summary.ingested == 3 and summary.errored == 0
    manifest = load_manifest(dst)
    recorded = json.loads((Path(dst) / "manifests" / "v000001.json").read_text())["sampling"]
    assert (recorded["keep"], recorded["max_aspect"]) == ("aspect", "16:9")
    assert manifest.sampling.clip_shape == (4, 32, 56, 3)  # 32 x 16/9, made even
    shard = pq.read_table(os.path.join(dst, manifest.shards[0].path))
    assert shard.schema.field("frames").type == pa.binary(4 * 32 * 56 * 3)
    rows = {Path(row["source_uri"]).stem: row for row in _rows(dst)}
    # 16:9 fills the width; 4:3 is 42 wide at short side 32; portrait keeps its centre square
    assert {name: row["valid_width"] for name, row in rows.items()} == {"wide": 56, "four_three": 42, "portrait": 32}
    for row in rows.values():
        pad = (56 - row["valid_width"]) // 2
        assert row["frames"].shape == (4, 32, 56, 3)
        assert row["frames"][:, :, :pad].max(initial=0) == 0 and row["frames"][:, :, 56 - pad :].max(initial=0) == 0

    with pytest.raises(IngestConfigError, match="new --out"):  # a dataset keeps one frame shape
        run_ingest(build(IngestConfig, dict(src=str(src), out=dst, labels_from_dirs=True, keep="square")))


def test_local_folder_becomes_a_readable_clip_dataset(tmp_path, make_videos, ray_local):
    src, dst = tmp_path / "videos", str(tmp_path / "clips")
    videos = make_videos(src, num_per_class=2)
    summary = run_ingest(build(IngestConfig, dict(src=str(src), out=dst, labels_from_dirs=True, **SMALL)))

    assert (summary.listed, summary.ingested, summary.already_done, summary.errored) == (8, 8, 0, 0)
    manifest = load_manifest(dst)
    assert manifest.version == 1 and manifest.counts["listed"] == 8
    assert manifest.class_map == {"down": 0, "left": 1, "right": 2, "up": 3}
    assert manifest.sampling.size == 28 and manifest.sampling.short_side == 32
    assert manifest.num_clips == 8 and len(_sources(dst, manifest)) == manifest.num_sources == 8

    # A shard is plain Parquet: each clip's pixels one fixed-size binary value, in row groups of at most 16 clips;
    # readers get an Arrow-native fixed-shape tensor column.
    shard_path = os.path.join(dst, manifest.shards[0].path)
    shard = pq.read_table(shard_path)
    assert shard.schema.field("frames").type == pa.binary(4 * 32 * 32 * 3)
    assert shard.schema.field("label").type == pa.int32()
    metadata = pq.read_metadata(shard_path)
    assert all(metadata.row_group(g).num_rows <= 16 for g in range(metadata.num_row_groups))
    batch = next(iter_clip_batches(dst))
    assert batch.schema.field("frames").type == pa.fixed_shape_tensor(pa.uint8(), [4, 32, 32, 3])

    rows = _rows(dst)
    assert len(rows) == 8
    _assert_each_clip_once(rows)
    labels = dict(videos)
    for row in rows:
        assert row["frames"].shape == (4, 32, 32, 3) and row["frames"].dtype == np.uint8
        assert manifest.class_names[row["label"]] == row["label_name"] == labels[row["source_uri"]]
        assert row["frame_indices"] == [2, 6, 10, 14] and not row["padded"]
        assert row["fps"] == pytest.approx(8.0)

    dataset = read_clips(dst, columns=["frames", "label"])
    batches = list(dataset.iter_torch_batches(batch_size=8))
    assert len(batches) == 1
    frames = batches[0]["frames"]
    assert tuple(frames.shape) == (8, 4, 32, 32, 3) and str(frames.dtype) == "torch.uint8"


def test_a_class_list_fixes_class_ids_and_refuses_other_labels(tmp_path, make_videos, ray_local):
    src, dst = tmp_path / "videos", str(tmp_path / "clips")
    make_videos(src)  # one video each of down, left, right, up
    names = ["up", "left", "down"] + [f"filler {index}" for index in range(397)]  # a 400-class label map, no "right"
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    summary = run_ingest(
        build(
            IngestConfig,
            dict(src=str(src), out=dst, labels_from_dirs=True, classes=str(tmp_path / "classes.txt"), **SMALL),
        )
    )

    assert (summary.ingested, summary.errored) == (3, 1)
    assert [(error.stage, error.error_type) for error in summary.errors] == [("labels", "UnknownClass")]
    manifest = load_manifest(dst)
    assert manifest.class_names == names
    assert {row["video_id"].split("/")[0]: row["label"] for row in _rows(dst)} == {"up": 0, "left": 1, "down": 2}

    (tmp_path / "reordered.txt").write_text("left\nup\ndown\n")
    with pytest.raises(LabelsError, match="disagrees with the dataset's class ids"):
        run_ingest(
            build(
                IngestConfig,
                dict(src=str(src), out=dst, labels_from_dirs=True, classes=str(tmp_path / "reordered.txt"), **SMALL),
            )
        )
    assert load_manifest(dst).version == manifest.version
    with pytest.raises(ValueError, match="give it with a labels CSV or labels from folders"):
        run_ingest(build(IngestConfig, dict(src=str(src), out=dst, classes=str(tmp_path / "classes.txt"), **SMALL)))


def test_candidate_frames_per_segment_are_stored_for_temporal_jitter(tmp_path, make_videos, ray_local):
    src, dst = tmp_path / "videos", str(tmp_path / "clips")
    make_videos(src, num_per_class=1)
    run_ingest(build(IngestConfig, dict(src=str(src), out=dst, labels_from_dirs=True, frames_per_segment=3, **SMALL)))
    manifest = load_manifest(dst)
    assert manifest.sampling.frames == 4 and manifest.sampling.clip_shape == (12, 32, 32, 3)
    rows = _rows(dst)
    assert all(row["frames"].shape == (12, 32, 32, 3) for row in rows)
    # 16-frame videos: segments of 4 frames, candidates at 1/6, 3/6 and 5/6 of each; the middle one is the centre
    assert all(row["frame_indices"] == [0, 2, 3, 4, 6, 7, 8, 10, 11, 12, 14, 15] for row in rows)
    middle = manifest.sampling.pick_frames(np.stack([row["frames"] for row in rows]))
    assert middle.shape == (len(rows), 4, 32, 32, 3)
    assert (middle[0] == rows[0]["frames"][[1, 4, 7, 10]]).all()


def test_every_bad_input_is_accounted_for_and_nothing_else_is_lost(tmp_path, make_videos, broken_video, ray_local):
    src, dst = tmp_path / "videos", str(tmp_path / "clips")
    make_videos(src, num_per_class=1, layout="flat", write_labels_csv=False)
    good = sorted(path.name for path in src.iterdir())
    broken_kinds = ["truncated", "truncated_faststart", "zero_byte", "text", "png", "audio_only", "corrupt_header"]
    for kind in broken_kinds:
        broken_video(src / "broken" / f"{kind}.mp4", kind)
    odd_but_fine = {
        "short.mp4": dict(num_frames=2),
        "portrait.mp4": dict(size=(48, 96)),
        "odd size.mp4": dict(size=(33, 17)),
        "tiny.mp4": dict(size=(16, 16)),
        "vfr.mp4": dict(variable_frame_rate=True),
        "ünïcödé 名前.mp4": dict(),
    }
    for name, options in odd_but_fine.items():
        write_motion_video(src / "unusual" / name, "up", **{"size": (64, 48), "num_frames": 16, **options})
    labels = ["path,label"] + [f"{name},left" for name in good]
    labels += [f"broken/{kind}.mp4,left" for kind in broken_kinds]
    labels += [f"unusual/{name},up" for name in odd_but_fine]
    labels += ["gone/never-uploaded.mp4,down"]
    (tmp_path / "labels.csv").write_text("\n".join(labels) + "\n")

    summary = run_ingest(build(IngestConfig, dict(src=str(src), out=dst, labels=str(tmp_path / "labels.csv"), **SMALL)))

    total = len(good) + len(broken_kinds) + len(odd_but_fine)
    assert summary.listed == total
    assert summary.ingested == len(good) + len(odd_but_fine)
    assert summary.errored == len(broken_kinds)
    assert summary.labels_missing == 1
    errors = pq.read_table(summary.errors_uri).to_pylist()
    by_name = {Path(error["source_uri"]).name: error for error in errors}
    assert set(by_name) == {f"{kind}.mp4" for kind in broken_kinds} | {"never-uploaded.mp4"}
    for kind in broken_kinds:
        error = by_name[f"{kind}.mp4"]
        assert error["stage"] == "decode" and error["error_type"] == "VideoDecodeError"
        assert error["source_etag"] and "\n" not in error["message"] and ".cc:" not in error["message"]
    assert "empty file" in by_name["zero_byte.mp4"]["message"]
    assert "no video stream" in by_name["audio_only.mp4"]["message"]
    assert by_name["never-uploaded.mp4"]["error_type"] == "MissingVideo"

    rows = {row["video_id"]: row for row in _rows(dst, columns=["video_id", "clip_index", "padded", "frame_indices"])}
    assert len(rows) == summary.ingested
    assert rows["unusual/short.mp4"]["padded"] and rows["unusual/short.mp4"]["frame_indices"] == [0, 1, 1, 1]
    assert "unusual/ünïcödé 名前.mp4" in rows and "unusual/odd size.mp4" in rows
    assert not rows["unusual/portrait.mp4"]["padded"]


def test_labels_csv_escaping_the_source_is_refused_before_any_work(tmp_path, make_videos):
    src = tmp_path / "videos"
    make_videos(src)
    (tmp_path / "labels.csv").write_text("path,label\n../secrets/a.mp4,left\n")
    with pytest.raises(LabelsError, match="'..'"):
        run_ingest(
            build(
                IngestConfig,
                dict(src=str(src), out=str(tmp_path / "clips"), labels=str(tmp_path / "labels.csv"), **SMALL),
            )
        )
    assert not (tmp_path / "clips" / "manifests").exists()


def test_a_destination_that_ignores_conditional_writes_is_refused_before_any_work(
    s3_server, s3_bucket, tmp_path, make_videos, monkeypatch
):
    make_videos(tmp_path / "videos")
    ignored = ignore_conditional_writes(monkeypatch, "if_absent")
    with pytest.raises(StorageError, match="ignores If-None-Match"):
        run_ingest(
            build(
                IngestConfig,
                dict(
                    src=str(tmp_path / "videos"),
                    out=f"s3://{s3_bucket}/clips",
                    labels_from_dirs=True,
                    endpoint_url=s3_server.endpoint_url,
                    **SMALL,
                ),
            )
        )
    assert ignored  # the store really replaced an object an if-absent write found there
    assert "Contents" not in s3_server.client().list_objects_v2(Bucket=s3_bucket)


def test_incremental_run_decodes_only_new_and_changed_videos(tmp_path, make_videos, ray_local):
    src, dst = tmp_path / "videos", str(tmp_path / "clips")
    make_videos(src, num_per_class=1, classes=("left", "right"))
    first = run_ingest(build(IngestConfig, dict(src=str(src), out=dst, labels_from_dirs=True, **SMALL)))
    assert first.ingested == 2 and first.manifest_version == 1
    v1 = load_manifest(dst)

    # The bucket grows (a new class among them) and one video is replaced by a different one.
    write_motion_video(src / "left" / "new_left.mp4", "left", size=(64, 48), seed=101)
    write_motion_video(src / "up" / "new_up.mp4", "up", size=(64, 48), seed=102)
    changed = src / "right" / "right_0000.mp4"
    write_motion_video(changed, "right", size=(64, 48), num_frames=20, seed=103)

    second = run_ingest(build(IngestConfig, dict(src=str(src), out=dst, labels_from_dirs=True, **SMALL)))
    assert (second.listed, second.ingested, second.already_done, second.errored) == (4, 3, 1, 0)
    v2 = load_manifest(dst)
    assert v2.version == 2 and v2.previous_version == 1
    assert v2.class_map == {"left": 0, "right": 1, "up": 2}  # old ids kept, the new name appended
    assert len(_sources(dst, v2)) == 4
    rows = _rows(dst)
    assert len(rows) == 4
    _assert_each_clip_once(rows)
    changed_rows = [row for row in rows if row["video_id"] == "right/right_0000.mp4"]
    assert changed_rows[0]["source_etag"] == _sources(dst, v2)["right/right_0000.mp4"]["etag"]
    assert changed_rows[0]["source_etag"] != _sources(dst, v1)["right/right_0000.mp4"]["etag"]
    # the earlier version is still readable as it was
    assert len(_rows(f"{dst}@1")) == 2

    third = run_ingest(build(IngestConfig, dict(src=str(src), out=dst, labels_from_dirs=True, **SMALL)))
    assert (third.ingested, third.already_done, third.manifest_version, third.manifest_written) == (0, 4, 2, False)

    # an incremental run need not repeat the sampling: the manifest records it
    write_motion_video(src / "up" / "later_up.mp4", "up", size=(64, 48), seed=104)
    fourth = run_ingest(build(IngestConfig, dict(src=str(src), out=dst, labels_from_dirs=True)))
    assert (fourth.ingested, fourth.already_done, fourth.manifest_version) == (1, 4, 3)
    assert load_manifest(dst).sampling == v1.sampling


def test_changing_sampling_parameters_on_an_existing_dataset_is_refused(tmp_path, make_videos, ray_local):
    src, dst = tmp_path / "videos", str(tmp_path / "clips")
    make_videos(src, classes=("left",))
    run_ingest(build(IngestConfig, dict(src=str(src), out=dst, labels_from_dirs=True, **SMALL)))
    with pytest.raises(IngestConfigError, match="new --out"):
        run_ingest(build(IngestConfig, dict(src=str(src), out=dst, labels_from_dirs=True, **{**SMALL, "frames": 8})))
    with pytest.raises(IngestConfigError, match="new --out"):  # one flag alone, the rest as recorded
        run_ingest(build(IngestConfig, dict(src=str(src), out=dst, labels_from_dirs=True, frames=SMALL["frames"] + 1)))


def test_reader_refuses_a_version_with_a_missing_or_altered_shard(tmp_path, make_videos, ray_local):
    src, dst = tmp_path / "videos", tmp_path / "clips"
    make_videos(src, num_per_class=1)
    run_ingest(build(IngestConfig, dict(src=str(src), out=str(dst), labels_from_dirs=True, **SMALL)))
    shards = load_manifest(str(dst)).shards
    (dst / shards[0].path).unlink()
    first = pq.read_table(dst / shards[1].path)
    pq.write_table(pa.concat_tables([first, first]), dst / shards[1].path)
    with pytest.raises(ManifestError) as caught:
        list(iter_clips(str(dst)))
    message = str(caught.value)
    assert f"{shards[0].path}: missing" in message and f"{shards[1].path}: 2 rows, manifest says 1" in message
    with pytest.raises(ManifestError, match="incomplete"):
        read_clips(str(dst))


def test_killed_run_is_completed_by_a_rerun_without_duplicates_or_gaps(tmp_path, make_videos, ray_local):
    src, dst = tmp_path / "videos", tmp_path / "clips"
    make_videos(src, num_per_class=10)  # 40 videos, one shard each: the run takes a few seconds
    address = ray_local.get_runtime_context().gcs_address
    script = (
        "import sys; from jobs.ingest import run_ingest; from jobs.options import ClipSampling, IngestConfig; "
        "run_ingest(IngestConfig(sys.argv[1], sys.argv[2], labels_from_dirs=True, "
        "clip=ClipSampling(frames=4, size=28, short_side=32)))"
    )
    published = kill_driver_after_first_part(script, [str(src), str(dst)], address, dst / "shards")
    assert not (dst / "manifests").exists(), "the ingest finished before it could be killed"
    assert 1 <= len(published) < 40

    summary = run_ingest(build(IngestConfig, dict(src=str(src), out=str(dst), labels_from_dirs=True, **SMALL)))
    assert summary.ingested == 40 and summary.errored == 0
    assert summary.shards_adopted >= len(published)
    assert summary.shards_adopted + summary.shards_written == 40
    manifest = load_manifest(str(dst))
    assert {Path(shard.path).name for shard in manifest.shards} >= published
    rows = _rows(str(dst), columns=["video_id", "clip_index"])
    assert len(rows) == 40 and len({row["video_id"] for row in rows}) == 40
    _assert_each_clip_once(rows)


def test_s3_to_s3_with_dense_multi_clip_sampling_and_spilling(s3_server, s3_bucket, tmp_path, make_videos, ray_local):
    local = tmp_path / "videos"
    make_videos(local, num_per_class=1, num_frames=24)
    write_motion_video(local / "left" / "a clip with spaces.mp4", "left", size=(64, 48), num_frames=24)
    write_motion_video(local / "up" / "ビデオ ü.mp4", "up", size=(64, 48), num_frames=24)
    s3_server.upload_folder(local, s3_bucket, "raw")
    src, dst = f"s3://{s3_bucket}/raw", f"s3://{s3_bucket}/datasets/motion"

    summary = run_ingest(
        build(
            IngestConfig,
            dict(
                src=src,
                out=dst,
                labels=f"s3://{s3_bucket}/raw/labels.csv",
                endpoint_url=s3_server.endpoint_url,
                sampling="dense",
                stride=3,
                clips_per_video=2,
                **SMALL,
            ),
        ),
        spill_threshold_bytes=1,
    )
    # the two extra videos are not in labels.csv: listed, and errored as unlabelled
    assert (summary.listed, summary.ingested, summary.errored) == (6, 4, 2)
    manifest = load_manifest(dst, endpoint_url=s3_server.endpoint_url)
    assert manifest.sampling.sampling == "dense" and manifest.num_clips == 8
    keys = {item["Key"] for item in s3_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert "datasets/motion/manifests/v000001.json" in keys
    assert not [key for key in keys if "/.tmp-" in key]

    rows = _rows(dst, endpoint_url=s3_server.endpoint_url, columns=["video_id", "clip_index", "frame_indices"])
    _assert_each_clip_once(rows)
    for row in rows:
        assert np.diff(row["frame_indices"]).tolist() == [3, 3, 3]
    starts = Counter(row["video_id"] for row in rows)
    assert set(starts.values()) == {2}

    dataset = read_clips(dst, endpoint_url=s3_server.endpoint_url, columns=["frames"])
    assert dataset.count() == 8

    # Unlabelled keys with spaces and unicode come through when labelled: add them to the CSV and re-run.
    csv = s3_server.client().get_object(Bucket=s3_bucket, Key="raw/labels.csv")["Body"].read().decode()
    csv += "left/a clip with spaces.mp4,left\nup/ビデオ ü.mp4,up\n"
    s3_server.client().put_object(Bucket=s3_bucket, Key="raw/labels.csv", Body=csv.encode())
    again = run_ingest(
        build(
            IngestConfig,
            dict(
                src=src,
                out=dst,
                labels=f"s3://{s3_bucket}/raw/labels.csv",
                endpoint_url=s3_server.endpoint_url,
                sampling="dense",
                stride=3,
                clips_per_video=2,
                **SMALL,
            ),
        )
    )
    assert (again.ingested, again.already_done, again.errored) == (2, 4, 0)
    ids = {row["video_id"] for row in _rows(dst, endpoint_url=s3_server.endpoint_url, columns=["video_id"])}
    assert {"left/a clip with spaces.mp4", "up/ビデオ ü.mp4"} <= ids


def test_ingest_survives_an_s3_server_restart_mid_run(s3_server, s3_bucket, tmp_path, make_videos, ray_local):
    local = tmp_path / "videos"
    make_videos(local, num_per_class=6)
    s3_server.upload_folder(local, s3_bucket, "raw")
    client = s3_server.client()
    observed = {}

    def restart_after_first_shard():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            listing = client.list_objects_v2(Bucket=s3_bucket, Prefix="out/")
            keys = [item["Key"] for item in listing.get("Contents", [])]
            shards = [key for key in keys if "/shards/part-" in key]
            if shards:
                observed["shards_before_restart"] = len(shards)
                observed["manifest_before_restart"] = any("/manifests/" in key for key in keys)
                s3_server.restart(downtime_s=1.5)
                observed["restarted"] = True
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=restart_after_first_shard)
    watcher.start()
    summary = run_ingest(
        build(
            IngestConfig,
            dict(
                src=f"s3://{s3_bucket}/raw",
                out=f"s3://{s3_bucket}/out",
                labels_from_dirs=True,
                endpoint_url=s3_server.endpoint_url,
                **SMALL,
            ),
        )
    )
    watcher.join()
    assert observed.get("restarted") and not observed["manifest_before_restart"]
    assert observed["shards_before_restart"] < 24
    assert (summary.listed, summary.ingested, summary.errored) == (24, 24, 0)
    rows = _rows(f"s3://{s3_bucket}/out", endpoint_url=s3_server.endpoint_url, columns=["video_id", "clip_index"])
    assert len(rows) == 24
    _assert_each_clip_once(rows)


def test_unreachable_endpoint_fails_the_job_fast(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(StorageError, match=f"127.0.0.1:{port}"):
        run_ingest(
            build(
                IngestConfig,
                dict(src="s3://videos/raw", out="s3://clips/out", endpoint_url=f"http://127.0.0.1:{port}", **SMALL),
            )
        )
    assert time.monotonic() - started < 15


def test_failed_and_unlabelled_videos_are_remembered_and_a_rerun_with_nothing_new_writes_nothing(
    tmp_path, make_videos, broken_video, ray_local
):
    src, dst = tmp_path / "videos", str(tmp_path / "clips")
    make_videos(src, num_per_class=1, classes=("left", "right"))
    broken_video(src / "left" / "broken.mp4", "text")
    write_motion_video(src / "no class folder.mp4", "up", size=(64, 48))  # unlabelled: not in a class folder
    first = run_ingest(build(IngestConfig, dict(src=str(src), out=dst, labels_from_dirs=True, **SMALL)))
    assert (first.listed, first.ingested, first.errored, first.known_failures) == (4, 2, 2, 0)

    lines = []
    second = run_ingest(
        build(IngestConfig, dict(src=str(src), out=dst, labels_from_dirs=True, **SMALL)), echo=lines.append
    )
    assert (second.ingested, second.already_done, second.known_failures, second.errored) == (0, 2, 2, 0)
    assert (second.manifest_written, second.manifest_version) == (False, 1)
    assert "nothing new: 4 listed, 2 already ingested, 2 known failures" in lines
    assert any("0 to decode" in line for line in lines)  # the broken video was not decoded again

    retried = run_ingest(
        build(IngestConfig, dict(src=str(src), out=dst, labels_from_dirs=True, retry_errors=True, **SMALL))
    )
    assert (retried.errored, retried.known_failures, retried.manifest_written) == (1, 1, False)  # failed again
    assert [error.error_type for error in retried.errors] == ["VideoDecodeError"]

    write_motion_video(src / "left" / "broken.mp4", "left", size=(64, 48), seed=7)  # replaced: a new ETag
    fixed = run_ingest(build(IngestConfig, dict(src=str(src), out=dst, labels_from_dirs=True, **SMALL)))
    assert (fixed.ingested, fixed.known_failures, fixed.manifest_version) == (1, 1, 2)
    remembered = pq.read_table(fixed.errors_uri).to_pylist()  # the version's table: the unlabelled video alone
    assert [(Path(row["source_uri"]).name, row["stage"]) for row in remembered] == [("no class folder.mp4", "labels")]
    assert len(_rows(dst)) == 3


def test_videos_deleted_from_the_source_leave_the_next_version_unless_kept(tmp_path, make_videos, ray_local):
    src, dst = tmp_path / "videos", str(tmp_path / "clips")
    make_videos(src, num_per_class=2, classes=("left", "right"))
    run_ingest(
        build(IngestConfig, dict(src=str(src), out=dst, labels_from_dirs=True, **SMALL)), max_shard_bytes=1 << 30
    )  # one shard of 4 videos
    (src / "left" / "left_0000.mp4").unlink()

    kept = run_ingest(
        build(IngestConfig, dict(src=str(src), out=dst, labels_from_dirs=True, keep_deleted=True, **SMALL))
    )
    assert (kept.listed, kept.deleted, kept.manifest_written) == (3, 0, False)
    assert "left/left_0000.mp4" in {row["video_id"] for row in _rows(dst, columns=["video_id"])}

    dropped = run_ingest(build(IngestConfig, dict(src=str(src), out=dst, labels_from_dirs=True, **SMALL)))
    assert (dropped.listed, dropped.already_done, dropped.deleted, dropped.manifest_version) == (3, 3, 1, 2)
    v2 = load_manifest(dst)
    assert set(_sources(dst, v2)) == {"left/left_0001.mp4", "right/right_0000.mp4", "right/right_0001.mp4"}
    rows = _rows(dst, columns=["video_id", "clip_index"])
    assert sorted(row["video_id"] for row in rows) == sorted(_sources(dst, v2))  # the shard was rewritten without it
    assert len(_rows(f"{dst}@1", columns=["video_id"])) == 4  # version 1 still reads as it was


def test_untrimmed_videos_are_ingested_as_labelled_segments_each_its_own_input(tmp_path, ray_local):
    src, dst = tmp_path / "videos", str(tmp_path / "clips")
    write_motion_video(src / "match.mp4", "left", size=(64, 48), num_frames=80, fps=8)  # 10 s
    write_motion_video(src / "short.mp4", "up", size=(64, 48), num_frames=16, fps=8)  # 2 s
    segments = tmp_path / "segments.csv"
    segments.write_text("path,start,end,label\nmatch.mp4,1,4,serve\nmatch.mp4,6,9.5,rally\nshort.mp4,5,8,serve\n")
    config = dict(src=str(src), out=dst, labels=str(segments), **SMALL)
    first = run_ingest(build(IngestConfig, config))

    assert (first.listed, first.ingested, first.errored) == (3, 2, 1)  # the inputs are the segments
    [late] = first.errors  # the one segment that starts after its video's end, alone: its video's other rows stay
    assert late.source_uri.endswith("short.mp4#t=5,8") and "holds no frame of this 2.00 s video" in late.message
    manifest = load_manifest(dst)
    assert manifest.labels == "segments" and manifest.class_map == {"rally": 0, "serve": 1}
    rows = {row["video_id"]: row for row in _rows(dst)}
    assert sorted(rows) == ["match.mp4#t=1,4", "match.mp4#t=6,9.5"]
    for video_id, (first_frame, last_frame) in {"match.mp4#t=1,4": (8, 31), "match.mp4#t=6,9.5": (48, 75)}.items():
        frames = np.asarray(rows[video_id]["frame_indices"])
        assert first_frame <= frames.min() and frames.max() <= last_frame, (video_id, frames)
        assert rows[video_id]["source_uri"].endswith(video_id)
    assert rows["match.mp4#t=6,9.5"]["label_name"] == "rally"

    again = run_ingest(build(IngestConfig, config))
    assert (again.ingested, again.already_done, again.known_failures, again.manifest_written) == (0, 2, 1, False)
    segments.write_text("path,start,end,label\nmatch.mp4,1,4,serve\nmatch.mp4,4,6,rally\n")
    changed = run_ingest(build(IngestConfig, config))  # one segment moved, the other video's left the CSV
    assert (changed.listed, changed.ingested, changed.already_done, changed.errored) == (3, 1, 1, 1)
    assert (changed.deleted, changed.manifest_version) == (1, 2)
    assert [(Path(e.source_uri).name, e.error_type) for e in changed.errors] == [("short.mp4", "NotInLabels")]
    assert sorted(row["video_id"] for row in _rows(dst)) == ["match.mp4#t=1,4", "match.mp4#t=4,6"]
