"""The training function each Ray Train worker runs: plain PyTorch, with `ray.train` at its edges."""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
import torch.nn.functional as F

import model
from jobs.training import checkpoint as ckpt
from jobs.training.config import TrainConfig
from jobs.training.optim import build_optimizer, build_scheduler
from jobs.training.tracking import RunTracker
from model.transforms import eval_transform, train_transform
from pipeline import load_manifest
from pipeline.epochs import EpochPlan


def model_overrides(cfg: TrainConfig, frames: int) -> dict:
    overrides = {"t_size": frames, **cfg.model_overrides}
    if cfg.activation_checkpointing:
        overrides["use_checkpoint"] = True
    return overrides


def build_model(cfg: TrainConfig, num_classes: int, frames: int) -> torch.nn.Module:
    return model.create_model(cfg.model, num_classes=num_classes, **model_overrides(cfg, frames))


def load_initial_weights(net: torch.nn.Module, source: str, tracking_uri: str) -> None:
    """A checkpoint file in any supported layout, or a registered model (`models:/NAME/VERSION`)."""
    if not source.startswith("models:/"):
        model.load_pretrained(net, source)
        return
    from jobs.scoring.model_ref import resolve_model

    with tempfile.TemporaryDirectory() as scratch:
        model.load_pretrained(net, resolve_model(source, scratch, tracking_uri).weights_path)


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    os.environ.update(loop_config["mlflow_env"])
    cfg = TrainConfig.from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    manifest = load_manifest(cfg.data, endpoint_url=cfg.endpoint_url)
    sampling = manifest.sampling
    num_classes = len(manifest.class_map)
    train_plan = EpochPlan(cfg.data, manifest, "train", cfg.val_fraction if not cfg.val_data else 0.0, world,
                           cfg.seed, cfg.endpoint_url)
    if cfg.val_data:
        val_manifest = load_manifest(cfg.val_data, endpoint_url=cfg.endpoint_url)
        val_plan = EpochPlan(cfg.val_data, val_manifest, "all", 0.0, world, cfg.seed, cfg.endpoint_url)
    else:
        val_plan = EpochPlan(cfg.data, manifest, "val", cfg.val_fraction, world, cfg.seed, cfg.endpoint_url)

    rows_per_step = cfg.batch_size * cfg.grad_accum
    steps_per_epoch = [train_plan.steps_per_epoch(e, rows_per_step) for e in range(cfg.epochs)]
    total_steps = sum(steps_per_epoch) if cfg.max_steps is None else min(cfg.max_steps, sum(steps_per_epoch))
    if total_steps == 0:
        raise ValueError(
            f"{train_plan.rows} training clips are too few for {world} workers x batch {cfg.batch_size} x "
            f"accumulation {cfg.grad_accum}"
        )
    warmup_steps = min(total_steps, max(1, round(cfg.warmup_epochs * steps_per_epoch[0])))

    steps_before = [sum(steps_per_epoch[:e]) for e in range(cfg.epochs)]

    def epoch_stream(epoch: int, start_row: int) -> Iterator[dict]:
        # each epoch reads a whole number of steps, so no batch is left over or straddles two epochs
        rows = min(steps_per_epoch[epoch], total_steps - steps_before[epoch]) * rows_per_step
        if rows <= start_row:  # an epoch too short for one step on every rank
            return iter(())
        dataset = train_plan.dataset(epoch, rank, start=start_row, stop=rows)
        return EpochStream(dataset.iter_torch_batches(
            batch_size=cfg.batch_size, prefetch_batches=4, dtypes={"frames": torch.uint8, "label": torch.int64}
        ))

    resumed_from = ray.train.get_checkpoint()
    with resumed_from.as_directory() if resumed_from else contextlib.nullcontext() as checkpoint_dir:
        if checkpoint_dir:
            progress = ckpt.read_progress(checkpoint_dir)
        else:
            progress = ckpt.Progress(mlflow_run_id=loop_config["mlflow_run_id"], config=cfg.to_dict())
        upcoming = None
        if progress.epoch < cfg.epochs and progress.global_step < total_steps:
            # started first, so that its start-up overlaps building the model and loading weights
            upcoming = epoch_stream(progress.epoch, progress.step_in_epoch * rows_per_step)

        torch.manual_seed(cfg.seed)  # the same initial weights in every run of this config, not only across ranks
        net = build_model(cfg, num_classes, sampling.frames)
        optimizer = build_optimizer(net, cfg.lr, cfg.weight_decay)
        scheduler = build_scheduler(optimizer, total_steps, warmup_steps, cfg.lr, cfg.min_lr)
        use_cuda = device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda", enabled=use_cuda and cfg.precision == "fp16")
        if checkpoint_dir:
            ckpt.load(checkpoint_dir, net, optimizer, scheduler, scaler)
        elif cfg.pretrained:
            load_initial_weights(net, cfg.pretrained, loop_config["tracking_uri"])

    net = ray.train.torch.prepare_model(net)
    core = net.module if hasattr(net, "module") else net
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    autocast = (
        torch.autocast("cuda", dtype=autocast_dtype) if use_cuda and autocast_dtype else contextlib.nullcontext()
    )
    tracker = RunTracker(loop_config["tracking_uri"], progress.mlflow_run_id, enabled=rank == 0)
    if rank == 0 and resumed_from is not None:
        print(f"[train] resumed at epoch {progress.epoch} step {progress.step_in_epoch} (global {progress.global_step})")

    def report(metrics: dict, with_checkpoint: bool) -> None:
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if rank == 0:
                ckpt.save(directory, core, optimizer, scheduler, scaler, progress)
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=checkpoint)
        tracker.flush()

    while progress.epoch < cfg.epochs and progress.global_step < total_steps:
        epoch = progress.epoch
        net.train()
        batches = upcoming or epoch_stream(epoch, progress.step_in_epoch * rows_per_step)
        window_start, waited = time.perf_counter(), 0.0
        while progress.step_in_epoch < steps_per_epoch[epoch] and progress.global_step < total_steps:
            step_started = time.perf_counter()
            generator = torch.Generator().manual_seed(ckpt.step_seed(cfg.seed, progress.global_step, rank))
            torch.manual_seed(ckpt.step_seed(cfg.seed, progress.global_step, rank))
            step_loss = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                wait_started = time.perf_counter()
                batch = next(batches)
                waited += time.perf_counter() - wait_started
                clips = batch["frames"].to(device, non_blocking=True)
                labels = batch["label"].to(device, non_blocking=True)
                inputs = train_transform(clips, sampling.size, generator, flip=cfg.hflip)
                sync = contextlib.nullcontext() if micro == cfg.grad_accum - 1 or world == 1 else net.no_sync()
                with sync:
                    with autocast:
                        logits = net(inputs)
                        loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
                    scaler.scale(loss / cfg.grad_accum).backward()
                step_loss += loss.detach() / cfg.grad_accum
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            progress.step_in_epoch += 1
            progress.global_step += 1
            if world > 1:
                dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
            step_time = time.perf_counter() - step_started
            tracker.step(
                progress.global_step,
                train_loss=step_loss.item(),
                lr=lr,
                grad_norm=float(grad_norm),
                clips_per_s_per_worker=rows_per_step / step_time,
            )
            due = cfg.checkpoint_every and progress.global_step % cfg.checkpoint_every == 0
            epoch_done = progress.step_in_epoch >= steps_per_epoch[epoch] or progress.global_step >= total_steps
            if due and not epoch_done:
                report({"epoch": epoch, "global_step": progress.global_step, "train_loss": step_loss.item()}, True)
        elapsed = time.perf_counter() - window_start
        following = epoch + 1
        upcoming = None
        if following < cfg.epochs and steps_before[following] < total_steps:
            upcoming = epoch_stream(following, 0)  # its pipeline starts while this epoch is evaluated

        val_loss, accuracy, confusion = evaluate(core, val_plan, epoch, rank, world, num_classes, cfg, device, autocast)
        progress.epoch += 1
        progress.step_in_epoch = 0
        progress.finished = progress.epoch >= cfg.epochs or progress.global_step >= total_steps
        metrics = {
            "epoch": epoch,
            "global_step": progress.global_step,
            "val_loss": val_loss,
            "val_accuracy": accuracy,
            "data_wait_share": waited / max(elapsed, 1e-9),
        }
        report(metrics, True)
        tracker.epoch(epoch, progress.global_step, {k: v for k, v in metrics.items() if k != "epoch"}, confusion,
                      manifest.class_names)
    if rank == 0:
        tracker.curves()


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


@torch.no_grad()
def evaluate(core, plan, epoch, rank, world, num_classes, cfg, device, autocast):
    """Loss, accuracy and confusion matrix over the whole validation split, each rank scoring its share."""
    core.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for window in plan.read_windows(epoch, rank):
        for start in range(0, len(window["label"]), cfg.batch_size):
            clips = torch.from_numpy(window["frames"][start : start + cfg.batch_size]).to(device, non_blocking=True)
            labels = torch.from_numpy(window["label"][start : start + cfg.batch_size]).to(device, non_blocking=True)
            with autocast:
                logits = core(eval_transform(clips, plan.manifest.sampling.size)).float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
            confusion += torch.bincount(labels * num_classes + logits.argmax(1), minlength=num_classes**2).view(
                num_classes, num_classes
            )
    if world > 1:
        dist.all_reduce(confusion)
        dist.all_reduce(loss_sum)
    core.train()
    total = int(confusion.sum())
    if total == 0:
        return float("nan"), float("nan"), confusion.cpu().numpy()
    return float(loss_sum) / total, float(confusion.diag().sum()) / total, confusion.cpu().numpy()

