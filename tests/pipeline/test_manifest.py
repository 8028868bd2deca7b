import json

import numpy as np
import pytest

from pipeline.dataset.parts import ShardEntry
from pipeline.dataset.sources import SourceTable, read_sources, write_sources
from pipeline.dataset.versions import ManifestError, list_manifest_versions, parse_dataset_ref
from pipeline.manifest import Manifest, SamplingParams, load_manifest, write_manifest
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
        source_tables=[{"path": "sources/v000001.parquet", "rows": 1}],
        num_sources=1,
        counts={"listed": 1, "ingested": 1, "already_done": 0, "errored": 0},
    )


def test_manifest_round_trips_through_json():
    manifest = _manifest(1)
    again = Manifest.from_json(manifest.to_json())
    assert again == manifest
    assert again.class_names == ["left", "ünïcode"] and again.num_clips == 3


def test_a_square_manifest_records_no_keep_and_one_without_it_reads_as_square():
    body = json.loads(_manifest(1).to_json())
    assert sorted(body["sampling"]) == ["clips_per_video", "frames", "frames_per_segment", "sampling", "short_side",
                                        "size", "stride"]  # as written before keep=aspect existed
    again = Manifest.from_json(json.dumps(body))
    assert again.sampling.keep == "square" and again.sampling.clip_shape == (4, 32, 32, 3)
    assert "valid_width" not in again.sampling.schema().names


def test_an_aspect_manifest_records_the_mode_and_its_stored_shape():
    manifest = _manifest(1)
    manifest.sampling = SamplingParams(frames=4, short_side=32, size=28, keep="aspect")
    recorded = json.loads(manifest.to_json())["sampling"]
    assert (recorded["keep"], recorded["max_aspect"]) == ("aspect", "16:9")
    sampling = Manifest.from_json(manifest.to_json()).sampling
    assert sampling == manifest.sampling and sampling.clip_shape == (4, 32, 56, 3)
    assert sampling.clip_bytes == 4 * 32 * 56 * 3 and sampling.schema().field("valid_width").type == "int32"
    with pytest.raises(ValueError, match="keep=aspect only"):
        SamplingParams(max_aspect="16:9")
    with pytest.raises(ValueError, match="WIDTH:HEIGHT"):
        SamplingParams(keep="aspect", max_aspect="9:16")


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


def test_a_dataset_of_an_older_schema_is_refused_with_what_to_do(tmp_path):
    old = json.loads(_manifest(1).to_json())
    old["schema_version"] = 1
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests" / "v000001.json").write_text(json.dumps(old))
    with pytest.raises(ManifestError, match=r"schema version 1 is not supported .*uniformer ingest SRC --out NEW_DST"):
        load_manifest(str(tmp_path))


def _source(video_id: str, shard: str, etag: str = "e") -> dict:
    return {"video_id": video_id, "uri": f"/{video_id}", "etag": etag, "size": 1, "label_name": "a", "clips": 1,
            "shard": shard}


def _publish(root, storage, version, manifest, sources, removed=(), upserts=()):
    """Version `version`'s source table and manifest over `manifest` (None for the first) with `sources`."""
    sources, delta = sources.updated(removed, SourceTable.from_rows(list(upserts)).table)
    chain = write_sources(root, version, manifest.source_tables if manifest else [], sources, delta, storage)
    return Manifest(version, "/v", SamplingParams(), "dirs", {"a": 0}, [], chain, len(sources), {}), sources


def test_source_tables_store_what_changed_and_replay_to_each_version(tmp_path):
    root, storage = parse_uri(str(tmp_path)), Storage()
    changes = [
        ((), [_source(f"v{i}", "s1") for i in range(100)]),  # the first version: one full table
        ((), [_source("v100", "s2")]),  # one video added
        (("v0", "v100", "never-there"), [_source("v100", "s2", "e2")]),  # one removed, one changed
    ]
    versions, manifest, sources, states = {}, None, SourceTable.empty(), {}
    for version, (removed, upserts) in enumerate(changes, start=1):
        manifest, sources = _publish(root, storage, version, manifest, sources, removed, upserts)
        versions[version], states[version] = manifest, sources.to_dict()
    assert [entry["rows"] for entry in versions[3].source_tables] == [100, 1, 2]  # deltas, not copies
    assert sorted(states[3]) == sorted(f"v{i}" for i in range(1, 101)) and states[3]["v100"]["etag"] == "e2"
    for version in versions:
        assert read_sources(root, versions[version], storage).to_dict() == states[version]


def test_a_version_whose_sources_did_not_change_writes_no_source_table(tmp_path):
    root, storage = parse_uri(str(tmp_path)), Storage()
    first, sources = _publish(root, storage, 1, None, SourceTable.empty(), upserts=[_source("a", "s")])
    second, _ = _publish(root, storage, 2, first, sources)
    assert second.source_tables == first.source_tables and len(list((tmp_path / "sources").iterdir())) == 1


def test_a_long_chain_of_deltas_is_replaced_by_one_full_table(tmp_path):
    root, storage = parse_uri(str(tmp_path)), Storage()
    manifest, sources = None, SourceTable.empty()
    for version in range(1, 8):  # each version changes every one of the 10 videos
        manifest, sources = _publish(root, storage, version, manifest, sources,
                                     upserts=[_source(f"v{i}", "s", etag=str(version)) for i in range(10)])
        assert sum(entry["rows"] for entry in manifest.source_tables) <= 2 * len(sources)
        assert {entry["etag"] for entry in read_sources(root, manifest, storage).to_dict().values()} == {str(version)}
    assert len(manifest.source_tables) < 7


def test_source_tables_that_disagree_with_the_manifest_are_refused(tmp_path):
    root, storage = parse_uri(str(tmp_path)), Storage()
    manifest, _ = _publish(root, storage, 1, None, SourceTable.empty(), upserts=[_source("a", "s")])
    manifest.num_sources = 2
    with pytest.raises(ManifestError, match="names 2 sources, its source tables hold 1"):
        read_sources(root, manifest, storage)


def test_stored_candidates_give_one_frame_per_segment():
    sampling = SamplingParams(frames=3, short_side=2, size=2, frames_per_segment=4)
    assert sampling.clip_shape == (12, 2, 2, 3)
    clips = np.arange(2 * 12).reshape(2, 12, 1, 1, 1) * np.ones((1, 1, 2, 2, 3), dtype=np.int64)
    middle = sampling.pick_frames(clips)
    assert middle[:, :, 0, 0, 0].tolist() == [[2, 6, 10], [14, 18, 22]]
    picked = sampling.pick_frames(clips, np.array([[0, 1, 3], [3, 0, 2]]))
    assert picked[:, :, 0, 0, 0].tolist() == [[0, 5, 11], [15, 16, 22]]
    with pytest.raises(ValueError, match="uniform sampling only"):
        SamplingParams(sampling="dense", frames_per_segment=2)
