"""The training step's pieces without Ray: the trainer's step and epoch on the tiny model in one process, state
set-up and resume placement, compiled blocks, device-side step metrics, and the validation figures."""

import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import torch.nn.functional as F

from jobs.config import build
from jobs.ingest import run_ingest
from jobs.metrics import per_class_report, scores_from_counts
from jobs.options import IngestConfig
from jobs.training import checkpoint as ckpt
from jobs.training.config import TrainConfig
from jobs.training.data import DeviceBatches, EpochStreams, StepLayout, read_ahead
from jobs.training.loop import StepMetrics, Trainer, build_train_state
from jobs.training.optim import build_optimizer, build_scheduler
from jobs.training.tracking import HEATMAP_MAX_CLASSES, _confusion_image
from model.transforms import train_transform
from pipeline import epochs as epoch_plans
from pipeline import generate_motion_dataset, load_manifest
from tests.pipeline.test_epochs import write_aspect_dataset

FRAMES, CLASSES = 4, 4


def tiny_config(**overrides) -> TrainConfig:
    return TrainConfig(data="clips@1", model="uniformerv2_tiny", lr=1e-3, compile="off", **overrides)


def one_step(state, seed: int = 0, step: int = 1) -> None:
    """Optimizer step number `step` (1-based)."""
    generator = torch.Generator().manual_seed(seed)
    clips = torch.randint(0, 256, (2, FRAMES, 40, 40, 3), dtype=torch.uint8, generator=generator)
    loss = F.cross_entropy(state.net(train_transform(clips, 32, generator)), torch.tensor([0, 3]))
    loss.backward()
    state.optimizer.step()
    state.scheduler.step_update(step)
    state.optimizer.zero_grad()


def clip_batches(count: int, batch_size: int = 2, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {"frames": torch.randint(0, 256, (batch_size, FRAMES, 40, 40, 3), dtype=torch.uint8, generator=generator),
         "label": torch.randint(0, CLASSES, (batch_size,), generator=generator)}
        for _ in range(count)
    ]


def tiny_trainer(cfg: TrainConfig, layout: StepLayout, progress=None, checkpoint_dir=None, rank=0) -> Trainer:
    """A trainer of one process on the CPU: no DDP, no streams, no MLflow, no checkpoints."""
    cpu = torch.device("cpu")
    state = build_train_state(cfg, CLASSES, FRAMES, cpu, layout.total_steps, layout.warmup_steps(cfg.warmup_epochs),
                              checkpoint_dir=checkpoint_dir)
    return Trainer(cfg, state, progress or ckpt.Progress(), layout, cpu, crop_size=32, rank=rank)


def weights(trainer: Trainer) -> dict:
    return {k: v.clone() for k, v in trainer.state.net.state_dict().items()}


def test_train_step_takes_one_optimizer_step_and_moves_the_position_and_the_rate():
    cfg = tiny_config(batch_size=2)
    trainer = tiny_trainer(cfg, StepLayout((5, 5), 10, 2))
    before, rate_before = weights(trainer), trainer.state.optimizer.param_groups[0]["lr"]
    batches = iter(clip_batches(3))
    waited = trainer.train_step(batches)

    assert 0 <= waited < 1 and len(list(batches)) == 2  # one batch taken
    assert (trainer.progress.global_step, trainer.progress.step_in_epoch) == (1, 1)
    assert trainer.state.optimizer.param_groups[0]["lr"] > rate_before  # step 2's rate, still warming up
    assert any(not torch.equal(before[k], v) for k, v in weights(trainer).items())
    ((step, values),) = trainer.step_metrics.drain()
    assert step == 1 and values["lr"] == rate_before and values["train_loss"] > 0 and values["grad_norm"] > 0


def test_accumulated_step_takes_its_micro_batches_and_averages_their_loss():
    layout = StepLayout((5,), 5, 4)
    accumulated = tiny_trainer(tiny_config(batch_size=2, grad_accum=2, grad_clip=0), layout)
    batches = iter(clip_batches(3))
    accumulated.train_step(batches)
    assert len(list(batches)) == 1 and accumulated.progress.global_step == 1
    ((_, values),) = accumulated.step_metrics.drain()

    # the same two micro-batches, each scored by the initial weights with the step's seeded augmentation
    single = tiny_trainer(tiny_config(batch_size=2, grad_clip=0), layout)
    generator = torch.Generator().manual_seed(ckpt.step_seed(0, 0, 0))
    torch.manual_seed(ckpt.step_seed(0, 0, 0))
    losses = [single.forward_backward(batch, generator, last_micro_step=True) for batch in clip_batches(2)]
    assert values["train_loss"] == pytest.approx(float(sum(losses)) / 2, rel=1e-5)


def test_steps_reseed_per_seed_step_and_rank_so_a_resumed_trainer_matches_an_uninterrupted_one(tmp_path):
    cfg, layout = tiny_config(batch_size=2), StepLayout((4,), 4, 2)
    first, second = clip_batches(2, seed=1)
    straight = tiny_trainer(cfg, layout)
    for batch in (first, second):
        straight.train_step(iter([batch]))

    interrupted = tiny_trainer(cfg, layout)
    interrupted.train_step(iter([first]))
    state = interrupted.state
    ckpt.save(str(tmp_path), state.net, state.optimizer, state.scheduler, state.scaler, interrupted.progress)
    torch.manual_seed(123)  # whatever the process drew in between
    resumed = tiny_trainer(cfg, layout, ckpt.read_progress(str(tmp_path)), checkpoint_dir=str(tmp_path))
    resumed.train_step(iter([second]))
    assert resumed.progress.global_step == 2
    for key, value in weights(straight).items():
        torch.testing.assert_close(weights(resumed)[key], value, rtol=0, atol=0, msg=key)

    other_rank = tiny_trainer(cfg, layout, rank=1)  # another rank augments the same clips otherwise
    for batch in (first, second):
        other_rank.train_step(iter([batch]))
    assert any(not torch.equal(weights(straight)[k], v) for k, v in weights(other_rank).items())


def test_a_step_on_keep_aspect_clips_crops_inside_each_clips_valid_width():
    trainer = tiny_trainer(tiny_config(batch_size=2), StepLayout((5,), 5, 2))
    (batch,) = clip_batches(1)
    wide = {**batch, "frames": torch.zeros((2, FRAMES, 40, 72, 3), dtype=torch.uint8),
            "valid_width": torch.tensor([72, 54])}
    trainer.train_step(iter([wide]))
    assert trainer.progress.global_step == 1
    with pytest.raises(ValueError, match="valid widths"):  # narrower than the crop: the step read them
        trainer.train_step(iter([{**wide, "valid_width": torch.tensor([72, 30])}]))


def test_the_epoch_head_read_here_carries_the_valid_widths(tmp_path):
    plan = epoch_plans.EpochPlan(str(tmp_path), write_aspect_dataset(str(tmp_path)), "all", 0.0, 1, seed=0)
    batches = list(read_ahead(plan, plan.windows(0, 0, shuffle=False), batch_size=4))
    assert [batch["valid_width"].tolist() for batch in batches] == [[4, 4, 2, 2], [4, 4]]


def test_step_layout_cuts_the_last_epochs_where_max_steps_ends():
    layout = StepLayout((5, 5, 5), 7, 8)
    assert [layout.epoch_steps(e) for e in range(4)] == [5, 2, 0, 0]
    assert [layout.steps_before(e) for e in range(3)] == [0, 5, 10]
    assert layout.warmup_steps(0.5) == 2 and layout.warmup_steps(3.0) == 7 and layout.warmup_steps(0.0) == 1


class SlowBatches:
    """Batches that each take `delay_s` to arrive, like a stream that cannot keep up."""

    def __init__(self, batches: list[dict], delay_s: float):
        self.batches, self.delay_s = iter(batches), delay_s

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        time.sleep(self.delay_s)
        return next(self.batches)


def test_train_epoch_steps_to_the_epochs_end_and_measures_the_share_spent_waiting_for_data():
    cfg = tiny_config(batch_size=2, log_every=2)
    trainer = tiny_trainer(cfg, StepLayout((3, 3), 5, 2))
    trainer.progress.epoch, trainer.progress.step_in_epoch, trainer.progress.global_step = 1, 0, 3
    batches = SlowBatches(clip_batches(4), delay_s=0.2)
    started = time.perf_counter()
    share = trainer.train_epoch(batches)
    elapsed = time.perf_counter() - started

    assert (trainer.progress.step_in_epoch, trainer.progress.global_step) == (2, 5)  # cut by the run's 5 steps
    assert len(list(batches.batches)) == 2  # nothing read past the epoch's steps
    assert 0.4 / elapsed - 0.05 <= share <= 1  # the two waits of 0.2 s
    # steps 4 (read back at --log-every 2) and 5 (still buffered for the epoch end)
    assert [step for step, _ in trainer.drain_step_metrics()] == [5]


@pytest.mark.integration
@pytest.mark.parametrize("keep", ["square", "aspect"])
def test_epoch_streams_read_the_head_here_and_stream_the_rest_as_one_pipeline_would(ray_local, tmp_path, monkeypatch,
                                                                                   keep):
    """The head read in this process and the Ray Data tail together give exactly the batches one Ray Data pipeline
    gives for the same rows, from an epoch's start and from a resumed step, with the head ending inside a window;
    a keep="aspect" dataset's batches carry each clip's valid width both ways."""
    generate_motion_dataset(tmp_path / "videos", num_per_class=6, size=(40, 40), num_frames=16, seed=2)
    run_ingest(
        build(
            IngestConfig,
            dict(
                src=str(tmp_path / "videos"),
                out=str(tmp_path / "clips"),
                labels_from_dirs=True,
                frames=FRAMES,
                size=32,
                short_side=40,
                keep=keep,
            ),
        ),
        echo=lambda _: None,
    )
    monkeypatch.setattr(epoch_plans, "WINDOW_ROWS", 5)  # several windows in 24 clips
    clips = str(tmp_path / "clips")
    plan = epoch_plans.EpochPlan(clips, load_manifest(clips), "train", 0.0, world_size=1, seed=3)
    layout = StepLayout((plan.steps_per_epoch(0, 4), plan.steps_per_epoch(1, 4)), 100, rows_per_step=4)
    streams = EpochStreams(plan, layout, rank=0, batch_size=4, device=torch.device("cpu"))
    assert layout.steps_per_epoch[1] >= 4 and len(plan.windows(1, 0)) >= 3

    for epoch, step in ((0, 0), (1, 2)):
        start, stop = step * 4, layout.epoch_steps(epoch) * 4
        head_stop = streams.head_stop(epoch, start, stop)
        first_window = plan.windows(epoch, 0, start, stop)[0]["take"]
        assert start < head_stop < stop and (head_stop - start) % 4 == 0 and head_stop - start != first_window
        streamed = list(streams.open(epoch, step))
        dtypes = {"frames": torch.uint8, "label": torch.int64, **({"valid_width": torch.int64} if keep == "aspect"
                                                                  else {})}
        expected = list(plan.dataset(epoch, 0, start, stop).iter_torch_batches(batch_size=4, dtypes=dtypes))
        assert len(streamed) == len(expected) == layout.epoch_steps(epoch) - step
        for got, want in zip(streamed, expected):
            assert got.keys() == want.keys() and all(torch.equal(got[key], want[key]) for key in got)
        if keep == "aspect":  # the 40x40 videos fill 40 of the 72 stored columns
            assert streamed[0]["frames"].shape[3] == 72 and set(streamed[0]["valid_width"].tolist()) == {40}


def test_resume_places_optimizer_state_on_each_parameters_device(tmp_path):
    """After a resume into a model on another device (here: meta, which a CPU machine has), every optimizer state
    tensor must sit on its parameter's device and dtype; loading before moving the model leaves it on the CPU,
    which on a GPU fails at the first optimizer step."""
    cfg = tiny_config()
    state = build_train_state(cfg, CLASSES, FRAMES, torch.device("cpu"), total_steps=10, warmup_steps=1)
    one_step(state)
    ckpt.save(str(tmp_path), state.net, state.optimizer, state.scheduler, state.scaler, ckpt.Progress(global_step=1))

    with pytest.warns(UserWarning, match="meta"):  # weights copied onto meta parameters are a no-op
        resumed = build_train_state(cfg, CLASSES, FRAMES, torch.device("meta"), 10, 1, checkpoint_dir=str(tmp_path))
    placed = 0
    for param in resumed.net.parameters():
        assert param.device.type == "meta"
        for name, value in resumed.optimizer.state[param].items():
            if name == "step":  # AdamW keeps its step count on the host unless fused or capturable
                continue
            assert (value.device, value.dtype) == (param.device, param.dtype), name
            placed += 1
    assert placed == 2 * sum(1 for p in resumed.net.parameters() if p.requires_grad)  # exp_avg and exp_avg_sq
    assert [group["lr"] for group in resumed.optimizer.param_groups] == [
        group["lr"] for group in state.optimizer.param_groups]  # the rate of step 2


def test_resumed_state_continues_exactly(tmp_path):
    cfg = tiny_config()
    straight = build_train_state(cfg, CLASSES, FRAMES, torch.device("cpu"), 10, 1)
    one_step(straight, seed=0)
    ckpt.save(str(tmp_path), straight.net, straight.optimizer, straight.scheduler, straight.scaler, ckpt.Progress())
    resumed = build_train_state(cfg, CLASSES, FRAMES, torch.device("cpu"), 10, 1, checkpoint_dir=str(tmp_path))
    for state in (straight, resumed):
        torch.manual_seed(1)
        one_step(state, seed=1, step=2)
    for a, b in zip(straight.net.state_dict().values(), resumed.net.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_new_checkpoint_folder_removes_those_of_killed_writers_and_keeps_the_rest(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert not psutil.pid_exists(gone.pid)  # the fault: a rank 0 that died before Ray uploaded its checkpoint
    orphan = tmp_path / f"{ckpt.STAGING_PREFIX}{gone.pid}-a1b2"
    orphan.mkdir()
    (orphan / ckpt.WEIGHTS).write_bytes(bytes(1024))
    uploading = tmp_path / f"{ckpt.STAGING_PREFIX}{os.getppid()}-c3d4"  # a live writer's: Ray may still upload it
    uploading.mkdir()
    unnamed = tmp_path / f"{ckpt.STAGING_PREFIX}x9y8"  # no writer in its name: nobody can tell whose it is
    unnamed.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("kept")
    (tmp_path / f"{ckpt.STAGING_PREFIX}{gone.pid}-link").symlink_to(elsewhere)
    assert ckpt.orphaned_staging_directories(str(tmp_path)) == [orphan]

    staged = Path(ckpt.staging_directory(str(tmp_path)))

    assert not orphan.exists() and uploading.is_dir() and unnamed.is_dir()
    assert (elsewhere / "keep").read_text() == "kept"
    assert staged.parent == tmp_path and staged.name.startswith(f"{ckpt.STAGING_PREFIX}{os.getpid()}-")
    assert ckpt.orphaned_staging_directories(str(tmp_path)) == []


def test_learning_rate_warms_up_to_lr_then_follows_a_cosine_to_min_lr():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer = build_optimizer(net, lr=1e-3, weight_decay=0.05)
    scheduler = build_scheduler(optimizer, total_steps=20, warmup_steps=4, lr=1e-3, min_lr=1e-5)
    rates = []
    for step in range(21):  # the rate of step n + 1 once n steps are done
        scheduler.step_update(step)
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates[0] == pytest.approx(1e-3 / 4)
    assert rates[:5] == sorted(rates[:5]) and rates[4] == pytest.approx(1e-3)
    assert rates[4:] == sorted(rates[4:], reverse=True) and rates[20] == pytest.approx(1e-5)
    assert rates[12] == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)  # half way down the cosine
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert [decay[id(p)] for p in net.parameters()] == [0.05, 0.0, 0.0, 0.0]  # only the matrix decays


def test_compiled_blocks_match_eager_logits_and_gradients():
    torch.manual_seed(0)
    eager = build_train_state(tiny_config(), CLASSES, FRAMES, torch.device("cpu"), 10, 1).net
    for param in eager.parameters():  # the zero-initialised projections would hide a wrong compiled branch
        param.data.add_(0.02 * torch.randn_like(param))
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks()
    video = torch.randn(2, 3, FRAMES, 32, 32)
    outputs = []
    for net in (eager, compiled):
        net.eval()  # dropout off; gradients still flow
        logits = net(video)
        logits.square().sum().backward()
        outputs.append((logits.detach(), {name: p.grad for name, p in net.named_parameters()}))
    (eager_logits, eager_grads), (compiled_logits, compiled_grads) = outputs
    torch.testing.assert_close(compiled_logits, eager_logits, atol=1e-4, rtol=1e-4)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, atol=1e-4, rtol=1e-3, msg=name)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints load either way


def test_step_metrics_read_back_every_step_once_in_order():
    metrics = StepMetrics(world=1, rows_per_step=8)
    for step in range(1, 4):
        metrics.add(step, torch.tensor(float(step)), torch.tensor(10.0 * step), lr=0.1 * step)
    drained = metrics.drain()
    assert [step for step, _ in drained] == [1, 2, 3]
    assert [values["train_loss"] for _, values in drained] == [1.0, 2.0, 3.0]
    assert [values["grad_norm"] for _, values in drained] == [10.0, 20.0, 30.0]
    assert "clips_per_s_per_worker" in drained[-1][1] and "clips_per_s_per_worker" not in drained[0][1]
    assert metrics.last == {"train_loss": 3.0}
    assert metrics.drain() == []  # nothing is read twice


def test_batches_pass_through_on_the_cpu():
    batches = [{"frames": torch.zeros(2, 3)}, {"frames": torch.ones(2, 3)}]
    assert list(DeviceBatches(iter(batches), torch.device("cpu"))) == batches


def test_validation_scores_top1_top5_and_mean_class():
    confusion = np.array([[8, 2, 0], [0, 1, 1], [0, 0, 0]])
    scores = scores_from_counts(confusion, top5_correct=12, loss_sum=6.0)
    assert scores.metrics["accuracy"] == pytest.approx(9 / 12)
    assert scores.metrics["top5_accuracy"] == 1.0
    assert scores.metrics["mean_class_accuracy"] == pytest.approx((0.8 + 0.5) / 2)  # the absent class is not counted
    assert scores.metrics["loss"] == 0.5


def test_kinetics_sized_confusion_gives_tables_not_a_growing_figure():
    rng = np.random.default_rng(0)
    names = [f"class_{i}" for i in range(400)]
    confusion = rng.integers(0, 3, (400, 400))
    confusion[7, 9] = 50
    report = per_class_report(confusion, names)
    assert len(report["classes"]) == 400 and report["most_confused"][0] == {
        "true": "class_7", "predicted": "class_9", "count": 50}
    assert len(report["most_confused"]) == 50
    with pytest.raises(ValueError, match="too many"):
        _confusion_image(confusion, names)
    largest = _confusion_image(confusion[:HEATMAP_MAX_CLASSES, :HEATMAP_MAX_CLASSES], names[:HEATMAP_MAX_CLASSES])
    assert max(largest.size) <= 1800  # 16 inches at 100 dpi plus tick labels
