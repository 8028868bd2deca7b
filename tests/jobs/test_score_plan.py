"""The scoring plan over a columnar listing: one prediction per video id, items handed to Ray Data on demand; the
model resolved while the source is listed."""

from __future__ import annotations

import threading
import time

import pytest

import jobs.score
import model
from jobs.options import ScoreConfig
from jobs.registry import ModelIdentity, ModelReferenceError
from jobs.score import Throughput, ray_items, run_score, throughput_line
from jobs.scoring.results import plan_score, shard_name, source_record
from model.package import ModelCard, save_package
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


def _watched_listing(monkeypatch, release: threading.Event | None = None) -> threading.Event:
    """Wraps the job's listing: the event says it began; with `release`, it waits for that before listing."""
    began, list_videos = threading.Event(), jobs.score.list_videos

    def listing(*args):
        began.set()
        if release is not None:
            release.wait(timeout=30)
        return list_videos(*args)

    monkeypatch.setattr(jobs.score, "list_videos", listing)
    return began


def test_the_model_is_resolved_while_the_source_is_listed(tmp_path, monkeypatch):
    card = ModelCard("uniformerv2_tiny", 2, {"t_size": 8}, ["a", "b"], frames=8, crop_size=32, short_side=40)
    save_package(model.create_model(card.model, card.num_classes, **card.overrides).eval(), card, tmp_path / "pkg")
    (tmp_path / "src").mkdir()
    for name in ("a.mp4", "b.mp4"):
        (tmp_path / "src" / name).write_bytes(b"not decoded by a dry run")
    listing_began = _watched_listing(monkeypatch)
    seen_by_resolution, resolve_model = [], jobs.score.resolve_model

    def resolving(*args):
        seen_by_resolution.append(listing_began.wait(timeout=10))  # the old order listed only after resolving
        return resolve_model(*args)

    monkeypatch.setattr(jobs.score, "resolve_model", resolving)
    config = ScoreConfig(str(tmp_path / "src"), str(tmp_path / "out"), str(tmp_path / "pkg"), views="1x1")
    preview = run_score(config, dry_run=True, echo=lambda _: None)
    assert seen_by_resolution == [True] and (preview.listed, preview.to_score) == (2, 2)


def test_a_model_that_cannot_be_resolved_fails_the_job_without_waiting_for_the_listing(tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    release = threading.Event()
    listing_began = _watched_listing(monkeypatch, release)
    config = ScoreConfig(str(tmp_path / "src"), str(tmp_path / "out"), str(tmp_path / "no-package"))
    started = time.monotonic()
    try:
        with pytest.raises(ModelReferenceError):
            run_score(config, echo=lambda _: None)
        assert listing_began.is_set() and time.monotonic() - started < 20  # the listing is held for 30 s
    finally:
        release.set()
    assert not (tmp_path / "out").exists()  # nothing written
