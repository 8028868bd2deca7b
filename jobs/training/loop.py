"""The training function each Ray Train worker runs: plain PyTorch, with `ray.train` at its edges."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler

from jobs.credentials import adopt_mlflow_env
from jobs.metrics import Scores, scores_from_counts
from jobs.training import checkpoint as ckpt
from jobs.training.config import TrainConfig
from jobs.training.data import EpochStreams, StepLayout, epoch_plans
from jobs.training.network import build_model, flip_swap, load_initial_weights, read_class_map, read_flip_pairs
from jobs.training.optim import build_optimizer, build_scheduler
from jobs.training.progress import RankZeroProgress
from jobs.training.tracking import RunTracker
from model.inference import predict_views
from model.transforms import input_normalization, train_transform
from pipeline import load_manifest
from pipeline.epochs import EpochPlan

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """What a checkpoint restores: the model on its device and the optimizer, scheduler and scaler built over it."""

    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler
    scaler: torch.amp.GradScaler


def configure_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # clip shapes are fixed: the autotuned 3-D convolutions pay back
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 paths (fp32 precision, the loss) on tensor cores
        torch.backends.cudnn.allow_tf32 = True


def build_train_state(
    cfg: TrainConfig,
    num_classes: int,
    frames: int,
    device: torch.device,
    total_steps: int,
    warmup_steps: int,
    checkpoint_dir: str | None = None,
    tracking_uri: str | None = None,
    class_names: list[str] | None = None,
) -> TrainState:
    """The model moves to its device before the optimizer exists: `Optimizer.load_state_dict` places each state
    tensor on its parameter's device and dtype as they are when it runs, so a checkpoint loaded into a model that
    moves later leaves CPU state behind CUDA parameters, and the first step after a resume fails."""
    torch.manual_seed(cfg.seed)  # the same initial weights in every run of this config, not only across ranks
    net = build_model(cfg, num_classes, frames).to(device)
    optimizer = build_optimizer(net, cfg.lr, cfg.weight_decay, fused=device.type == "cuda")
    scheduler = build_scheduler(optimizer, total_steps, warmup_steps, cfg.lr, cfg.min_lr)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.precision == "fp16")
    if checkpoint_dir:
        ckpt.load(checkpoint_dir, net, optimizer, scheduler, scaler)
    elif cfg.pretrained:
        class_map = read_class_map(cfg.pretrained_class_map) if cfg.pretrained_class_map else None
        load_initial_weights(net, cfg.pretrained, tracking_uri, class_names, class_map)
    if cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda"):
        net.compile_blocks()
    return TrainState(net, optimizer, scheduler, scaler)


def ddp_options(cfg: TrainConfig) -> dict:
    """Gradients live in DDP's communication buckets (no copy per step). The graph is static (every parameter gets a
    gradient every step: stochastic depth scales branches, it never skips modules), which lets DDP overlap its
    all-reduces with the backward pass; with accumulation, `no_sync` steps change what each backward reduces, so
    static_graph is left off there."""
    return {"gradient_as_bucket_view": True, "static_graph": cfg.grad_accum == 1}


class RayCheckpoints:
    """Checkpoints through Ray Train: rank 0 writes the state to a local directory, every rank reports (Ray Train's
    barrier). The upload runs in the background (every GPU waits for the barrier, not for the upload) except for the
    last checkpoint's, which the driver registers right after."""

    def __init__(self, rank: int):
        self.rank = rank

    def save(self, state: TrainState, progress: ckpt.Progress, metrics: dict) -> None:
        import ray.train
        from ray.train import CheckpointUploadMode

        checkpoint = None
        if self.rank == 0:
            directory = ckpt.staging_directory()  # Ray deletes it once uploaded
            ckpt.save(directory, state.net, state.optimizer, state.scheduler, state.scaler, progress)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        mode = CheckpointUploadMode.SYNC if progress.finished else CheckpointUploadMode.ASYNC
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_mode=mode,
                         delete_local_checkpoint_after_upload=True)


class Trainer:
    """One rank's training, torchtitan-style: `setup` builds it (plans, model, resume) at Ray Train's edge; `fit` runs
    the epochs: `train_epoch` (the steps of one epoch), `train_step` (one optimizer step), `validate` and
    `save_checkpoint`. Built directly (one process, no Ray: no streams, tracker, console or checkpoints needed), the
    pieces run alone on any batches."""

    def __init__(
        self,
        cfg: TrainConfig,
        state: TrainState,
        progress: ckpt.Progress,
        layout: StepLayout,
        device: torch.device,
        crop_size: int,
        *,
        model: torch.nn.Module | None = None,
        rank: int = 0,
        world: int = 1,
        streams: EpochStreams | None = None,
        first_batches: Iterator[dict] | None = None,
        val_plan: EpochPlan | None = None,
        class_names: list[str] | None = None,
        tracker: RunTracker | None = None,
        console: RankZeroProgress | None = None,
        checkpoints: RayCheckpoints | None = None,
    ):
        self.cfg, self.state, self.progress, self.layout, self.device = cfg, state, progress, layout, device
        self.crop_size, self.rank, self.world = crop_size, rank, world
        # what the step runs: the DDP wrapper across ranks; `state.net` holds the weights
        self.model = state.net if model is None else model
        # class id -> the id of its mirror image (`--flip-pairs`), for the labels of horizontally flipped clips
        self.flip_swap = flip_swap(read_flip_pairs(cfg.flip_pairs), class_names, device) if cfg.flip_pairs else None
        self.streams, self.first_batches = streams, first_batches
        self.val_plan, self.class_names = val_plan, class_names
        self.tracker = tracker or RunTracker(None, progress.mlflow_run_id, enabled=False)
        self.console = console or RankZeroProgress(None, False, cfg.epochs, layout.total_steps, world)
        self.checkpoints = checkpoints
        self.step_metrics = StepMetrics(world, layout.rows_per_step)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)

    @classmethod
    def setup(cls, loop_config: dict) -> Trainer:
        """This rank's trainer, resumed from Ray Train's latest checkpoint when there is one. The first epoch's
        pipeline starts before the model is built, so that its start-up overlaps building it and loading weights."""
        import ray.train
        import ray.train.torch

        adopt_mlflow_env(loop_config["mlflow_env"])
        cfg = TrainConfig.from_dict(loop_config["config"])
        context = ray.train.get_context()
        rank, world = context.get_world_rank(), context.get_world_size()
        device = ray.train.torch.get_device()
        configure_device(device)

        manifest = load_manifest(cfg.data, endpoint_url=cfg.endpoint_url)
        # the units the driver cut for this world size: a worker then reads no shard to plan (benchmarks/scale.py)
        units = ray.get(loop_config["plan_units"]) if world == cfg.workers else None
        train_plan, val_plan = epoch_plans(cfg, manifest, world, units)
        layout = StepLayout.of(cfg, train_plan)
        streams = EpochStreams(train_plan, layout, rank, cfg.batch_size, device)
        # before the model is built: rank 0's notices (the initial weights' load report) reach the driver's console too
        console = RankZeroProgress(loop_config.get("progress_board"), rank == 0, cfg.epochs, layout.total_steps, world)

        resumed_from = ray.train.get_checkpoint()
        with resumed_from.as_directory() if resumed_from else contextlib.nullcontext() as checkpoint_dir:
            if checkpoint_dir:
                progress = ckpt.read_progress(checkpoint_dir)
                progress.metrics = None  # they describe the checkpoint resumed from, not the next one
            else:
                progress = ckpt.Progress(mlflow_run_id=loop_config["mlflow_run_id"], config=cfg.to_dict())
            first_batches = None
            if not cls.finished(cfg, layout, progress):
                first_batches = streams.open(progress.epoch, progress.step_in_epoch)
            state = build_train_state(cfg, len(manifest.class_map), manifest.sampling.frames, device,
                                      layout.total_steps, layout.warmup_steps(cfg.warmup_epochs), checkpoint_dir,
                                      loop_config["tracking_uri"], manifest.class_names)

        model = ray.train.torch.prepare_model(state.net, parallel_strategy_kwargs=ddp_options(cfg))
        tracker = RunTracker(loop_config["tracking_uri"], progress.mlflow_run_id, enabled=rank == 0)
        if rank == 0 and resumed_from is not None:
            log.info("resumed at epoch %d step %d (global %d)", progress.epoch + 1, progress.step_in_epoch,
                     progress.global_step)
        return cls(cfg, state, progress, layout, device, manifest.sampling.size, model=model, rank=rank, world=world,
                   streams=streams, first_batches=first_batches, val_plan=val_plan, class_names=manifest.class_names,
                   tracker=tracker, console=console, checkpoints=RayCheckpoints(rank))

    @staticmethod
    def finished(cfg: TrainConfig, layout: StepLayout, progress: ckpt.Progress) -> bool:
        return progress.epoch >= cfg.epochs or progress.global_step >= layout.total_steps

    def fit(self) -> None:
        """The remaining epochs: train, start the next epoch's pipeline, validate, checkpoint, track."""
        batches, self.first_batches = self.first_batches, None
        while not self.finished(self.cfg, self.layout, self.progress):
            epoch = self.progress.epoch
            data_wait_share = self.train_epoch(batches or self.streams.open(epoch, self.progress.step_in_epoch))
            batches = None
            if self.layout.epoch_steps(epoch + 1) > 0:
                batches = self.streams.open(epoch + 1, 0)  # it starts reading while this epoch is evaluated
            self.end_epoch(epoch, data_wait_share)
        self.tracker.curves()
        self.console.close()

    def train_epoch(self, batches: Iterator[dict]) -> float:
        """The rest of the epoch in progress from `batches`, with a checkpoint every `checkpoint_every` steps; returns
        the share of its time the steps waited for data."""
        cfg, progress = self.cfg, self.progress
        epoch, epoch_steps = progress.epoch, self.layout.epoch_steps(progress.epoch)
        self.model.train()
        started, waited = time.perf_counter(), 0.0
        while progress.step_in_epoch < epoch_steps:
            waited += self.train_step(batches)
            if progress.global_step % cfg.log_every == 0:
                self.console.steps(self.drain_step_metrics(), epoch, self.data_wait_share(waited, started))
            if cfg.checkpoint_every and progress.global_step % cfg.checkpoint_every == 0 \
                    and progress.step_in_epoch < epoch_steps:
                # no validation here: NaN ranks a mid-epoch checkpoint below every epoch end for --select best
                self.save_checkpoint({"epoch": epoch, "global_step": progress.global_step, "val_accuracy": math.nan,
                                      **self.step_metrics.last})
        return self.data_wait_share(waited, started)

    def data_wait_share(self, waited: float, started: float) -> float:
        """The share of the time since `started` the steps waited for data, on the rank that waited most: under DDP a
        rank short of data holds every other rank at the next all-reduce, so rank 0's own share can hide it. Every
        rank calls it at the same steps."""
        share = waited / max(time.perf_counter() - started, 1e-9)
        if self.world == 1:
            return share
        shares = torch.tensor([share], dtype=torch.float64, device=self.device)
        dist.all_reduce(shares, op=dist.ReduceOp.MAX)
        return shares.item()

    def train_step(self, batches: Iterator[dict]) -> float:
        """One optimizer step over `grad_accum` micro-batches of `batches`; returns the seconds spent waiting for
        them. Randomness (augmentation, dropout, drop path) is reseeded from (seed, global step, rank), so that a
        resumed run draws what an uninterrupted one does."""
        cfg, state, progress = self.cfg, self.state, self.progress
        seed = ckpt.step_seed(cfg.seed, progress.global_step, self.rank)
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        step_loss = torch.zeros((), device=self.device)
        waited = 0.0
        for micro in range(cfg.grad_accum):
            wait_started = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - wait_started
            step_loss += self.forward_backward(batch, generator, last_micro_step=micro == cfg.grad_accum - 1)
        state.scaler.unscale_(state.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        )
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.optimizer.zero_grad(set_to_none=True)
        lr = state.optimizer.param_groups[0]["lr"]  # this step's
        state.scheduler.step_update(progress.global_step + 1)  # the next step's
        progress.step_in_epoch += 1
        progress.global_step += 1
        self.step_metrics.add(progress.global_step, step_loss, grad_norm, lr)
        return waited

    def forward_backward(self, batch: dict, generator: torch.Generator, last_micro_step: bool) -> torch.Tensor:
        """One micro-batch's loss (its share of the step's) and gradients; DDP all-reduces the gradients only on the
        step's last micro-batch."""
        cfg = self.cfg
        inputs, flipped = train_transform(batch["frames"], self.crop_size, generator, flip=cfg.hflip,
                                          augment=cfg.augment, normalization=input_normalization(self.model),
                                          return_flips=True, valid_widths=batch.get("valid_width"))
        labels = batch["label"]
        if self.flip_swap is not None:  # a flipped "pushing left to right" is "pushing right to left"
            labels = torch.where(flipped, self.flip_swap[labels], labels)
        sync = contextlib.nullcontext() if last_micro_step or self.world == 1 else self.model.no_sync()
        with sync:
            with self.autocast():
                logits = self.model(inputs)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
            self.state.scaler.scale(loss / cfg.grad_accum).backward()
        return loss.detach() / cfg.grad_accum

    def autocast(self):
        """bf16 or fp16 autocast on CUDA; fp32 on the CPU."""
        if self.device.type == "cuda" and self.autocast_dtype:
            return torch.autocast("cuda", dtype=self.autocast_dtype)
        return contextlib.nullcontext()

    def end_epoch(self, epoch: int, data_wait_share: float) -> None:
        """Validates, reports the epoch-end checkpoint with its metrics, tracks them and posts the console line."""
        progress = self.progress
        last_window = self.drain_step_metrics()
        scores = self.validate(epoch)
        progress.epoch += 1
        progress.step_in_epoch = 0
        progress.finished = self.finished(self.cfg, self.layout, progress)
        metrics = {
            "epoch": epoch,
            "global_step": progress.global_step,
            **{f"val_{name}": value for name, value in scores.metrics.items()},
            "data_wait_share": data_wait_share,
        }
        progress.metrics = {k: v for k, v in metrics.items() if k.startswith("val_")}
        self.save_checkpoint(metrics)
        progress.metrics = None  # the next checkpoint is mid-epoch until this epoch's end says otherwise
        self.tracker.epoch(epoch, progress.global_step, {k: v for k, v in metrics.items() if k != "epoch"},
                           scores.confusion, self.class_names)
        self.console.epoch_end(last_window, epoch, progress.global_step, data_wait_share, scores.metrics)

    def validate(self, epoch: int) -> Scores:
        """Scores over the whole validation split through the one inference path (`predict_views`, each stored clip
        one view), each rank scoring its share; counts are summed across ranks."""
        net, plan, cfg, device = self.state.net, self.val_plan, self.cfg, self.device
        num_classes = len(self.class_names)
        net.eval()
        precision = cfg.precision if device.type == "cuda" else "fp32"  # training autocasts on CUDA only
        confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, top-5 hits
        top = min(5, num_classes)
        for window in plan.read_windows(epoch, self.rank):
            for start in range(0, len(window["label"]), cfg.batch_size):
                clips = torch.from_numpy(window["frames"][start : start + cfg.batch_size]).to(device, non_blocking=True)
                labels = torch.from_numpy(window["label"][start : start + cfg.batch_size]).to(device, non_blocking=True)
                # a keep="aspect" dataset's padding is centred: the centre crop lies inside every clip's video
                probs = predict_views(net, clips[:, None], plan.manifest.sampling.size, precision)
                sums[0] += -probs.gather(1, labels[:, None]).clamp_min(1e-12).log().sum().double()
                sums[1] += (probs.topk(top, dim=1).indices == labels[:, None]).any(dim=1).sum()
                confusion += torch.bincount(labels * num_classes + probs.argmax(1), minlength=num_classes**2).view(
                    num_classes, num_classes
                )
        if self.world > 1:
            dist.all_reduce(confusion)
            dist.all_reduce(sums)
        net.train()
        loss_sum, top5_correct = sums.tolist()
        return scores_from_counts(confusion.cpu().numpy(), int(top5_correct), loss_sum)

    def save_checkpoint(self, metrics: dict) -> None:
        """Reports a checkpoint of the current state with `metrics`; the step metrics it covers go to MLflow after
        it (a resumed run never logs a step twice)."""
        self.drain_step_metrics()
        self.checkpoints.save(self.state, self.progress, metrics)
        self.tracker.flush()

    def drain_step_metrics(self) -> list[tuple[int, dict]]:
        drained = self.step_metrics.drain()
        for step, values in drained:
            self.tracker.step(step, **values)
        return drained


class StepMetrics:
    """Per-step loss and gradient norm kept on the device and read back every `log_every` steps in one transfer
    (an all-reduce of the losses and one copy to the host): a `.item()` per step would stall the host behind the
    GPU at every step. All ranks drain at the same steps, so the all-reduce pairs up."""

    def __init__(self, world: int, rows_per_step: int):
        self.world, self.rows_per_step = world, rows_per_step
        self._steps: list[int] = []
        self._lrs: list[float] = []
        self._values: list[torch.Tensor] = []
        self._window_started = time.perf_counter()
        self.last: dict = {}

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> None:
        self._steps.append(step)
        self._lrs.append(lr)
        self._values.append(torch.stack([loss.float(), grad_norm.float()]))

    def drain(self) -> list[tuple[int, dict]]:
        """The buffered steps' metrics; every rank must call it at the same steps."""
        if not self._steps:
            return []
        values = torch.stack(self._values)  # [steps, 2]: loss, grad norm (the same on every rank after DDP)
        if self.world > 1:
            losses = values[:, 0].contiguous()
            dist.all_reduce(losses, op=dist.ReduceOp.AVG)
            values[:, 0] = losses
        host = values.tolist()
        now = time.perf_counter()
        rate = len(self._steps) * self.rows_per_step / max(now - self._window_started, 1e-9)
        drained = [
            (step, {"train_loss": loss, "lr": lr, "grad_norm": norm})
            for step, lr, (loss, norm) in zip(self._steps, self._lrs, host)
        ]
        drained[-1][1]["clips_per_s_per_worker"] = rate
        self.last = {"train_loss": drained[-1][1]["train_loss"]}
        self._steps, self._lrs, self._values, self._window_started = [], [], [], now
        return drained
