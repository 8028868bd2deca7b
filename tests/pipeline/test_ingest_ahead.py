"""How ingest keeps the CPUs busy: a group's next video is read and decoded while the current one's clips are written
(`one_ahead`), and groups are dealt into tasks that shrink towards the end (`task_bounds`)."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import pytest

import pipeline.ingest
from pipeline.ingest import ingest_groups, one_ahead, task_bounds
from pipeline.manifest import SamplingParams
from pipeline.shards import ShardWriter
from pipeline.storage import Storage


def test_the_next_item_is_computed_while_the_current_one_is_handled_and_results_keep_their_order():
    started = {index: threading.Event() for index in range(4)}

    def work(index: int) -> int:
        started[index].set()
        return index * 10

    results = []
    for index, result in zip(range(4), one_ahead(work, list(range(4)))):
        if index + 1 < 4:
            # the caller is still handling this item, and the next one is already under way
            assert started[index + 1].wait(timeout=10)
        results.append(result)
    assert results == [0, 10, 20, 30]
    assert list(one_ahead(work, [])) == []


def test_an_error_is_raised_where_its_result_would_have_been():
    def work(index: int) -> int:
        if index == 2:
            raise ConnectionError("the store went away")
        return index

    handled = []
    with pytest.raises(ConnectionError, match="went away"):
        for result in one_ahead(work, [0, 1, 2, 3]):
            handled.append(result)
    assert handled == [0, 1]


def test_a_result_computed_ahead_that_nobody_takes_is_discarded():
    discarded = []
    results = one_ahead(lambda index: index * 10, [0, 1, 2], discard=discarded.append)
    assert next(results) == 0
    results.close()  # the caller stopped: the second was computed ahead, the third never started
    assert discarded == [10]


@pytest.mark.integration
def test_a_task_that_fails_leaves_no_video_it_fetched_ahead(tmp_path, make_videos, s3_server, monkeypatch):
    make_videos(tmp_path / "src", classes=("left",), num_per_class=3)
    bucket = s3_server.create_bucket("ahead")
    keys = s3_server.upload_folder(tmp_path / "src", bucket)
    storage = Storage(s3_server.endpoint_url, spill_threshold_bytes=0)  # every video downloaded to a local file
    groups = [{"shard": f"shards/part-{index}.parquet",
               "videos": [{"uri": f"s3://{bucket}/{key}", "video_id": key, "etag": "e",
                           "size": (tmp_path / "src" / key).stat().st_size, "label_name": "left", "label": 0}]}
              for index, key in enumerate(sorted(keys))]
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(downloads))
    held_at_failure = []

    def failing_commit(writer, footer):
        held_at_failure.append(len(list(downloads.glob("*.video"))))
        raise ConnectionError("the store went away")

    monkeypatch.setattr(ShardWriter, "commit", failing_commit)
    with pytest.raises(ConnectionError, match="went away"):
        list(ingest_groups(groups, storage, SamplingParams(frames=4, short_side=32, size=28), f"s3://{bucket}/dst"))
    assert held_at_failure and held_at_failure[0] >= 1  # the next videos were fetched while the first was written
    assert list(downloads.iterdir()) == []


def test_the_next_groups_video_decodes_while_the_current_groups_shard_is_committed(tmp_path, make_videos,
                                                                                  monkeypatch):
    paths = sorted(Path(path) for path, _ in make_videos(tmp_path / "src", classes=("left",), num_per_class=3))
    groups = [{"shard": f"shards/part-{index}.parquet",
               "videos": [{"uri": str(path), "video_id": path.name, "etag": "e", "size": path.stat().st_size,
                           "label_name": "left", "label": 0}]} for index, path in enumerate(paths)]
    decoding = {path.name: threading.Event() for path in paths}
    decode_clips, commit = pipeline.ingest.decode_clips, ShardWriter.commit

    def watched_decode(video, **options):
        decoding[Path(video).name].set()
        return decode_clips(video, **options)

    next_decoding_during_commit = []

    def watched_commit(writer, footer):
        shard = int(writer.final.path.rsplit("part-", 1)[1].split(".")[0])
        if shard + 1 < len(paths):  # groups of one video: before, the next began only after this commit returned
            next_decoding_during_commit.append(decoding[paths[shard + 1].name].wait(timeout=10))
        return commit(writer, footer)

    monkeypatch.setattr(pipeline.ingest, "decode_clips", watched_decode)
    monkeypatch.setattr(ShardWriter, "commit", watched_commit)
    results = list(ingest_groups(groups, Storage(), SamplingParams(frames=4, short_side=32, size=28),
                                 str(tmp_path / "dst")))
    assert next_decoding_during_commit == [True, True]
    assert [result["shard"]["rows"] for result in results] == [1, 1, 1]
    assert [result["videos"][0]["video_id"] for result in results] == [path.name for path in paths]


def test_a_task_asks_the_store_only_about_shards_the_driver_found_published(tmp_path, make_videos, monkeypatch):
    paths = sorted(Path(path) for path, _ in make_videos(tmp_path / "src", classes=("left",), num_per_class=2))
    groups = [{"shard": f"shards/part-{index}.parquet",
               "videos": [{"uri": str(path), "video_id": path.name, "etag": "e", "size": path.stat().st_size,
                           "label_name": "left", "label": 0}]} for index, path in enumerate(paths)]
    sampling, root = SamplingParams(frames=4, short_side=32, size=28), str(tmp_path / "dst")
    first = list(ingest_groups(groups, Storage(), sampling, root))  # no flags: asks about each (a killed run's?)
    asked = []
    exists = Storage.exists
    monkeypatch.setattr(Storage, "exists", lambda self, location: asked.append(location.path) or exists(self, location))
    flagged = [{**groups[0], "published": True}, {**groups[1], "published": False}]
    again = list(ingest_groups(flagged, Storage(), sampling, root))
    assert asked == [str(tmp_path / "dst" / "shards" / "part-0.parquet")]
    assert again[0]["adopted"] and not again[1]["adopted"]  # part-1 was written again, under the same name
    assert again[1]["shard"]["sha256"] == first[1]["shard"]["sha256"]


def test_tasks_shrink_to_one_group_at_the_end_and_cover_every_group_once():
    bounds = task_bounds(48, 1, cpus=2)
    sizes = [end - start for start, end in zip(bounds, bounds[1:])]
    assert bounds[0] == 0 and bounds[-1] == 48
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == 12  # a quarter of the groups: 2 tasks per CPU
    assert sizes[-4:] == [1, 1, 1, 1]  # the last wave: no CPU waits long on another's task


@pytest.mark.parametrize("groups, videos_per_group, cpus", [(10_000, 1, 2), (300, 3, 64), (7, 40, 2), (1, 1, 8)])
def test_a_task_holds_at_most_32_videos_or_one_group(groups, videos_per_group, cpus):
    bounds = task_bounds(groups, videos_per_group, cpus)
    sizes = [end - start for start, end in zip(bounds, bounds[1:])]
    assert sum(sizes) == groups and min(sizes) == 1
    assert max(sizes) == max(1, min(32 // videos_per_group, -(-groups // (2 * cpus))))
    assert task_bounds(0, videos_per_group, cpus) == [0]


@pytest.mark.integration
def test_ingest_dataset_runs_without_cpu_reservation_and_leaves_the_process_context_alone(tmp_path, ray_local):
    import ray.data

    from pipeline.dataset.sources import SourceTable
    from pipeline.ingest import IngestPlan, build_dataset
    from pipeline.manifest import SamplingParams
    from pipeline.storage import Storage, parse_uri

    plan = IngestPlan(
        root=parse_uri(str(tmp_path / "dst")), source=parse_uri(str(tmp_path / "src")), sampling=SamplingParams(),
        labels_mode="folders", class_map={}, previous=None, previous_sources=SourceTable.empty(), listed=[], already_done=[],
        groups=[{"shard": "shards/part-a.parquet", "videos": [{"uri": str(tmp_path / "src" / "a.mp4")}]}],
        label_errors=[],
    )
    dataset = build_dataset(plan, Storage())
    # one operator: a reservation for it would only hold CPUs back until its first tasks finished
    assert dataset.context.op_resource_reservation_enabled is False
    assert ray.data.DataContext.get_current().op_resource_reservation_enabled is True  # training's datasets keep it
