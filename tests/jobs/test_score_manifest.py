"""A predictions manifest, like a clip dataset's, may only name paths inside its own folder."""

from __future__ import annotations

import json

import pytest

from pipeline.dataset.parts import ShardEntry
from pipeline.dataset.versions import ManifestError
from pipeline.predictions import ScoreConfigError, ScoreManifest


def written(**changes) -> str:
    manifest = ScoreManifest(
        version=1, source="s3://archive/", model={"name": "m", "version": 1}, params={"views": "1x1"},
        class_names=["left", "right"], shards=[ShardEntry("predictions/part-0.parquet", 2, "ab" * 32, 100)],
        source_tables=[{"path": "sources/v000001-run.parquet", "rows": 1}], num_sources=1,
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


def test_a_source_table_outside_the_folder_is_refused():
    outside = [{"path": "../other-model/sources/v000001-run.parquet", "rows": 1}]
    with pytest.raises(ManifestError, match="source table '../other-model/sources/v000001-run.parquet'"):
        ScoreManifest.from_json(written(source_tables=outside), "scores/manifests/v000001.json")


def test_predictions_of_the_older_schema_are_refused_with_what_to_do():
    older = json.loads(written(schema_version=1))
    del older["source_tables"], older["num_sources"]
    older["sources"] = {"v0": {"uri": "s3://archive/v0.mp4", "etag": "e", "size": 1, "shard": "p"}}
    with pytest.raises(ScoreConfigError, match=r"schema version 1, written by an older uniformer.*--out NEW_DST"):
        ScoreManifest.from_json(json.dumps(older), "scores/manifests/v000001.json")
    with pytest.raises(ScoreConfigError, match="not a predictions manifest"):
        ScoreManifest.from_json(written(kind="clips"), "scores/manifests/v000001.json")
