"""Plans over a columnar listing: the same decisions as over a list of videos, without a Python object per video."""

from __future__ import annotations

from pipeline.ingest import _source_record, plan_ingest, ray_items, shard_name
from pipeline.listing import SourceVideo, VideoListing
from pipeline.manifest import SHARDS_DIR, SamplingParams
from pipeline.schema import ErrorRecord
from pipeline.versioned import partition_inputs

SAMPLING = SamplingParams(frames=4, short_side=32, size=28)


def _videos(count: int, label: str | None = "left") -> list[SourceVideo]:
    return [SourceVideo(f"/src/v{i:03d}.mp4", f"v{i:03d}.mp4", 10 + i, f"e{i}", label) for i in range(count)]


def test_partition_of_a_columnar_listing_stays_columnar_and_agrees_with_the_list():
    videos = _videos(6)
    done = {video.video_id: {"etag": video.etag} for video in videos[:3]}
    done["v001.mp4"] = {"etag": "changed"}
    failed = ErrorRecord(videos[4].uri, videos[4].etag, "decode", "VideoDecodeError", "bad")
    unchanged = lambda video, known: known["etag"] == video.etag  # noqa: E731

    failures = {(failed.source_uri, failed.source_etag): failed}
    from_list = partition_inputs(videos, done, unchanged, failures)
    columnar = partition_inputs(VideoListing.of(videos), done, unchanged, failures)
    assert isinstance(columnar.pending, VideoListing) and isinstance(columnar.already_done, VideoListing)
    assert list(columnar.pending) == from_list.pending == [videos[1], videos[3], videos[5]]
    assert list(columnar.already_done) == from_list.already_done == [videos[0], videos[2]]
    assert columnar.known_failures == from_list.known_failures == [failed]


def test_ingest_plan_groups_are_the_records_of_consecutive_pending_videos():
    videos = _videos(600)
    listing = VideoListing.of(videos)
    plan = plan_ingest("/dst", "/src", listing, listing, [], "dirs", SAMPLING, None, {})
    size = 3  # 600 pending over at least 256 groups
    assert plan.num_pending == 600 and len(plan.groups) == 200 and plan.class_map == {"left": 0}
    for index in (0, 57, 199):
        records = [_source_record(video, plan.class_map) for video in videos[index * size : (index + 1) * size]]
        assert plan.groups[index] == {"shard": f"{SHARDS_DIR}/{shard_name(SAMPLING, records)}", "videos": records}
    items = ray_items(plan)
    assert len(items) == 200 and '"v003.mp4"' in items[1]["group"]


def test_a_class_list_turns_videos_of_other_classes_into_errors_in_a_columnar_plan():
    videos = _videos(3) + [SourceVideo("/src/w.mp4", "w.mp4", 1, "e", "right")]
    listing = VideoListing.of(videos)
    plan = plan_ingest("/dst", "/src", listing, listing, [], "dirs", SAMPLING, None, {}, class_names=["left"])
    assert [error.error_type for error in plan.label_errors] == ["UnknownClass"]
    assert plan.label_errors[0].source_uri == "/src/w.mp4" and plan.num_pending == 3
