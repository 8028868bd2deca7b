"""How scoring runs the model on GPUs, checked without one: the size bounds of the model actor pool."""

from __future__ import annotations

import pytest

import model
from jobs.score import ScoreOptions, actor_pool_bounds, score_dataset
from model.package import ModelCard, save_package
from pipeline.listing import SourceVideo


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
