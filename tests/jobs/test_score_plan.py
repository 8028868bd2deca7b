"""The scoring plan over a columnar listing: one prediction per video id, items handed to Ray Data on demand."""

from __future__ import annotations

from jobs.registry import ModelIdentity
from jobs.score import Throughput, ray_items, throughput_line
from jobs.scoring.results import plan_score, shard_name, source_record
from pipeline.listing import SourceVideo, VideoListing
from pipeline.predictions import ScoreParams
from pipeline.storage import Storage, parse_uri

IDENTITY = ModelIdentity("models:/m/1", "m", 1, None, None, None, "0" * 64)
PARAMS = ScoreParams(frames=8, crop=224, short_side=256, temporal_views=1, spatial_views=1, sampling="uniform",
                     stride=0, top_k=5, full_probs=False)


def test_two_keys_of_one_video_id_are_scored_once_as_the_last_listed(tmp_path):
    first = SourceVideo("/src/cafe\u0301.mp4", "café.mp4", 1, "a")
    second = SourceVideo("/src/café.mp4", "café.mp4", 2, "b")
    videos = [SourceVideo("/src/a.mp4", "a.mp4", 3, "c"), first, second, SourceVideo("/src/z.mp4", "z.mp4", 4, "d")]
    plan = plan_score(parse_uri(str(tmp_path / "dst")), parse_uri("/src"), VideoListing.of(videos), IDENTITY, PARAMS,
                      None, Storage())
    records = [source_record(video) for video in (videos[0], second, videos[3])]
    assert list(plan.groups) == [{"shard": shard_name(IDENTITY, PARAMS, records), "videos": records}]
    assert plan.num_pending == 3 and len(plan.listed) == 4


def test_score_items_are_one_per_pending_video_with_its_group_index(tmp_path):
    videos = [SourceVideo(f"/src/v{i:04d}.mp4", f"v{i:04d}.mp4", i, f"e{i}") for i in range(2000)]
    plan = plan_score(parse_uri(str(tmp_path / "dst")), parse_uri("/src"), VideoListing.of(videos), IDENTITY, PARAMS,
                      None, Storage())
    items = ray_items(plan.groups.videos, plan.groups.size)
    assert len(plan.groups) == 63 and plan.groups.size == 32 and len(items) == 2000
    assert items[1999] == {"video_id": "v1999.mp4", "source_uri": "/src/v1999.mp4", "source_etag": "e1999",
                           "source_size": 1999, "shard": 62}
    assert [item["shard"] for item in items][::500] == [0, 15, 31, 46]


def test_videos_out_of_id_order_are_scored_once_per_id_in_first_listed_order(tmp_path):
    z, a = SourceVideo("/src/z.mp4", "z.mp4", 4, "d"), SourceVideo("/src/a.mp4", "a.mp4", 3, "c")
    first, second = SourceVideo("/src/e1.mp4", "e.mp4", 1, "a"), SourceVideo("/src/e2.mp4", "e.mp4", 2, "b")
    plan = plan_score(parse_uri(str(tmp_path / "dst")), parse_uri("/src"), VideoListing.of([z, first, a, second]),
                      IDENTITY, PARAMS, None, Storage())
    assert list(plan.groups.videos) == [z, second, a]


def test_the_summary_says_the_rate_after_the_first_predictions_or_that_there_was_none():
    speed = Throughput(videos=40, startup_seconds=3.0)
    speed.finish(seconds=5.0, first_rows=8)
    assert throughput_line(speed) == "  8.00 videos/s (16.00 after the first predictions, which took 3.0 s)"
    speed.finish(seconds=5.0, first_rows=40)  # every prediction in the first batch
    assert throughput_line(speed) == "  8.00 videos/s (all in the first predictions, which took 3.0 s)"
