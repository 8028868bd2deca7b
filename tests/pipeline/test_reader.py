"""Readers of a clip dataset version trust nothing the manifest does not vouch for: every shard's sha256 is checked
before rows are read, and a manifest may only name paths inside its dataset root. On S3 and on local storage."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.dataset.parts import ShardEntry, stream_sha256
from pipeline.dataset.versions import ManifestError, manifest_location
from pipeline.epochs import EpochPlan
from pipeline.manifest import Manifest, SamplingParams, load_manifest, write_manifest
from pipeline.reader import iter_clips
from pipeline.shards import ShardWriter
from pipeline.storage import Storage, parse_uri

SAMPLING = SamplingParams(frames=1, short_side=2, size=2)


def write_dataset(storage: Storage, root, shards: int = 2, videos_per_shard: int = 3) -> Manifest:
    """Version 1 of a dataset of tiny clips whose pixels spell their video's number, written as ingest writes it."""
    entries = []
    for shard in range(shards):
        relative = f"shards/part-{shard}.parquet"
        writer = ShardWriter(storage, root.join(relative), SAMPLING.frames, SAMPLING.short_side)
        for video in range(videos_per_shard):
            number = shard * videos_per_shard + video
            clips = np.full((1, *SAMPLING.clip_shape), number, np.uint8)
            writer.add_video(clips, np.zeros((1, 1), np.int32), f"v{number}", f"/videos/v{number}.mp4", "e",
                             label=number % 2, label_name=f"c{number % 2}", fps=8.0, padded=False)
        size, digest = writer.commit({})
        entries.append(ShardEntry(relative, writer.rows, digest, size))
    manifest = Manifest(1, "/videos", SAMPLING, "dirs", {"c0": 0, "c1": 1}, entries, [], 0, {})
    write_manifest(root, manifest, storage)
    return manifest


def read_video_ids(storage: Storage, root) -> list[str]:
    return [row["video_id"] for row in iter_clips(root.uri, columns=["video_id"], endpoint_url=storage.endpoint_url)]


def test_a_shard_altered_after_ingest_with_its_row_count_kept_is_refused_before_any_row_is_read(storage_folder):
    storage, root = storage_folder
    manifest = write_dataset(storage, root)
    altered = manifest.shards[1]
    location = root.join(altered.path)
    # the same rows with one clip's pixels changed: the footer check alone (row counts) would pass it
    table = pq.read_table(storage.arrow_path(location), filesystem=storage.arrow_filesystem(location))
    frames = table.column("frames").to_pylist()
    frames[0] = bytes([255]) * len(frames[0])
    column = table.schema.get_field_index("frames")
    table = table.set_column(column, table.schema.field(column), pa.array(frames, table.schema.field(column).type))
    staging = storage.staging_path(location)
    pq.write_table(table, staging)
    storage.commit_staged(staging, location)
    filesystem, path = storage.arrow_filesystem(location), storage.arrow_path(location)
    assert pq.read_metadata(path, filesystem=filesystem).num_rows == altered.rows  # the fault: same rows ...
    assert stream_sha256(filesystem, path)[1] != altered.sha256  # ... other content

    with pytest.raises(ManifestError) as plain:
        read_video_ids(storage, root)
    message = str(plain.value)
    assert f"{altered.path}: sha256" in message and f"manifest says {altered.sha256}" in message
    assert manifest.shards[0].path not in message  # only the altered shard is named
    assert "restore these shards" in message and "uniformer ingest SRC --out NEW_DST" in message
    with pytest.raises(ManifestError, match="sha256"):  # the training driver, cutting its epoch plan
        EpochPlan(root.uri, manifest, "train", 0.0, world_size=1, seed=0, endpoint_url=storage.endpoint_url)


def test_an_intact_version_reads_whole_and_its_shards_are_hashed_once_per_process(storage_folder, monkeypatch):
    storage, root = storage_folder
    write_dataset(storage, root)
    hashed = []

    def counting(filesystem, path):
        hashed.append(path)
        return stream_sha256(filesystem, path)

    monkeypatch.setattr("pipeline.reader.stream_sha256", counting)
    assert read_video_ids(storage, root) == [f"v{number}" for number in range(6)]
    assert read_video_ids(storage, root) == [f"v{number}" for number in range(6)]
    assert len(hashed) == 2 == len(set(hashed))


def craft(storage: Storage, root, edit) -> None:
    """Rewrite version 1's manifest with `edit` applied to its JSON body, as someone with write access could."""
    location = manifest_location(root, 1)
    body = json.loads(storage.read_bytes(location))
    edit(body)
    storage.put_bytes(location, json.dumps(body).encode())


@pytest.mark.parametrize("escape", ["../other/shards/part-0.parquet", "/etc/hosts", "shards/../../other/x.parquet",
                                    "s3://other-bucket/shards/part-0.parquet", "shards\\..\\..\\x.parquet", ""])
def test_a_manifest_naming_a_shard_outside_its_dataset_root_is_refused(storage_folder, escape):
    storage, root = storage_folder
    write_dataset(storage, root)
    # a readable shard where the escape leads, so that following the path would have read another dataset's rows
    other = root.join("..", "other") if root.scheme == "file" else parse_uri(f"s3://{root.bucket}/other")
    write_dataset(storage, other)

    def point_away(body):
        body["shards"][0]["path"] = escape

    craft(storage, root, point_away)
    with pytest.raises(ManifestError) as caught:
        read_video_ids(storage, root)
    assert f"shard {escape!r}" in str(caught.value) and "not a relative path inside the dataset root" in str(caught.value)
    assert manifest_location(root, 1).uri in str(caught.value)


@pytest.mark.parametrize("field", ["source_tables", "errors"])
def test_a_manifest_naming_a_source_or_errors_table_outside_its_root_is_refused(storage_folder, field):
    storage, root = storage_folder
    write_dataset(storage, root)

    def point_away(body):
        body[field] = [{"path": "../other/sources/v000001.parquet", "rows": 3}] if field == "source_tables" else \
            "../other/errors/v000001.parquet"

    craft(storage, root, point_away)
    with pytest.raises(ManifestError, match="inside the dataset root"):
        load_manifest(root.uri, endpoint_url=storage.endpoint_url)


def test_prediction_manifests_share_the_shard_path_check():
    # ShardEntry is what clip and prediction manifests both build their shard lists from
    with pytest.raises(ManifestError, match="inside the dataset root"):
        ShardEntry("../scores-of-another-model/predictions/part-0.parquet", 1, "ab" * 32, 10)
    assert ShardEntry("predictions/part-0.parquet", 1, "ab" * 32, 10).path == "predictions/part-0.parquet"
