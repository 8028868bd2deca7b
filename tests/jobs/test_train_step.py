"""The training step's pieces without Ray: state set-up and resume placement, compiled blocks, device-side step
metrics, and the validation figures."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jobs.training import checkpoint as ckpt
from jobs.training.config import TrainConfig
from jobs.metrics import per_class_report, scores_from_counts
from jobs.training.loop import DeviceBatches, StepMetrics, build_train_state
from jobs.training.optim import build_optimizer, build_scheduler
from jobs.training.tracking import HEATMAP_MAX_CLASSES, _confusion_image
from model.transforms import train_transform

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
