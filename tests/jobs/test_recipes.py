"""Named recipes: each resolves through the CLI's configuration layers, cites a source for every value, scales its
learning rates with the run's total batch, yields to what the user gives, and trains on the tiny config."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from jobs.cli import app
from jobs.config import ConfigError, build
from jobs.training.config import TrainConfig
from jobs.training.loop import StepLayout
from jobs.training.recipes import RECIPES_DIR, list_recipes, recipe_values
from tests.jobs.test_train_step import clip_batches, tiny_trainer, weights

RECIPES = list_recipes()


def test_the_shipped_recipes_are_the_papers_routes():
    assert RECIPES == ["k400_b16_clip", "k700_b16_clip", "k710_to_k400_b16"]


@pytest.mark.parametrize("name", RECIPES)
def test_a_recipe_cites_a_source_for_every_value_and_builds(name):
    lines = (RECIPES_DIR / f"{name}.yaml").read_text().splitlines()
    values = [line for line in lines if line.strip() and not line.lstrip().startswith("#")
              and not line.rstrip().endswith(":")]  # `key: value` lines, not section heads
    assert values and all("#" in line for line in values), [line for line in values if "#" not in line]
    cfg = build(TrainConfig, {"data": "clips", "recipe": name, "workers": 8, "batch_size": 32})
    recipe = recipe_values(name)
    assert cfg.lr == pytest.approx(recipe["lr"]) and cfg.min_lr == pytest.approx(recipe["min_lr"])  # 256 clips
    assert cfg.input_normalization == "slowfast" and cfg.model_overrides["no_lmhra"] is True


def test_learning_rates_scale_with_the_total_batch_and_what_the_user_gives_wins():
    small = build(TrainConfig, {"data": "clips", "recipe": "k400_b16_clip", "workers": 2, "batch_size": 8,
                                "grad_accum": 2})
    assert small.lr == pytest.approx(1e-5 * 32 / 256) and small.min_lr == pytest.approx(1e-6 * 32 / 256)
    given = build(TrainConfig, {"data": "clips", "recipe": "k400_b16_clip", "lr": 3e-5, "epochs": 2,
                                "model_overrides": {"use_checkpoint": True}})
    assert (given.lr, given.epochs, given.weight_decay) == (3e-5, 2, 0.05)
    assert given.model_overrides == {"no_lmhra": True, "temporal_downsample": False, "use_checkpoint": True}
    with pytest.raises(ConfigError, match="unknown recipe 'k9000'; recipes: k400_b16_clip"):
        build(TrainConfig, {"data": "clips", "recipe": "k9000"})


def test_print_config_shows_the_recipe_resolved_and_reads_back_to_the_same(tmp_path):
    runner = CliRunner()
    printed = runner.invoke(app, ["train", "--data", "clips", "--recipe", "k710_to_k400_b16", "--workers", "2",
                                  "--batch-size", "16", "--print-config"])
    assert printed.exit_code == 0, printed.output
    resolved = yaml.safe_load(printed.output)
    assert resolved["recipe"] == "k710_to_k400_b16" and resolved["lr"] == pytest.approx(2e-6 * 32 / 256)
    (tmp_path / "train.yaml").write_text(printed.output)
    again = runner.invoke(app, ["train", "--config", str(tmp_path / "train.yaml"), "--print-config"])
    assert again.exit_code == 0 and yaml.safe_load(again.output) == resolved


@pytest.mark.parametrize("name", RECIPES)
def test_a_recipe_trains_two_steps_on_the_tiny_config(name):
    cfg = build(TrainConfig, {"data": "clips@1", "recipe": name, "model": "uniformerv2_tiny", "model_overrides": {},
                              "batch_size": 2, "compile": "off", "augment": "crop"})
    trainer = tiny_trainer(cfg, StepLayout((5,), 5, 2))
    before = weights(trainer)
    batches = iter(clip_batches(2))
    for _ in range(2):
        trainer.train_step(batches)
    assert trainer.progress.global_step == 2 and any(
        not (before[k] == v).all() for k, v in weights(trainer).items())
