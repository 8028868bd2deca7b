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

from pipeline.manifest import Manifest, parse_dataset_ref
from pipeline.reader import verify_shards
from pipeline.schema import frames_to_numpy
from pipeline.storage import Storage, parse_uri

# A window gathers units until it holds this many rows and shuffles them together, so that one batch draws from
# many places of the dataset (ingest writes videos in listing order, often class by class).
WINDOW_ROWS = 256
# Units are at most this many rows (reading one reads its row group once, then slices it), and small enough that
# every rank gets several per epoch.
MAX_UNIT_ROWS = 16
_UNITS_PER_RANK = 8


def is_validation(video_id: str, val_fraction: float) -> bool:
    """Stable across runs, machines and Python versions (unlike `hash`)."""
    if val_fraction <= 0:
        return False
    digest = hashlib.sha1(video_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


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
    """The units of one split of one dataset version, and how each epoch deals them to ranks."""

    def __init__(
        self,
        dst: str,
        manifest: Manifest,
        split: str,
        val_fraction: float,
        world_size: int,
        seed: int,
        endpoint_url: str | None = None,
    ):
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be train, val or all, not {split!r}")
        self.dst, self.manifest, self.split = parse_dataset_ref(dst)[0], manifest, split
        self.val_fraction, self.world_size, self.seed = val_fraction, world_size, seed
        self.endpoint_url = endpoint_url
        storage = Storage(endpoint_url)
        self.paths = verify_shards(self.dst, manifest, storage)
        self.units = self._cut_units(storage)
        self.rows = sum(unit.rows for unit in self.units)

    def _cut_units(self, storage: Storage) -> list[Unit]:
        filesystem = storage.arrow_filesystem(parse_uri(self.dst))
        unit_rows = max(1, min(MAX_UNIT_ROWS, math.ceil(self.manifest.num_clips / (_UNITS_PER_RANK * self.world_size))))
        units = []
        for shard, path in enumerate(self.paths):
            with filesystem.open_input_file(path) as handle:
                parquet = pq.ParquetFile(handle)
                for group in range(parquet.num_row_groups):
                    ids = parquet.read_row_group(group, columns=["video_id"]).column(0).to_pylist()
                    keep = split_mask(ids, self.split, self.val_fraction)
                    for start in range(0, len(keep), unit_rows):
                        stop = min(start + unit_rows, len(keep))
                        rows = int(keep[start:stop].sum())
                        if rows:
                            units.append(Unit(shard, group, start, stop, rows))
        return units

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
                    "skip": first,
                    "take": last - first,
                }
            )
        return items

    def read_windows(self, epoch: int, rank: int) -> Iterator[dict]:
        """A rank's rows of the epoch in plan order (unshuffled), read in this process one window at a time with the
        next window read in a background thread: for validation, which runs between epochs while the next epoch's
        Ray Data pipeline starts."""
        reader = WindowReader(self.dst, self.split, self.val_fraction, self.endpoint_url)
        items = self.windows(epoch, rank, shuffle=False)
        if not items:  # more ranks than units: this rank scores nothing
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-window") as pool:
            pending = pool.submit(reader.read, items[0])
            for following in items[1:] + [None]:
                window = pending.result()
                pending = pool.submit(reader.read, following) if following else None
                yield window

    def dataset(self, epoch: int, rank: int, start: int = 0, stop: int | None = None, read_cpus: float = 0.5):
        """A Ray Dataset of rows [start, stop) of one rank's shuffled epoch, columns `frames` uint8 [T, S, S, 3] and
        `label`."""
        import ray.data

        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False  # one bar per epoch per worker would flood the training logs
        items = self.windows(epoch, rank, start, stop)
        if not items:
            raise ValueError(f"rank {rank} has no {self.split} rows [{start}, {stop}) in epoch {epoch} of {self.dst}")
        reader = WindowReader(self.dst, self.split, self.val_fraction, self.endpoint_url)
        return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            reader, batch_size=1, batch_format="pyarrow", num_cpus=read_cpus
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
    """Reads one window: its units' rows of the split, shuffled together, then the item's `take` rows after `skip`."""

    def __init__(self, dst: str, split: str, val_fraction: float, endpoint_url: str | None):
        self.dst, self.split, self.val_fraction, self.endpoint_url = dst, split, val_fraction, endpoint_url

    def __call__(self, batch: pa.Table) -> dict:
        (item,) = batch.to_pylist()
        return self.read(item)

    def read(self, item: dict) -> dict:
        filesystem = Storage(self.endpoint_url).arrow_filesystem(parse_uri(self.dst))
        frames, labels = [], []
        for path, group, start, stop in zip(item["paths"], item["row_groups"], item["starts"], item["stops"]):
            with filesystem.open_input_file(path) as handle:
                table = pq.ParquetFile(handle).read_row_group(int(group), columns=["video_id", "label", "frames"])
            table = table.slice(int(start), int(stop) - int(start))
            keep = split_mask(table.column("video_id").to_pylist(), self.split, self.val_fraction)
            frames.append(frames_to_numpy(table.column("frames"))[keep])
            # unlabeled clips carry -1; training refuses unlabeled datasets before it gets here
            labels.append(pc.fill_null(table.column("label"), -1).to_numpy().astype(np.int64)[keep])
        frames_all, labels_all = np.concatenate(frames), np.concatenate(labels)
        if item["shuffle_seed"] is not None:
            order = np.random.default_rng(list(item["shuffle_seed"])).permutation(len(labels_all))
            frames_all, labels_all = frames_all[order], labels_all[order]
        first = int(item["skip"])
        last = first + int(item["take"])
        return {"frames": frames_all[first:last], "label": labels_all[first:last]}
