"""Plans over a columnar listing: the same decisions as over a list of videos, without a Python object per video."""

from __future__ import annotations

import json

from pipeline.dataset.sources import SourceTable, deleted_inputs, partition_inputs
from pipeline.ingest import _source_record, plan_ingest, ray_items, shard_name
from pipeline.listing import SourceVideo, VideoListing
from pipeline.manifest import SHARDS_DIR, SamplingParams
from pipeline.schema import ErrorRecord

SAMPLING = SamplingParams(frames=4, short_side=32, size=28)


def _videos(count: int, label: str | None = "left") -> list[SourceVideo]:
    return [SourceVideo(f"/src/v{i:03d}.mp4", f"v{i:03d}.mp4", 10 + i, f"e{i}", label) for i in range(count)]


def test_partition_matches_the_listing_against_the_done_columns():
    videos = _videos(8) + [SourceVideo("/src/unlabelled.mp4", "unlabelled.mp4", 1, "e", None)]
    done = SourceTable.from_rows(
        [{"video_id": video.video_id, "etag": video.etag, "size": video.size, "label_name": video.label_name}
         for video in videos[:3] + videos[6:]]
        + [{"video_id": "gone.mp4", "etag": "e", "size": 1, "label_name": "left"}]
    )
    changed = {"v001.mp4": {"etag": "changed"}, "v006.mp4": {"size": 99}, "v007.mp4": {"label_name": None}}
    done = SourceTable.from_rows([{**row, **changed.get(row["video_id"], {})} for row in done.table.to_pylist()])
    failed = ErrorRecord(videos[4].uri, videos[4].etag, "decode", "VideoDecodeError", "bad")
    failed_before_change = ErrorRecord(videos[5].uri, "old etag", "decode", "VideoDecodeError", "bad")
    failures = {(error.source_uri, error.source_etag): error for error in (failed, failed_before_change)}
    compared = ("etag", "size", "label_name")

    from_list = partition_inputs(videos, done, compared, failures)
    columnar = partition_inputs(VideoListing.of(videos), done, compared, failures)
    for partition in (from_list, columnar):
        assert isinstance(partition.pending, VideoListing) and isinstance(partition.already_done, VideoListing)
        # a null label equals a null label; a changed etag, size or label, or a changed failed video, is pending
        assert list(partition.already_done) == [videos[0], videos[2], videos[8]]
        assert list(partition.pending) == [videos[1], videos[3], videos[5], videos[6], videos[7]]
        assert partition.known_failures == [failed]
    retried = partition_inputs(videos, done, compared, failures, retry_errors=True)
    assert list(retried.pending) == [videos[1], videos[3], videos[4], videos[5], videos[6], videos[7]]
    assert deleted_inputs(done, videos) == {"gone.mp4"} and deleted_inputs(done, videos, keep_deleted=True) == set()


def test_ingest_plan_groups_are_the_records_of_consecutive_pending_videos():
    videos = _videos(600)
    listing = VideoListing.of(videos)
    plan = plan_ingest("/dst", "/src", listing, listing, [], "dirs", SAMPLING, None, None)
    size = 3  # 600 pending over at least 256 groups
    assert plan.num_pending == 600 and len(plan.groups) == 200 and plan.class_map == {"left": 0}
    for index in (0, 57, 199):
        records = [_source_record(video, plan.class_map) for video in videos[index * size : (index + 1) * size]]
        assert plan.groups[index] == {"shard": f"{SHARDS_DIR}/{shard_name(SAMPLING, records)}", "videos": records}
    items = ray_items(plan, cpus=4)
    handed = [json.loads(item["groups"]) for item in items]
    assert [group for task in handed for group in task] == [plan.groups[index] for index in range(200)]
    assert '"v003.mp4"' in items[0]["groups"] and '"published"' not in items[0]["groups"]
    marked = ray_items(plan, cpus=4, published={plan.groups.names[1]})
    assert [group["published"] for group in json.loads(marked[0]["groups"])[:3]] == [False, True, False]


def test_a_class_list_turns_videos_of_other_classes_into_errors_in_a_columnar_plan():
    videos = _videos(3) + [SourceVideo("/src/w.mp4", "w.mp4", 1, "e", "right")]
    listing = VideoListing.of(videos)
    plan = plan_ingest("/dst", "/src", listing, listing, [], "dirs", SAMPLING, None, None, class_names=["left"])
    assert [error.error_type for error in plan.label_errors] == ["UnknownClass"]
    assert plan.label_errors[0].source_uri == "/src/w.mp4" and plan.num_pending == 3
