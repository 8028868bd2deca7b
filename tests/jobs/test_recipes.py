"""Named recipes: each resolves through the CLI's configuration layers, cites a source for every value, scales its
learning rates with the run's total batch, yields to what the user gives, and trains on the tiny config."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from jobs.cli import app
from jobs.config import ConfigError, build
from jobs.exitcodes import OptionError
from jobs.train import check_flip_pairs
from jobs.training.config import TrainConfig
from jobs.training.data import StepLayout
from jobs.training.recipes import RECIPES_DIR, list_recipes, recipe_values
from model.configs import count_parameters, get_config
from tests.jobs.test_train_step import clip_batches, tiny_trainer, weights

RECIPES = list_recipes()
KINETICS = ["k400_b16_clip", "k700_b16_clip", "k710_to_k400_b16", "k710_to_k400_l14"]
# what the tiny model (4 layers) needs in place of a recipe's own global-block layers
TINY_LAYERS = {"ssv2_b16_f16": {"return_list": [2, 3]}}


def test_the_shipped_recipes_are_the_papers_routes():
    assert RECIPES == ["k400_b16_clip", "k700_b16_clip", "k710_to_k400_b16", "k710_to_k400_l14", "ssv2_b16_f16"]


@pytest.mark.parametrize("name", RECIPES)
def test_a_recipe_cites_a_source_for_every_value_and_builds(name):
    lines = (RECIPES_DIR / f"{name}.yaml").read_text().splitlines()
    values = [line for line in lines if line.strip() and not line.lstrip().startswith("#")
              and not line.rstrip().endswith(":")]  # `key: value` lines, not section heads
    assert values and all("#" in line for line in values), [line for line in values if "#" not in line]
    cfg = build(TrainConfig, {"data": "clips", "recipe": name, "workers": 8, "batch_size": 32})
    recipe = recipe_values(name)
    assert cfg.lr == pytest.approx(recipe["lr"]) and cfg.min_lr == pytest.approx(recipe["min_lr"])  # 256 clips
    assert cfg.input_normalization == "slowfast"


@pytest.mark.parametrize("name", KINETICS)
def test_a_kinetics_recipe_adds_only_global_blocks_and_flips(name):
    cfg = build(TrainConfig, {"data": "clips", "recipe": name})
    assert cfg.model_overrides == {"no_lmhra": True, "temporal_downsample": False} and cfg.hflip


def test_the_l14_recipe_builds_the_l14_model_of_the_paper():
    cfg = build(TrainConfig, {"data": "clips", "recipe": "k710_to_k400_l14"})
    model = get_config(cfg.model, **cfg.model_overrides)
    assert cfg.model == "uniformerv2_l14" and (model.width, model.layers, model.patch_size) == (1024, 24, 14)
    assert model.return_list == (20, 21, 22, 23)
    assert round(count_parameters(cfg.model, 400, **cfg.model_overrides) / 1e6) == 354  # uniformerv2.md: 354 M


def test_the_ssv2_recipe_builds_the_official_ssv2_model_and_does_not_flip_plainly(tmp_path):
    cfg = build(TrainConfig, {"data": "clips", "recipe": "ssv2_b16_f16"})
    model = get_config(cfg.model, t_size=16, **cfg.model_overrides)
    assert not model.no_lmhra and model.double_lmhra and model.temporal_downsample
    assert model.return_list == tuple(range(4, 12)) and model.mlp_dropout == (0.5,) * 8
    assert (model.backbone_drop_path_rate, model.drop_path_rate) == (0.2, 0.4)
    assert round(count_parameters(cfg.model, 174, t_size=16, **cfg.model_overrides) / 1e6) == 163  # uniformerv2.md
    assert cfg.hflip is False and cfg.flip_pairs is None and cfg.grad_clip == 0.0
    # flips come back only with mirrored labels: --flip-pairs needs --hflip, which then wins over the recipe
    (tmp_path / "pairs.csv").write_text("pushing left to right,pushing right to left\n")
    classes = ["pushing left to right", "pushing right to left", "lifting"]
    pairs = build(TrainConfig, {"data": "clips", "recipe": "ssv2_b16_f16", "flip_pairs": str(tmp_path / "pairs.csv")})
    with pytest.raises(OptionError, match="needs --hflip"):
        check_flip_pairs(pairs, classes)
    flipped = build(TrainConfig, {"data": "clips", "recipe": "ssv2_b16_f16", "hflip": True,
                                  "flip_pairs": str(tmp_path / "pairs.csv")})
    assert flipped.hflip and check_flip_pairs(flipped, classes) is None


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
    cfg = build(TrainConfig, {"data": "clips@1", "recipe": name, "model": "uniformerv2_tiny",
                              "model_overrides": TINY_LAYERS.get(name, {}), "batch_size": 2, "compile": "off",
                              "augment": "crop"})
    trainer = tiny_trainer(cfg, StepLayout((5,), 5, 2))
    before = weights(trainer)
    batches = iter(clip_batches(2))
    for _ in range(2):
        trainer.train_step(batches)
    assert trainer.progress.global_step == 2 and any(
        not (before[k] == v).all() for k, v in weights(trainer).items())
