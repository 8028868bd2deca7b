"""Deterministic epoch plans over a clip dataset version, streamed to training workers through Ray Data.

Ray Data iterators lose their position when a worker dies (ray-project/ray#37633, #48224), and a streaming split
hands blocks to whichever worker asks first, so neither gives an order a restarted run can reproduce. Here the order
is ours: the dataset is cut into small units (row ranges of a Parquet row group); each epoch permutes the units with
a seed, deals them round-robin to the ranks, and groups each rank's units into windows whose rows are shuffled
together with a seed of their own. A rank's epoch is therefore a pure function of (seed, epoch, rank, world size),
and a position in it is a row count: resuming after `k` steps drops the first `k * rows_per_step` rows without
reading them. Ray Data reads the windows in parallel (on any node) and `iter_torch_batches` prefetches ahead of the
training step; `preserve_order` keeps the stream in plan order.

The validation split is held out by video (a hash of `video_id`), so clips of one video never straddle the split.

Temporal jitter: where ingest stored M candidate frames per segment, each training epoch picks one per segment and
clip, a pure function of (seed, epoch, video, clip index): every epoch sees another sampling of each video, a
resumed run the same one. Validation takes the middle candidate.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.dataset.versions import parse_dataset_ref
from pipeline.manifest import Manifest, SamplingParams
from pipeline.reader import shard_paths, verify_shards
from pipeline.schema import MAX_ROW_GROUP_CLIPS, frames_to_numpy
from pipeline.storage import Storage, parse_uri

# A window gathers units until it holds this many rows and shuffles them together, so that one batch draws from
# many places of the dataset (ingest writes videos in listing order, often class by class).
WINDOW_ROWS = 256
# Units are at most a row group (ingest writes row groups of this many clips, so a unit of a large dataset is exactly
# one row group, read once), and small enough that every rank gets several per epoch.
MAX_UNIT_ROWS = MAX_ROW_GROUP_CLIPS
_UNITS_PER_RANK = 8
# Validation windows read ahead at once in the trainer's process.
_VALIDATION_READERS = 4


def is_validation(video_id: str, val_fraction: float) -> bool:
    """Stable across runs, machines and Python versions (unlike `hash`)."""
    if val_fraction <= 0:
        return False
    digest = hashlib.sha1(video_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def video_key(video_id: str) -> int:
    """A stable 63-bit number for a video id (seeds and hashing that must agree across runs and machines)."""
    return int.from_bytes(hashlib.sha1(video_id.encode("utf-8")).digest()[:8], "big") >> 1


def jitter_picks(seed: int, epoch: int, video_ids: list[str], clip_indices: list[int], frames: int,
                 frames_per_segment: int) -> np.ndarray:
    """`[N, T]` candidate picks for N clips in one epoch: a pure function of (seed, epoch, video, clip index), so that
    neither the rank that reads a clip nor a restart changes what it sees."""
    return np.stack([
        np.random.default_rng([seed, epoch, video_key(video_id), clip_index]).integers(0, frames_per_segment, frames)
        for video_id, clip_index in zip(video_ids, clip_indices)
    ]) if video_ids else np.zeros((0, frames), dtype=np.int64)


def split_mask(video_ids: list[str], split: str, val_fraction: float) -> np.ndarray:
    """Which rows of `video_ids` belong to `split` ("train", "val" or "all")."""
    if split == "all":
        return np.ones(len(video_ids), dtype=bool)
    held_out = np.array([is_validation(v, val_fraction) for v in video_ids], dtype=bool)
    return held_out if split == "val" else ~held_out


@dataclass(frozen=True)
class Unit:
    shard: int  # index into the manifest's shard list
    row_group: int
    start: int  # row range within the row group
    stop: int
    rows: int  # rows of the selected split within [start, stop)


class EpochPlan:
    """The units of one split of one dataset version, and how each epoch deals them to ranks.

    Cutting the units reads every shard's footer and `video_id` column (seconds for a million videos), so a job cuts
    them once, on its driver (`units=None`), and hands `plan.units` to the plans its workers build (`units=...`),
    which then read nothing but the manifest they already have."""

    def __init__(
        self,
        dst: str,
        manifest: Manifest,
        split: str,
        val_fraction: float,
        world_size: int,
        seed: int,
        endpoint_url: str | None = None,
        units: list[Unit] | None = None,
    ):
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be train, val or all, not {split!r}")
        self.dst, self.manifest, self.split = parse_dataset_ref(dst)[0], manifest, split
        self.val_fraction, self.world_size, self.seed = val_fraction, world_size, seed
        self.endpoint_url = endpoint_url
        storage = Storage(endpoint_url)
        if units is None:
            self.paths = verify_shards(self.dst, manifest, storage)
            self.units = self._cut_units(storage)
        else:
            self.paths = shard_paths(self.dst, manifest, storage)
            self.units = [Unit(*unit) for unit in units]
        self.rows = sum(unit.rows for unit in self.units)

    def _cut_units(self, storage: Storage) -> list[Unit]:
        filesystem = storage.arrow_filesystem(parse_uri(self.dst))
        unit_rows = max(1, min(MAX_UNIT_ROWS, math.ceil(self.manifest.num_clips / (_UNITS_PER_RANK * self.world_size))))

        def shard_units(shard: int) -> list[Unit]:
            with filesystem.open_input_file(self.paths[shard]) as handle:
                parquet = pq.ParquetFile(handle)
                ids = parquet.read(columns=["video_id"]).column(0).to_pylist()  # one read of a small column
            group_rows = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
            offsets = np.cumsum([0, *group_rows])
            units = []
            for group, rows_in_group in enumerate(group_rows):
                keep = split_mask(ids[offsets[group] : offsets[group] + rows_in_group], self.split, self.val_fraction)
                for start in range(0, len(keep), unit_rows):
                    stop = min(start + unit_rows, len(keep))
                    rows = int(keep[start:stop].sum())
                    if rows:
                        units.append(Unit(shard, group, start, stop, rows))
            return units

        with ThreadPoolExecutor(max_workers=16) as pool:  # object stores answer many small reads at once
            return [unit for units in pool.map(shard_units, range(len(self.paths))) for unit in units]

    def rank_units(self, epoch: int, rank: int, shuffle: bool = True) -> list[Unit]:
        order = np.arange(len(self.units))
        if shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.units))
        return [self.units[i] for i in order[rank :: self.world_size]]

    def steps_per_epoch(self, epoch: int, rows_per_step: int) -> int:
        """Optimizer steps every rank can take this epoch (DDP needs the same count on every rank)."""
        rows = [sum(u.rows for u in self.rank_units(epoch, r)) for r in range(self.world_size)]
        return min(rows) // rows_per_step

    def windows(
        self, epoch: int, rank: int, start: int = 0, stop: int | None = None, shuffle: bool = True
    ) -> list[dict]:
        """The work items that stream rows [start, stop) of one rank's epoch, in the epoch's order."""
        items, offset = [], 0
        for w, group in enumerate(_windows(self.rank_units(epoch, rank, shuffle))):
            rows = sum(u.rows for u in group)
            first, last = max(start - offset, 0), rows if stop is None else min(rows, stop - offset)
            offset += rows
            if last <= first:
                continue
            items.append(
                {
                    "paths": [self.paths[u.shard] for u in group],
                    "row_groups": [u.row_group for u in group],
                    "starts": [u.start for u in group],
                    "stops": [u.stop for u in group],
                    "shuffle_seed": [self.seed, epoch, rank, w] if shuffle else None,
                    "jitter_seed": [self.seed, epoch] if shuffle else None,
                    "skip": first,
                    "take": last - first,
                }
            )
        return items

    def read_windows(self, epoch: int, rank: int) -> Iterator[dict]:
        """A rank's rows of the epoch in plan order (unshuffled), read in this process one window at a time with the
        next window read in a background thread: for validation, which runs between epochs while the next epoch's
        Ray Data pipeline starts."""
        reader = self.reader()
        items = self.windows(epoch, rank, shuffle=False)
        with ThreadPoolExecutor(max_workers=_VALIDATION_READERS, thread_name_prefix="read-window") as pool:
            pending = [pool.submit(reader.read, item) for item in items[:_VALIDATION_READERS]]
            for following in items[_VALIDATION_READERS:] + [None] * _VALIDATION_READERS:
                if not pending:
                    return
                window = pending.pop(0).result()
                if following is not None:
                    pending.append(pool.submit(reader.read, following))
                yield window

    def reader(self) -> WindowReader:
        return WindowReader(self.dst, self.split, self.val_fraction, self.manifest.sampling, self.endpoint_url)

    def dataset(self, epoch: int, rank: int, start: int = 0, stop: int | None = None, read_cpus: float = 0.5):
        """A Ray Dataset of rows [start, stop) of one rank's shuffled epoch, columns `frames` uint8 [T, S, W, 3] and
        `label`, and `valid_width` for a keep="aspect" dataset."""
        import ray.data

        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False  # one bar per epoch per worker would flood the training logs
        items = self.windows(epoch, rank, start, stop)
        if not items:
            raise ValueError(f"rank {rank} has no {self.split} rows [{start}, {stop}) in epoch {epoch} of {self.dst}")
        # a window's read and its shuffled copy are in memory at once
        window_bytes = 2 * (WINDOW_ROWS + MAX_UNIT_ROWS) * self.manifest.sampling.clip_bytes
        return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            self.reader(), batch_size=1, batch_format="pyarrow", num_cpus=read_cpus, memory=window_bytes
        )


def _windows(units: list[Unit]) -> list[list[Unit]]:
    windows, current, rows = [], [], 0
    for unit in units:
        current.append(unit)
        rows += unit.rows
        if rows >= WINDOW_ROWS:
            windows.append(current)
            current, rows = [], 0
    return windows + ([current] if current else [])


class WindowReader:
    """Reads one window: its units' rows of the split, each shard opened once, shuffled together, one frame per
    segment picked, then the item's `take` rows after `skip`."""

    def __init__(self, dst: str, split: str, val_fraction: float, sampling: SamplingParams, endpoint_url: str | None):
        self.dst, self.split, self.val_fraction, self.endpoint_url = dst, split, val_fraction, endpoint_url
        self.sampling = sampling
        self.columns = ["video_id", "clip_index", "label", "frames"]
        if sampling.keep == "aspect":  # training's crops stay inside each clip's video (model.transforms)
            self.columns.append("valid_width")

    def __call__(self, batch: pa.Table) -> dict:
        (item,) = batch.to_pylist()
        return self.read(item)

    def read(self, item: dict) -> dict:
        filesystem = Storage(self.endpoint_url).arrow_filesystem(parse_uri(self.dst))
        by_shard: dict[str, list[tuple[int, int, int]]] = {}
        for path, group, start, stop in zip(item["paths"], item["row_groups"], item["starts"], item["stops"]):
            by_shard.setdefault(path, []).append((int(group), int(start), int(stop)))
        # read in (shard, row group) order, a pure function of the item, so the shuffle below stays reproducible
        tables = []
        for path in sorted(by_shard):
            units = sorted(by_shard[path])
            with filesystem.open_input_file(path) as handle:
                parquet = pq.ParquetFile(handle)
                for group in sorted({unit[0] for unit in units}):
                    table = parquet.read_row_group(group, columns=self.columns)
                    tables.extend(table.slice(start, stop - start) for g, start, stop in units if g == group)
        table = pa.concat_tables(tables)
        keep = split_mask(table.column("video_id").to_pylist(), self.split, self.val_fraction)
        table = table.filter(pa.array(keep))
        if item["shuffle_seed"] is not None:
            table = table.take(np.random.default_rng(list(item["shuffle_seed"])).permutation(table.num_rows))
        first = int(item["skip"])
        table = table.slice(first, int(item["take"]))
        clips = frames_to_numpy(table.column("frames"), self.sampling.clip_shape)
        picks = None
        if item.get("jitter_seed") is not None and self.sampling.frames_per_segment > 1:
            seed, epoch = item["jitter_seed"]
            picks = jitter_picks(seed, epoch, table.column("video_id").to_pylist(),
                                 table.column("clip_index").to_pylist(), self.sampling.frames,
                                 self.sampling.frames_per_segment)
        # unlabeled clips carry -1; training refuses unlabeled datasets before it gets here
        labels = pc.fill_null(table.column("label"), -1).to_numpy().astype(np.int64)
        window = {"frames": np.ascontiguousarray(self.sampling.pick_frames(clips, picks)), "label": labels}
        if "valid_width" in self.columns:
            window["valid_width"] = table.column("valid_width").to_numpy().astype(np.int64)
        return window
