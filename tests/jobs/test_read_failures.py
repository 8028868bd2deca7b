"""A video that cannot be read is one error row only when the fault is the video's own (it was deleted since the
listing); a store that refuses or cannot be reached fails the task instead, so that a re-run resumes rather than every
video being recorded, and remembered, as failed. Ingest and scoring alike, against the S3 server."""

from __future__ import annotations

import numpy as np
import pytest
from botocore.exceptions import ClientError

from jobs.score import decode_batch
from pipeline.ingest import ingest_group
from pipeline.manifest import SamplingParams
from pipeline.predictions import ScoreParams
from pipeline.storage import Storage, parse_uri

pytestmark = pytest.mark.integration


@pytest.fixture
def videos_on_s3(s3_server, make_videos, tmp_path) -> tuple[str, list]:
    """(bucket, listing) of two tiny videos uploaded to the S3 server."""
    make_videos(tmp_path / "videos", classes=("left",), num_per_class=2)
    bucket = s3_server.create_bucket("sources")
    s3_server.upload_folder(tmp_path / "videos", bucket)
    listing = Storage(s3_server.endpoint_url).list_objects(parse_uri(f"s3://{bucket}"))
    return bucket, [info for info in listing if info.location.path.endswith(".mp4")]


@pytest.fixture
def refusing(s3_server, videos_on_s3):
    """The S3 server rejecting every request's credentials, checked with a read of its own; restored afterwards."""
    bucket, listing = videos_on_s3
    s3_server.require_credentials(True)
    try:
        with pytest.raises(ClientError, match="InvalidAccessKeyId|AccessDenied|403"):
            s3_server.client().get_object(Bucket=bucket, Key=listing[0].location.path)
        yield
    finally:
        s3_server.require_credentials(False)


def ingest(listing: list, storage: Storage, tmp_path) -> dict:
    sources = [{"uri": info.location.uri, "video_id": info.location.path, "etag": info.etag, "size": info.size,
                "label_name": "left", "label": 0} for info in listing]
    return ingest_group({"shard": "shards/part-0.parquet", "videos": sources}, storage,
                        SamplingParams(frames=4, short_side=32, size=28), str(tmp_path / "clips"))


def score(listing: list, storage: Storage) -> dict:
    batch = {
        "video_id": np.array([info.location.path for info in listing], dtype=object),
        "source_uri": np.array([info.location.uri for info in listing], dtype=object),
        "source_etag": np.array([info.etag for info in listing], dtype=object),
        "source_size": np.array([info.size for info in listing]),
        "shard": np.zeros(len(listing), dtype=np.int64),
    }
    params = ScoreParams(frames=4, crop=28, short_side=32, temporal_views=1, spatial_views=1, sampling="uniform",
                         stride=16, top_k=1, full_probs=False)
    return decode_batch(batch, storage, params)


def test_a_video_deleted_since_the_listing_is_one_error_row(s3_server, videos_on_s3, tmp_path):
    bucket, listing = videos_on_s3
    s3_server.client().delete_object(Bucket=bucket, Key=listing[0].location.path)
    # ingest spills every video to local disk first (a large video's path), scoring reads them into memory
    spilling = Storage(s3_server.endpoint_url, spill_threshold_bytes=0)
    ingested = ingest(listing, spilling, tmp_path)
    assert [(e["stage"], e["error_type"]) for e in ingested["errors"]] == [("read", "FileNotFoundError")]
    assert [video["uri"] for video in ingested["videos"]] == [listing[1].location.uri]
    scored = score(listing, Storage(s3_server.endpoint_url))
    assert list(scored["error_type"]) == ["FileNotFoundError", ""]


def test_a_store_refusing_reads_fails_the_ingest_task_instead_of_recording_every_video(
    s3_server, videos_on_s3, refusing, tmp_path
):
    with pytest.raises(ClientError):
        ingest(videos_on_s3[1], Storage(s3_server.endpoint_url), tmp_path)
    assert not (tmp_path / "clips" / "shards" / "part-0.parquet").exists()


def test_a_store_refusing_reads_fails_the_scoring_task_instead_of_recording_every_video(
    s3_server, videos_on_s3, refusing
):
    with pytest.raises(ClientError):
        score(videos_on_s3[1], Storage(s3_server.endpoint_url))


def test_a_segments_uri_is_scored_inside_its_segment(s3_server, tmp_path):
    """A segments dataset's inputs name their video with a media fragment: evaluation and the gate score the segment,
    not the whole video, and a segment that holds no frame is its own row's error."""
    from pipeline.synthetic import write_motion_video
    from pipeline.views import decode_views

    bucket = s3_server.create_bucket("segments")
    write_motion_video(tmp_path / "up" / "match.mp4", "left", size=(64, 48), num_frames=80, fps=8)  # 10 s
    s3_server.upload_folder(tmp_path / "up", bucket)
    storage = Storage(s3_server.endpoint_url)
    [info] = list(storage.list_objects(parse_uri(f"s3://{bucket}")))
    uris = [info.location.uri + "#t=6,9.5", info.location.uri, info.location.uri + "#t=20,30"]
    listing = [type(info)(parse_uri(uri), info.size, info.etag) for uri in uris]  # the fragment kept in the key
    scored = score(listing, storage)
    inside, _ = decode_views(str(tmp_path / "up" / "match.mp4"), 4, 28, 1, 1, short_side=32, segment=(6.0, 9.5))
    np.testing.assert_array_equal(scored["views"][0], inside)
    assert not np.array_equal(scored["views"][0], scored["views"][1])  # the whole video's views differ
    assert list(scored["error_type"]) == ["", "", "VideoDecodeError"]
    assert "holds no frame" in scored["error_message"][2]
