"""A run's data on each worker: the epoch plans cut by the driver, how steps fall into epochs, and the batches of an
epoch streamed to the device."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from jobs.training.config import TrainConfig
from pipeline import load_manifest
from pipeline.epochs import EpochPlan


def epoch_plans(cfg: TrainConfig, manifest, world: int, units: dict | None = None) -> tuple[EpochPlan, EpochPlan]:
    """The training and validation plans of a run: a held-out split of `data`, or all of `val_data`. Without `units`
    they are cut from the shards (the driver), with them built from the driver's cut (`plan_units`)."""
    units = units or {}
    train = EpochPlan(cfg.data, manifest, "train", cfg.val_fraction if not cfg.val_data else 0.0, world, cfg.seed,
                      cfg.endpoint_url, units.get("train"))
    if cfg.val_data:
        val_manifest = load_manifest(cfg.val_data, endpoint_url=cfg.endpoint_url)
        val = EpochPlan(cfg.val_data, val_manifest, "all", 0.0, world, cfg.seed, cfg.endpoint_url, units.get("val"))
    else:
        val = EpochPlan(cfg.data, manifest, "val", cfg.val_fraction, world, cfg.seed, cfg.endpoint_url,
                        units.get("val"))
    return train, val


def plan_units(train: EpochPlan, val: EpochPlan) -> dict:
    """The plans' units as plain tuples, for the loop config."""
    return {name: [dataclasses.astuple(unit) for unit in plan.units] for name, plan in (("train", train), ("val", val))}


@dataclass(frozen=True)
class StepLayout:
    """How a run's optimizer steps fall into epochs: the same on every rank (DDP needs equal step counts)."""

    steps_per_epoch: tuple[int, ...]  # what each epoch's rows allow
    total_steps: int  # all of them, or --max-steps when smaller
    rows_per_step: int  # per rank: batch size x accumulation

    @classmethod
    def of(cls, cfg: TrainConfig, plan: EpochPlan) -> StepLayout:
        rows_per_step = cfg.batch_size * cfg.grad_accum
        steps_per_epoch = tuple(plan.steps_per_epoch(e, rows_per_step) for e in range(cfg.epochs))
        total = sum(steps_per_epoch) if cfg.max_steps is None else min(cfg.max_steps, sum(steps_per_epoch))
        if total == 0:
            raise ValueError(
                f"{plan.rows} training clips are too few for {plan.world_size} workers x batch {cfg.batch_size} x "
                f"accumulation {cfg.grad_accum}"
            )
        return cls(steps_per_epoch, total, rows_per_step)

    def steps_before(self, epoch: int) -> int:
        return sum(self.steps_per_epoch[:epoch])

    def epoch_steps(self, epoch: int) -> int:
        """The steps epoch `epoch` takes: its own, cut short where the run's total ends (0 past the last epoch)."""
        if epoch >= len(self.steps_per_epoch):
            return 0
        return max(0, min(self.steps_per_epoch[epoch], self.total_steps - self.steps_before(epoch)))

    def warmup_steps(self, warmup_epochs: float) -> int:
        return min(self.total_steps, max(1, round(warmup_epochs * self.steps_per_epoch[0])))


class EpochStreams:
    """One rank's training batches, an epoch at a time, from the epoch plan: each epoch reads a whole number of
    steps, so that no batch is left over or straddles two epochs, and a stream opened at step k of an epoch starts
    at row k x rows per step (exact resume).

    An epoch's first rows are read in this process and the rest is streamed by Ray Data. A Ray Data pipeline took
    0.06-0.25 s to deliver its first block in a warm Ray and 2-10 s in a fresh one or on a busy machine (its
    executor, its read tasks' workers): that wait at an epoch's start was most of the data wait of short epochs,
    wherever the work before the epoch (building the model, validating) was shorter. The first window (the rows
    shuffled together) is read here, in 0.1-0.3 s for 144-256 tiny clips (0.7 s at most the first time in a
    process), while that work runs, and the pipeline starts behind it."""

    def __init__(self, plan: EpochPlan, layout: StepLayout, rank: int, batch_size: int, device: torch.device):
        self.plan, self.layout, self.rank, self.batch_size, self.device = plan, layout, rank, batch_size, device

    def open(self, epoch: int, step_in_epoch: int) -> Iterator[dict]:
        """Starts reading at once, in the background: open an epoch before the work its first batches can overlap."""
        rows_per_step = self.layout.rows_per_step
        start, stop = step_in_epoch * rows_per_step, self.layout.epoch_steps(epoch) * rows_per_step
        if stop <= start:  # an epoch too short for one step on every rank
            return iter(())
        middle = self.head_stop(epoch, start, stop)
        head = read_ahead(self.plan, self.plan.windows(epoch, self.rank, start, middle), self.batch_size)
        tail = iter(())
        if middle < stop:
            dataset = self.plan.dataset(epoch, self.rank, start=middle, stop=stop)
            # batches stay on the host, pinned where a GPU will take them, and DeviceBatches copies them over
            dtypes = {"frames": torch.uint8, "label": torch.int64}
            if self.plan.manifest.sampling.keep == "aspect":
                dtypes["valid_width"] = torch.int64
            tail = EpochStream(dataset.iter_torch_batches(
                batch_size=self.batch_size, prefetch_batches=4, dtypes=dtypes, device="cpu",
                pin_memory=self.device.type == "cuda",
            ))
        return DeviceBatches(itertools.chain(head, tail), self.device)

    def head_stop(self, epoch: int, start: int, stop: int) -> int:
        """Where the rows read in this process end: after the first windows that hold a batch, on a batch boundary,
        so that the pipeline's batches start where the head's end (the pipeline reads the window it starts in
        again, to cut its own rows out of the same shuffle)."""
        rows = 0
        for item in self.plan.windows(epoch, self.rank, start, stop):
            rows += item["take"]
            if rows >= self.batch_size:
                break
        return start + rows // self.batch_size * self.batch_size


def read_ahead(plan: EpochPlan, items: list[dict], batch_size: int) -> Iterator[dict]:
    """The batches of `items` (windows of `plan`), read in a background thread from now on."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="epoch-head")
    reader = plan.reader()
    windows = pool.submit(lambda: [reader.read(item) for item in items])
    pool.shutdown(wait=False)

    def batches() -> Iterator[dict]:
        read = windows.result()
        # frames and label, and valid_width for a keep="aspect" dataset
        columns = {key: read[0][key] if len(read) == 1 else np.concatenate([window[key] for window in read])
                   for key in read[0]}
        for first in range(0, len(columns["label"]), batch_size):
            yield {key: torch.from_numpy(values[first : first + batch_size]) for key, values in columns.items()}

    return batches()


class DeviceBatches:
    """Copies each host batch to the training device one batch ahead, on a side CUDA stream, so that the copy of
    batch i+1 overlaps the forward and backward of batch i (a copy on the compute stream would wait for them). On
    the CPU the batches pass through."""

    def __init__(self, batches: Iterator[dict], device: torch.device):
        self._batches = iter(batches)
        self._device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._next = None

    def __iter__(self):
        return self

    def _copy(self, batch: dict) -> dict:
        with torch.cuda.stream(self._stream):
            return {key: value.to(self._device, non_blocking=True) for key, value in batch.items()}

    def __next__(self) -> dict:
        if self._stream is None:
            return next(self._batches)
        if self._next is None:
            self._next = self._copy(next(self._batches))
        current, self._next = self._next, None
        compute = torch.cuda.current_stream(self._device)
        compute.wait_stream(self._stream)
        for tensor in current.values():
            tensor.record_stream(compute)  # the side stream's allocator must not reuse it while compute reads it
        try:
            self._next = self._copy(next(self._batches))
        except StopIteration:
            pass
        return current


class EpochStream:
    """An epoch's batch iterator whose pipeline start-up (the wait for its first batch) runs in a background thread
    from construction, so that it overlaps whatever the trainer does before the epoch begins."""

    def __init__(self, batches):
        self._batches = iter(batches)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="epoch-start")
        self._first = self._pool.submit(next, self._batches)

    def __iter__(self):
        return self

    def __next__(self):
        if self._first is not None:
            first, self._first = self._first, None
            self._pool.shutdown(wait=False)
            return first.result()
        return next(self._batches)
