"""Named training recipes: the hyperparameters that produced published UniFormerV2 results, one YAML file each in
jobs/recipes/ (every value commented with its source), laid under a training configuration's file and flags.

A recipe's `lr` and `min_lr` are given for `lr_batch` clips per optimizer step; a run gets them scaled linearly to its
own total batch (workers x batch_size x grad_accum), as MMAction2's `auto_scale_lr` does. A learning rate given in the
configuration file or on the command line is taken as it is.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from jobs.config import ConfigError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
_SCALED = ("lr", "min_lr")


def list_recipes() -> list[str]:
    return sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))


def recipe_values(name: str) -> dict:
    """The recipe's values as a training configuration's keys, before scaling (`lr_batch` included)."""
    path = RECIPES_DIR / f"{name}.yaml"
    if name not in list_recipes():
        raise ConfigError(f"unknown recipe {name!r}; recipes: {', '.join(list_recipes())}")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def with_recipe(values: dict, defaults: dict) -> dict:
    """`values` (a training configuration's file and flags, merged) laid over the recipe they name, if any, with the
    recipe's learning rates scaled to the run's total batch (`defaults`: the config class's, for what neither sets)."""
    name = values.get("recipe")
    if not name:
        return values
    recipe = recipe_values(name)
    lr_batch = recipe.pop("lr_batch")
    merged = {**recipe, **values}
    merged["model_overrides"] = {**recipe.get("model_overrides", {}), **values.get("model_overrides", {})}
    total = 1
    for key in ("workers", "batch_size", "grad_accum"):
        total *= merged.get(key, defaults[key])
    for key in _SCALED:
        if key not in values:
            merged[key] = float(recipe[key]) * total / lr_batch
    return merged
