"""A trained model as plain files: `model.safetensors` (weights) + `model_config.json` (how to rebuild it and how
its inputs were made). Loading never unpickles anything, so a model from any store is safe to open."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import load, load_file, save_file

from model.configs import create_model
from model.uniformerv2 import UniFormerV2

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model_config.json"


@dataclass
class ModelCard:
    """What a consumer needs besides the weights: the architecture and the clip format it was trained on."""

    model: str
    num_classes: int
    overrides: dict = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    frames: int = 8
    crop_size: int = 224
    short_side: int = 256
    extra: dict = field(default_factory=dict)  # lineage: dataset, run, metrics

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        return cls(**json.loads(text))


def save_package(net: UniFormerV2, card: ModelCard, directory: str | os.PathLike) -> tuple[str, str]:
    os.makedirs(directory, exist_ok=True)
    weights = os.path.join(directory, WEIGHTS_FILE)
    config = os.path.join(directory, CONFIG_FILE)
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, weights)
    with open(config, "w", encoding="utf-8") as handle:
        handle.write(card.to_json())
    return weights, config


def load_package(
    weights: str | os.PathLike, config: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[UniFormerV2, ModelCard]:
    with open(config, encoding="utf-8") as handle:
        card = ModelCard.from_json(handle.read())
    return _build(card, load_file(os.fspath(weights), device="cpu"), device)


def load_package_bytes(
    weights: bytes, config: str, device: str | torch.device = "cpu"
) -> tuple[UniFormerV2, ModelCard]:
    """`load_package` for a package held in memory, as a Ray actor receives it: the weights file's content and the
    config's JSON."""
    return _build(ModelCard.from_json(config), load(weights), device)


def _build(
    card: ModelCard, state: dict[str, torch.Tensor], device: str | torch.device
) -> tuple[UniFormerV2, ModelCard]:
    net = create_model(card.model, card.num_classes, **card.overrides)
    net.load_state_dict(state)
    return net.to(device).eval(), card
