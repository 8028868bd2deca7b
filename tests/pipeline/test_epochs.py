"""Epoch plans: each rank's order is a pure function of (seed, epoch, rank, world size), ranks share nothing,
validation is held out by video, and any position in the order (a row count) can be resumed without reading the rows
before it. Rows are read with the reader training uses, without Ray; one test streams through Ray Data."""

import numpy as np
import pyarrow as pa
import pytest

from pipeline.dataset.parts import ShardEntry
from pipeline.epochs import EpochPlan
from pipeline.manifest import Manifest, SamplingParams
from pipeline.shards import ShardWriter
from pipeline.storage import Storage, parse_uri

VIDEOS_PER_SHARD, CLIPS_PER_VIDEO, SHARDS = 60, 2, 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[str, Manifest]:
    """180 videos x 2 clips in 3 shards; every clip's pixels spell its row id, its label is the video's."""
    root = str(tmp_path_factory.mktemp("clips"))
    storage, shards, row_id = Storage(), [], 0
    for shard in range(SHARDS):
        relative = f"shards/part-{shard}.parquet"
        writer = ShardWriter(storage, parse_uri(root).join(relative), frames=1, short_side=2)
        for video in range(VIDEOS_PER_SHARD):
            clips = np.zeros((CLIPS_PER_VIDEO, 1, 2, 2, 3), dtype=np.uint8)
            for clip in range(CLIPS_PER_VIDEO):
                clips[clip, 0, 0, 0, :2] = divmod(row_id, 256)
                row_id += 1
            name = f"v{shard}-{video}"
            writer.add_video(clips, np.zeros((CLIPS_PER_VIDEO, 1), np.int32), name, f"/videos/{name}.mp4", "e",
                             label=video % 4, label_name=f"c{video % 4}", fps=8.0, padded=False)
        size, digest = writer.commit({})
        shards.append(ShardEntry(relative, writer.rows, digest, size))
    manifest = Manifest(version=1, source="/videos", sampling=SamplingParams(frames=1, short_side=2, size=2),
                        labels="dirs", class_map={f"c{i}": i for i in range(4)}, shards=shards, source_tables=[],
                        num_sources=0, counts={})
    return root, manifest


def read_rows(plan: EpochPlan, items: list[dict]) -> tuple[list[int], list[int]]:
    """Row ids and labels the given work items produce, in stream order."""
    reader = plan.reader()
    ids, labels = [], []
    for item in items:
        batch = reader(pa.Table.from_pylist([item]))
        ids += [int(hi) * 256 + int(lo) for hi, lo in batch["frames"][:, 0, 0, 0, :2]]
        labels += batch["label"].tolist()
    return ids, labels


def test_ranks_split_the_training_rows_and_never_see_validation_videos(dataset):
    root, manifest = dataset
    train = EpochPlan(root, manifest, "train", 0.25, world_size=3, seed=1)
    val = EpochPlan(root, manifest, "val", 0.25, world_size=3, seed=1)
    seen = [read_rows(train, train.windows(0, rank))[0] for rank in range(3)]
    flat = sorted(i for rows in seen for i in rows)
    assert len(flat) == len(set(flat)) == train.rows  # every training row once, on one rank
    val_rows = sorted(i for rank in range(3) for i in read_rows(val, val.windows(0, rank, shuffle=False))[0])
    assert val_rows and not set(val_rows) & set(flat)
    assert len(val_rows) + len(flat) == SHARDS * VIDEOS_PER_SHARD * CLIPS_PER_VIDEO
    # clips of one video stay together: rows 2k and 2k+1 belong to the same video
    assert all(row ^ 1 in set(val_rows) for row in val_rows)
    assert 0.15 < len(val_rows) / (len(val_rows) + len(flat)) < 0.35


def test_the_order_depends_only_on_seed_epoch_and_rank(dataset):
    root, manifest = dataset
    plan = EpochPlan(root, manifest, "train", 0.25, world_size=2, seed=7)
    again = EpochPlan(root, manifest, "train", 0.25, world_size=2, seed=7)
    epoch0 = read_rows(plan, plan.windows(0, 1))
    assert read_rows(again, again.windows(0, 1)) == epoch0
    assert read_rows(plan, plan.windows(1, 1))[0] != epoch0[0]  # a new order every epoch
    other_seed = EpochPlan(root, manifest, "train", 0.25, world_size=2, seed=8)
    assert read_rows(other_seed, other_seed.windows(0, 1))[0] != epoch0[0]
    # the order mixes the dataset: the first 32 rows come from every shard, not only the first
    shard_rows = VIDEOS_PER_SHARD * CLIPS_PER_VIDEO
    assert len({row // shard_rows for row in epoch0[0][:32]}) == SHARDS


@pytest.mark.parametrize(("start", "stop"), [(0, None), (5, None), (37, 101), (0, 16), (100, 100)])
def test_any_row_range_of_an_epoch_streams_exactly_those_rows(dataset, start, stop):
    root, manifest = dataset
    plan = EpochPlan(root, manifest, "train", 0.25, world_size=2, seed=3)
    whole = read_rows(plan, plan.windows(2, 0))
    part = read_rows(plan, plan.windows(2, 0, start=start, stop=stop))
    assert part == (whole[0][start:stop], whole[1][start:stop])


def test_steps_per_epoch_is_what_every_rank_can_take(dataset):
    root, manifest = dataset
    plan = EpochPlan(root, manifest, "train", 0.25, world_size=3, seed=3)
    for epoch in range(3):
        steps = plan.steps_per_epoch(epoch, rows_per_step=8)
        rank_rows = [len(read_rows(plan, plan.windows(epoch, rank))[0]) for rank in range(3)]
        assert steps == min(rank_rows) // 8 and steps > 0


def test_validation_windows_are_read_in_process_in_plan_order(dataset):
    root, manifest = dataset
    plan = EpochPlan(root, manifest, "all", 0.0, world_size=1, seed=3)
    windows = list(plan.read_windows(0, 0))
    assert len(windows) > 1  # several windows, so the read-ahead is exercised
    ids = [int(hi) * 256 + int(lo) for w in windows for hi, lo in w["frames"][:, 0, 0, 0, :2]]
    labels = [label for w in windows for label in w["label"].tolist()]
    assert (ids, labels) == read_rows(plan, plan.windows(0, 0, shuffle=False))
    assert sorted(ids) == list(range(plan.rows))


def test_ranks_beyond_the_units_of_a_small_split_read_nothing(dataset):
    root, manifest = dataset
    plan = EpochPlan(root, manifest, "val", 0.02, world_size=64, seed=3)
    assert 0 < len(plan.units) < 64
    assert list(plan.read_windows(0, 63)) == [] and plan.windows(0, 63) == []
    assert sum(len(w["label"]) for rank in range(64) for w in plan.read_windows(0, rank)) == plan.rows


def test_unknown_split_is_refused(dataset):
    root, manifest = dataset
    with pytest.raises(ValueError, match="split must be train, val or all"):
        EpochPlan(root, manifest, "test", 0.25, world_size=1, seed=0)


@pytest.mark.integration
def test_ray_data_streams_a_resumed_epoch_in_plan_order(dataset, ray_local):
    root, manifest = dataset
    plan = EpochPlan(root, manifest, "train", 0.25, world_size=2, seed=4)
    stream = plan.dataset(1, 1, start=24, stop=88)
    batches = list(stream.iter_batches(batch_size=8, batch_format="numpy"))
    streamed = [int(hi) * 256 + int(lo) for batch in batches for hi, lo in batch["frames"][:, 0, 0, 0, :2]]
    assert streamed == read_rows(plan, plan.windows(1, 1))[0][24:88]


FRAMES, CANDIDATES = 4, 3


@pytest.fixture(scope="module")
def jitter_dataset(tmp_path_factory) -> tuple[str, Manifest]:
    """60 videos x 2 clips stored with 3 candidate frames per segment; candidate j of segment t of row r has pixels
    (r // 256, r % 256, t * CANDIDATES + j)."""
    root = str(tmp_path_factory.mktemp("jitter"))
    sampling = SamplingParams(frames=FRAMES, short_side=2, size=2, frames_per_segment=CANDIDATES)
    relative = "shards/part-0.parquet"
    writer = ShardWriter(Storage(), parse_uri(root).join(relative), frames=sampling.stored_frames, short_side=2)
    for video in range(60):
        clips = np.zeros((2, *sampling.clip_shape), dtype=np.uint8)
        for clip in range(2):
            row = 2 * video + clip
            clips[clip, :, 0, 0, :2] = divmod(row, 256)
            clips[clip, :, 0, 0, 2] = np.arange(sampling.stored_frames)
        writer.add_video(clips, np.zeros((2, sampling.stored_frames), np.int32), f"v{video}", f"/v{video}.mp4", "e",
                         label=video % 4, label_name=f"c{video % 4}", fps=8.0, padded=False)
    size, digest = writer.commit({})
    manifest = Manifest(version=1, source="/videos", sampling=sampling, labels="dirs",
                        class_map={f"c{i}": i for i in range(4)}, shards=[ShardEntry(relative, writer.rows, digest,
                                                                                         size)],
                        source_tables=[], num_sources=0, counts={})
    return root, manifest


def picks_by_row(plan: EpochPlan, epoch: int, shuffle: bool = True) -> dict[int, tuple[int, ...]]:
    """Row id -> the stored frame position picked in each segment, over all ranks of one epoch."""
    reader, picks = plan.reader(), {}
    for rank in range(plan.world_size):
        for item in plan.windows(epoch, rank, shuffle=shuffle):
            frames = reader(pa.Table.from_pylist([item]))["frames"]
            assert frames.shape[1] == FRAMES  # one frame per segment reaches the model
            for clip in frames:
                picks[int(clip[0, 0, 0, 0]) * 256 + int(clip[0, 0, 0, 1])] = tuple(clip[:, 0, 0, 2].tolist())
    return picks


def test_each_epoch_sees_other_frames_of_every_clip_and_the_picks_depend_on_nothing_else(jitter_dataset):
    root, manifest = jitter_dataset
    plan = EpochPlan(root, manifest, "all", 0.0, world_size=2, seed=5)
    first, second = picks_by_row(plan, 0), picks_by_row(plan, 1)
    assert first.keys() == second.keys() and len(first) == plan.rows
    for picks in (first, second):  # one candidate of each segment
        assert all(position // CANDIDATES == t for row in picks.values() for t, position in enumerate(row))
    assert sum(first[row] != second[row] for row in first) > 0.8 * len(first)
    # neither the world size (which rank reads a clip) nor a restart changes what a clip shows in an epoch
    assert picks_by_row(EpochPlan(root, manifest, "all", 0.0, world_size=3, seed=5), 0) == first
    assert picks_by_row(EpochPlan(root, manifest, "all", 0.0, world_size=2, seed=5), 0) == first
    assert picks_by_row(EpochPlan(root, manifest, "all", 0.0, world_size=2, seed=6), 0) != first


def test_validation_takes_the_middle_candidate_of_every_segment(jitter_dataset):
    root, manifest = jitter_dataset
    plan = EpochPlan(root, manifest, "all", 0.0, world_size=1, seed=5)
    middle = tuple(t * CANDIDATES + CANDIDATES // 2 for t in range(FRAMES))
    assert set(picks_by_row(plan, 0, shuffle=False).values()) == {middle}
    assert {tuple(clip[:, 0, 0, 2].tolist()) for w in plan.read_windows(0, 0) for clip in w["frames"]} == {middle}


def test_a_plan_from_the_drivers_units_reads_no_shard_and_deals_the_same(dataset, monkeypatch):
    root, manifest = dataset
    driver = EpochPlan(root, manifest, "train", 0.25, world_size=2, seed=9)
    import pipeline.epochs

    def no_reads(*args, **kwargs):
        raise AssertionError("a worker's plan opened a shard")

    monkeypatch.setattr(pipeline.epochs.pq, "ParquetFile", no_reads)
    monkeypatch.setattr(pipeline.epochs, "verify_shards", no_reads)
    worker = EpochPlan(root, manifest, "train", 0.25, world_size=2, seed=9,
                       units=[tuple(vars(unit).values()) for unit in driver.units])
    assert worker.units == driver.units and worker.rows == driver.rows and worker.paths == driver.paths
    assert worker.windows(1, 1) == driver.windows(1, 1)


def write_aspect_dataset(root: str) -> Manifest:
    """Three videos x 2 clips of keep="aspect" 2x4 frames, valid widths 4, 2 and 4; the rows of the last video are
    read last in plan order."""
    sampling = SamplingParams(frames=1, short_side=2, size=2, keep="aspect", max_aspect="2:1")
    relative = "shards/part-0.parquet"
    writer = ShardWriter(Storage(), parse_uri(root).join(relative), frames=1, short_side=2, width=sampling.width)
    for video, valid_width in enumerate((4, 2, 4)):
        writer.add_video(np.zeros((2, *sampling.clip_shape), np.uint8), np.zeros((2, 1), np.int32), f"v{video}",
                         f"/v{video}.mp4", "e", label=0, label_name="c0", fps=8.0, padded=False,
                         valid_width=valid_width)
    size, digest = writer.commit({})
    return Manifest(version=1, source="/videos", sampling=sampling, labels="dirs", class_map={"c0": 0},
                    shards=[ShardEntry(relative, writer.rows, digest, size)], source_tables=[], num_sources=0,
                    counts={})


def test_an_aspect_datasets_windows_carry_each_clips_valid_width(tmp_path):
    plan = EpochPlan(str(tmp_path), write_aspect_dataset(str(tmp_path)), "all", 0.0, world_size=1, seed=0)
    (window,) = plan.read_windows(0, 0)
    assert window["frames"].shape == (6, 1, 2, 4, 3)
    assert window["valid_width"].tolist() == [4, 4, 2, 2, 4, 4]
