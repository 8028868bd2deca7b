import pytest

from pipeline.manifest import (
    Manifest,
    ManifestError,
    SamplingParams,
    ShardEntry,
    list_manifest_versions,
    load_manifest,
    parse_dataset_ref,
    write_manifest,
)
from pipeline.storage import Storage, parse_uri


@pytest.mark.parametrize(
    "ref,expected",
    [
        ("s3://clips/k400-v3", ("s3://clips/k400-v3", None)),
        ("s3://clips/k400-v3@3", ("s3://clips/k400-v3", 3)),
        ("/data/clips@v12", ("/data/clips", 12)),
        ("/data/clips@latest", ("/data/clips", None)),
        ("/data/user@host/clips", ("/data/user@host/clips", None)),
    ],
)
def test_parse_dataset_ref(ref, expected):
    assert parse_dataset_ref(ref) == expected


def test_size_larger_than_short_side_is_refused():
    with pytest.raises(ValueError, match="short_side"):
        SamplingParams(size=256, short_side=224)


def _manifest(version: int) -> Manifest:
    return Manifest(
        version=version,
        source="/videos",
        sampling=SamplingParams(frames=4, short_side=32, size=28),
        labels="dirs",
        class_map={"left": 0, "ünïcode": 1},
        shards=[ShardEntry("shards/part-a.parquet", 3, "ab" * 32, 1234)],
        sources={"left/a.mp4": {"uri": "/videos/left/a.mp4", "etag": "1-2", "size": 1, "label_name": "left",
                                "clips": 3, "shard": "shards/part-a.parquet"}},
        counts={"listed": 1, "ingested": 1, "already_done": 0, "errored": 0},
    )


def test_manifest_round_trips_through_json():
    manifest = _manifest(1)
    again = Manifest.from_json(manifest.to_json())
    assert again == manifest
    assert again.class_names == ["left", "ünïcode"] and again.num_clips == 3


def test_versions_are_listed_and_never_overwritten(tmp_path):
    root, storage = parse_uri(str(tmp_path)), Storage()
    write_manifest(root, _manifest(1), storage)
    write_manifest(root, _manifest(2), storage)
    (tmp_path / "manifests" / ".tmp-v000003.json-abc").write_text("{}")  # a killed writer's leftover
    assert list_manifest_versions(root, storage) == [1, 2]
    with pytest.raises(ManifestError, match="already exists"):
        write_manifest(root, _manifest(2), storage)
    assert load_manifest(str(tmp_path)).version == 2
    assert load_manifest(f"{tmp_path}@1").version == 1


def test_loading_from_an_empty_destination_says_nothing_was_ingested(tmp_path):
    with pytest.raises(ManifestError, match="nothing has been ingested"):
        load_manifest(str(tmp_path))
    with pytest.raises(ManifestError, match="no manifest version 4"):
        load_manifest(str(tmp_path), version=4)
