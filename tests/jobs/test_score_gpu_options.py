"""How scoring runs the model on GPUs, checked without one: precision defaults and CPU bf16 autocast, and the size
bounds of the model actor pool."""

from __future__ import annotations

import pytest
import torch

import model
from jobs.options import ScoreOptions
from jobs.score import actor_pool_bounds, score_dataset
from model.inference import predict_views, resolve_precision
from model.package import ModelCard, save_package
from pipeline.listing import SourceVideo


def test_auto_precision_is_bf16_on_cuda_and_fp32_on_cpu_and_an_explicit_one_applies_anywhere():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # a device object needs no GPU
    assert (resolve_precision("auto", cuda), resolve_precision("auto", cpu)) == ("bf16", "fp32")
    for precision in ("fp32", "bf16", "fp16"):
        assert resolve_precision(precision, cuda) == resolve_precision(precision, cpu) == precision
    assert ScoreOptions().precision == "auto"
    with pytest.raises(ValueError, match="auto, fp32, bf16, fp16"):
        ScoreOptions(precision="bfloat16")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8", cpu)


def test_bf16_probabilities_stay_close_to_fp32_on_cpu():
    torch.manual_seed(0)
    net = model.create_model("uniformerv2_tiny", num_classes=4).eval()
    views = torch.randint(0, 256, (16, 2, 8, 32, 32, 3), dtype=torch.uint8)  # [B, V, T, H, W, 3]

    full = predict_views(net, views, 32, "fp32")
    half = predict_views(net, views, 32, "bf16")

    difference = (half - full).abs().max().item()
    assert 0 < difference < 2e-2  # bf16 autocast ran on the CPU, and rounded little
    assert (half.argmax(dim=1) == full.argmax(dim=1)).float().mean() >= 0.9
    torch.testing.assert_close(half.sum(dim=1), torch.ones(16))


@pytest.mark.parametrize(
    "actors, use_gpu, cluster_gpus, bounds",
    [
        (None, True, 0, (1, 1)),  # an autoscaled GPU group with no node yet still gets an actor
        (4, True, 0, (1, 4)),  # and grows to --actors as GPUs come
        (None, True, 8, (1, 8)),  # starts scoring on the first free GPU instead of waiting for all eight
        (2, True, 8, (1, 2)),
        (None, False, 8, (1, 1)),  # on CPU one actor unless asked for more
        (3, False, 0, (1, 3)),
    ],
)
def test_actor_pool_grows_from_one_actor_to_the_requested_or_visible_gpus(actors, use_gpu, cluster_gpus, bounds):
    assert actor_pool_bounds(actors, use_gpu, cluster_gpus) == bounds


def test_zero_actors_is_refused():
    with pytest.raises(ValueError, match="actors must be >= 1"):
        ScoreOptions(actors=0)


@pytest.mark.integration
def test_scoring_dataset_plans_an_autoscaling_actor_pool(tmp_path, ray_local):
    import ray.data

    card = ModelCard("uniformerv2_tiny", 4, {}, ["a", "b", "c", "d"], frames=8, crop_size=32, short_side=32)
    save_package(model.create_model(card.model, card.num_classes), card, tmp_path / "package")
    videos = [SourceVideo(str(tmp_path / f"v{i}.mp4"), f"v{i}.mp4", 1, "etag") for i in range(3)]  # never read

    dataset = score_dataset(videos, str(tmp_path / "package"), views="1x1", options=ScoreOptions(actors=3))

    strategies, pending = [], [dataset._logical_plan.dag]  # the plan only: nothing executes
    while pending:
        op = pending.pop()
        strategies.append(getattr(op, "compute", None))
        pending.extend(op.input_dependencies)
    assert ray.data.ActorPoolStrategy(min_size=1, max_size=3) in strategies
