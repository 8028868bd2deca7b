"""A predictions manifest, like a clip dataset's, may only name paths inside its own folder."""

from __future__ import annotations

import json

import pytest

from jobs.scoring.results import ScoreManifest
from pipeline.manifest import ManifestError, ShardEntry


def written(**changes) -> str:
    manifest = ScoreManifest(
        version=1, source="s3://archive/", model={"name": "m", "version": 1}, params={"views": "1x1"},
        class_names=["left", "right"], shards=[ShardEntry("predictions/part-0.parquet", 2, "ab" * 32, 100)],
        sources={"v0": {"uri": "s3://archive/v0.mp4", "etag": "e", "size": 1, "shard": "predictions/part-0.parquet"}},
        counts={"listed": 2}, throughput={}, errors="errors/v000001-run.parquet",
    )
    body = json.loads(manifest.to_json())
    body.update(changes)
    return json.dumps(body)


def test_a_predictions_manifest_naming_a_path_outside_its_folder_is_refused():
    assert ScoreManifest.from_json(written(), "scores/manifests/v000001.json").errors == "errors/v000001-run.parquet"
    outside = [{"path": "../other-model/predictions/part-0.parquet", "rows": 2, "sha256": "ab" * 32, "bytes": 100}]
    with pytest.raises(ManifestError, match="shard '../other-model/predictions/part-0.parquet'"):
        ScoreManifest.from_json(written(shards=outside), "scores/manifests/v000001.json")
    with pytest.raises(ManifestError, match="errors table 's3://other-bucket/errors.parquet'"):
        ScoreManifest.from_json(written(errors="s3://other-bucket/errors.parquet"), "scores/manifests/v000001.json")
