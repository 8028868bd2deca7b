"""Named UniFormerV2 configurations: small factories over one config class, registered by name (timm style)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from model.uniformerv2 import UniFormerV2, UniFormerV2Config

_REGISTRY: dict[str, Callable[[], UniFormerV2Config]] = {}


def register(factory: Callable[[], UniFormerV2Config]) -> Callable[[], UniFormerV2Config]:
    _REGISTRY[factory.__name__] = factory
    return factory


@register
def uniformerv2_b16() -> UniFormerV2Config:
    """CLIP ViT-B/16 at 224; global blocks on the last 4 layers (the official factory's defaults)."""
    return UniFormerV2Config(
        input_resolution=224, patch_size=16, width=768, layers=12, heads=12, return_list=(8, 9, 10, 11), n_head=12
    )


@register
def uniformerv2_l14() -> UniFormerV2Config:
    """CLIP ViT-L/14 at 224; global blocks on the last 4 of 24 layers."""
    return UniFormerV2Config(
        input_resolution=224, patch_size=14, width=1024, layers=24, heads=16, return_list=(20, 21, 22, 23), n_head=16
    )


@register
def uniformerv2_l14_336() -> UniFormerV2Config:
    """CLIP ViT-L/14@336."""
    return UniFormerV2Config(
        input_resolution=336, patch_size=14, width=1024, layers=24, heads=16, return_list=(20, 21, 22, 23), n_head=16
    )


@register
def uniformerv2_tiny() -> UniFormerV2Config:
    """A sub-million-parameter model with every UniFormerV2 part, for CPU demos and tests on 32 px clips."""
    return UniFormerV2Config(
        input_resolution=32,
        patch_size=8,
        width=96,
        layers=4,
        heads=4,
        return_list=(2, 3),
        n_head=4,
        mlp_dropout=0.0,
        cls_dropout=0.0,
    )


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_config(name: str, **overrides) -> UniFormerV2Config:
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    config = _REGISTRY[name]()
    return config.replace(**overrides) if overrides else config


def create_model(name: str, num_classes: int = 400, **overrides) -> UniFormerV2:
    """Builds a randomly initialised named model; load weights with `model.load_pretrained`."""
    return UniFormerV2(get_config(name, **overrides), num_classes)


def count_parameters(name: str, num_classes: int = 400, **overrides) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in create_model(name, num_classes, **overrides).parameters())
