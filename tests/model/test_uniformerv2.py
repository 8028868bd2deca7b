"""The model's structure, options and numerics."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import model
from model.uniformerv2 import UniFormerV2


def tiny(num_classes: int = 5, **overrides) -> UniFormerV2:
    return model.create_model("uniformerv2_tiny", num_classes=num_classes, **overrides)


def clip_input(n: int = 2, frames: int = 8, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, frames, size, size)


def randomise_zero_initialised(m: torch.nn.Module, seed: int = 0) -> None:
    """Zero-initialised parts would make many wrong wirings invisible; give every tensor random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in m.state_dict().items():
            if tensor.is_floating_point():
                values = torch.randn(tensor.shape, generator=gen) * 0.2
                if "running_var" in name:
                    values = values.abs() + 0.5
                tensor.copy_(values)


@pytest.mark.parametrize("name", ["uniformerv2_b16", "uniformerv2_l14", "uniformerv2_l14_336", "uniformerv2_tiny"])
def test_every_named_config_runs_forward_and_backward_at_a_small_size(name):
    config = model.get_config(name)
    small = 2 * config.patch_size
    net = model.create_model(name, num_classes=3, input_resolution=small, t_size=4)
    logits = net(torch.randn(1, 3, 4, small, small))
    assert logits.shape == (1, 3)
    logits.sum().backward()
    assert net.head.fc.weight.grad is not None and net.conv1.weight.grad is not None


@pytest.mark.parametrize(
    "options",
    [
        dict(no_lmhra=True, temporal_downsample=False),
        dict(double_lmhra=False),
        dict(temporal_downsample=False, return_list=(0, 1, 2, 3)),
        dict(dw_reduction=2.0, backbone_drop_path_rate=0.2, drop_path_rate=0.4, mlp_dropout=(0.1, 0.3)),
        dict(frozen=True),
        dict(use_checkpoint=True, checkpoint_num=2),
    ],
    ids=lambda o: ",".join(o),
)
def test_official_options_build_and_train(options):
    net = tiny(**options)
    net.train()
    logits = net(clip_input())
    logits.sum().backward()
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()


def test_frozen_variant_freezes_the_backbone_and_heads_on_the_query_alone():
    net = tiny(frozen=True)
    assert net.balance is None
    frozen = {id(p) for p in net.backbone_parameters()}
    for name, p in net.named_parameters():
        assert p.requires_grad == (id(p) not in frozen), name
    video = clip_input()
    with torch.no_grad():
        query, _ = net.eval().forward_tokens(video)
        torch.testing.assert_close(net.forward_features(video), query)


def test_parameter_counts_match_the_paper():
    # Kinetics B/16 8x224 115 M, SSv2 B/16 16x224 163 M, Kinetics L/14 354 M (../shared/uniformerv2.md).
    kinetics = dict(t_size=8, no_lmhra=True, temporal_downsample=False)
    assert round(model.count_parameters("uniformerv2_b16", **kinetics) / 1e6) == 115
    assert round(model.count_parameters("uniformerv2_b16", 174, t_size=16, return_list=range(4, 12)) / 1e6) == 163
    assert round(model.count_parameters("uniformerv2_l14", **kinetics) / 1e6) == 354


def test_fresh_model_is_the_image_vit_on_identical_frames():
    """Zero-initialised LMHRA and centre-inflated patch weights: T copies of a frame give the image ViT's class
    token on that frame, at every frame, with and without temporal downsampling. The reference is timm's CLIP ViT."""
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=96,
        depth=4,
        num_heads=4,
        pre_norm=True,
        act_layer="quick_gelu",
        norm_layer=torch.nn.LayerNorm,  # CLIP's eps (1e-5), as timm's CLIP configs set it
    ).eval()
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(image)))
        reference = vit.blocks(x)[:, 0]
    for downsample in (True, False):
        net = tiny(temporal_downsample=downsample).eval()
        model.load_pretrained(net, vit.state_dict())
        video = image.unsqueeze(2).expand(-1, -1, 8, -1, -1)
        with torch.no_grad():
            _, frame_cls = net.forward_tokens(video)
        expected = reference.unsqueeze(1).expand_as(frame_cls)
        torch.testing.assert_close(frame_cls, expected, atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = tiny(mlp_dropout=0.0, cls_dropout=0.0)
    randomise_zero_initialised(plain)
    checkpointed = UniFormerV2(plain.config.replace(use_checkpoint=True), plain.num_classes)
    checkpointed.load_state_dict(plain.state_dict())
    video = clip_input()
    grads = []
    for net in (plain, checkpointed):
        net.train()
        net(video).square().sum().backward()
        grads.append({n: p.grad for n, p in net.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_bf16_autocast_stays_close_to_fp32():
    torch.manual_seed(0)
    net = tiny().eval()
    randomise_zero_initialised(net)
    video = clip_input()
    with torch.no_grad():
        reference = net(video)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(video)
    assert torch.isfinite(low).all()
    assert (low.float() - reference).abs().max() < 0.1 * reference.abs().max()


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    net = tiny().eval()
    randomise_zero_initialised(net)
    video = clip_input()
    compiled = torch.compile(copy.deepcopy(net))
    with torch.no_grad():
        torch.testing.assert_close(compiled(video), net(video), atol=1e-4, rtol=1e-4)


def test_frame_count_is_read_from_the_input():
    net = tiny().eval()
    with torch.no_grad():
        assert net(clip_input(frames=4)).shape == net(clip_input(frames=16)).shape == (2, 5)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.randn(2, 8, 3, 32, 32), r"expected video \[N, 3, T, H, W\]"),
        (torch.randn(2, 3, 8, 32), r"expected video"),
        (torch.randn(1, 3, 8, 48, 48), r"patch grid .* input_resolution=48"),
    ],
)
def test_bad_input_shapes_are_refused_clearly(bad, message):
    with pytest.raises(ValueError, match=message):
        tiny()(bad)


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(return_list=(2, 9)), ValueError, r"return_list"),
        (dict(return_list=(2, 3), n_layers=3), ValueError, r"n_layers=3"),
        (dict(n_dim=64), ValueError, r"n_dim=64 must equal width"),
        (dict(mlp_dropout=(0.1, 0.2, 0.3)), ValueError, r"mlp_dropout needs 2"),
        (dict(t_size=7), ValueError, r"must be even"),
        (dict(input_resolution=36), ValueError, r"not a multiple of patch"),
        (dict(no_such_option=1), TypeError, r"no_such_option"),
    ],
)
def test_invalid_configurations_are_refused(overrides, error, message):
    with pytest.raises(error, match=message):
        tiny(**overrides)


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="uniformerv2_b16"):
        model.create_model("uniformerv2_huge")
