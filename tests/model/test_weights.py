"""Checkpoint layouts: each foreign layout round-trips to the same logits; bad checkpoints fail before loading."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

import model
from model.uniformerv2 import UniFormerV2

from tests.model.test_uniformerv2 import clip_input, randomise_zero_initialised, tiny

# Our names -> the official release's names, written out independently of model/weights.py.
_OFFICIAL_NAMES = [
    (r"^blocks\.", "transformer.resblocks."),
    (r"^(temporal_cls_token|balance)$", r"transformer.\1"),
    (r"^(dpe|dec)\.", r"transformer.\1."),
    (r"^head\.norm\.", "transformer.proj.0."),
    (r"^head\.fc\.", "transformer.proj.2."),
]
_MMACTION_HEAD = [(r"^head\.norm\.", "transformer.norm."), (r"^head\.fc\.", "cls_head.fc_cls.")]
_IMAGE_VIT = re.compile(r"^(conv1\.|class_embedding$|positional_embedding$|ln_pre\.|blocks\.\d+\.(attn|ln_1|mlp|ln_2)\.)")


def renamed(state, rules):
    out = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        out[key] = value.clone()
    return out


def official_checkpoint(source: UniFormerV2, prefix: str = "backbone.") -> dict:
    state = renamed(source.state_dict(), _OFFICIAL_NAMES)
    return {"model_state": {prefix + k: v for k, v in state.items()}}


def mmaction_checkpoint(source: UniFormerV2) -> dict:
    state = renamed(source.state_dict(), _MMACTION_HEAD + _OFFICIAL_NAMES)
    return {"meta": {"epoch": torch.tensor(3)}, "state_dict": {
        (k if k.startswith("cls_head.") else "backbone." + k): v for k, v in state.items()
    }}


def clip_visual_state(source: UniFormerV2) -> dict:
    """OpenAI CLIP's visual tower: 2D patch conv, resblocks, plus the ln_post/proj that UniFormerV2 ignores."""
    state = {k: v for k, v in source.state_dict().items() if _IMAGE_VIT.match(k)}
    state = renamed(state, [(r"^blocks\.", "transformer.resblocks.")])
    state["conv1.weight"] = state["conv1.weight"][:, :, 1]  # what inflation puts back at the centre
    width = state["class_embedding"].shape[0]
    state.update({"ln_post.weight": torch.ones(width), "ln_post.bias": torch.zeros(width), "proj": torch.randn(width, 16)})
    return state


def timm_state(source: UniFormerV2) -> dict:
    clip = clip_visual_state(source)
    out = {}
    for key, value in clip.items():
        if key == "class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)
        elif key == "positional_embedding":
            out["pos_embed"] = value.unsqueeze(0)
        elif key == "proj":
            out["head.weight"] = value.t()
        else:
            out[key] = value
    return renamed(out, [
        (r"^conv1\.", "patch_embed.proj."), (r"^ln_pre\.", "norm_pre."), (r"^ln_post\.", "norm."),
        (r"^transformer\.resblocks\.", "blocks."), (r"\.ln_1\.", ".norm1."), (r"\.ln_2\.", ".norm2."),
        (r"\.attn\.in_proj_(weight|bias)$", r".attn.qkv.\1"), (r"\.attn\.out_proj\.", ".attn.proj."),
        (r"\.mlp\.c_fc\.", ".mlp.fc1."), (r"\.mlp\.c_proj\.", ".mlp.fc2."),
    ])


@pytest.fixture
def source() -> UniFormerV2:
    torch.manual_seed(1)
    net = tiny().eval()
    randomise_zero_initialised(net, seed=1)
    return net


def logits(net: UniFormerV2, video: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net.eval()(video)


@pytest.mark.parametrize(
    "layout, build",
    [
        ("official", official_checkpoint),
        ("official", lambda s: official_checkpoint(s, prefix="")),
        ("mmaction", mmaction_checkpoint),
        ("native", lambda s: s.state_dict()),
    ],
)
def test_video_layouts_round_trip_to_the_same_logits(source, layout, build):
    target = tiny()
    report = model.load_pretrained(target, build(source))
    assert report.layout == layout and not report.kept_initialisation
    video = clip_input()
    torch.testing.assert_close(logits(target, video), logits(source, video), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout, build", [("clip", clip_visual_state), ("timm", timm_state)])
def test_image_layouts_fill_the_vit_and_keep_the_video_initialisation(source, layout, build):
    torch.manual_seed(7)
    target = tiny()
    expected = UniFormerV2(target.config, target.num_classes)
    expected.load_state_dict(target.state_dict())
    with torch.no_grad():
        for name, tensor in expected.state_dict().items():
            if _IMAGE_VIT.match(name):
                tensor.copy_(source.state_dict()[name])
    # the inflated kernel holds the 2D weights at the centre and zeros elsewhere
    expected.conv1.weight.data[:, :, [0, 2]] = 0

    report = model.load_pretrained(target, build(source))
    assert report.layout == layout and report.inflated == ["conv1.weight"]
    assert any(k.startswith("blocks.0.lmhra1.") for k in report.kept_initialisation)
    video = clip_input()
    torch.testing.assert_close(logits(target, video), logits(expected, video), atol=1e-5, rtol=1e-5)


def test_whole_clip_model_keeps_only_its_visual_tower(source):
    clip = {"visual." + k: v for k, v in clip_visual_state(source).items()}
    clip.update({"transformer.resblocks.0.attn.in_proj_weight": torch.randn(3 * 32, 32), "token_embedding.weight": torch.randn(10, 32)})
    target = tiny()
    assert model.load_pretrained(target, clip).layout == "clip"
    torch.testing.assert_close(target.blocks[1].mlp.c_fc.weight, source.blocks[1].mlp.c_fc.weight)


def test_positional_embedding_is_interpolated_to_another_resolution(source):
    target = tiny(input_resolution=48)
    report = model.load_pretrained(target, clip_visual_state(source))
    assert report.interpolated == ["positional_embedding"]
    assert target.positional_embedding.shape == (37, 96)
    torch.testing.assert_close(target.positional_embedding[0], source.positional_embedding[0])
    assert target(torch.randn(1, 3, 8, 48, 48)).shape == (1, 5)


def test_head_of_another_class_count_is_skipped_and_reported(source):
    target = tiny(num_classes=9)
    head_before = target.head.fc.weight.clone()
    report = model.load_pretrained(target, official_checkpoint(source))
    assert report.skipped_head
    torch.testing.assert_close(target.head.fc.weight, head_before)
    torch.testing.assert_close(target.balance, source.balance)


@pytest.mark.parametrize("suffix", [".pth", ".pyth", ".safetensors"])
def test_files_load_in_each_format(tmp_path, source, suffix):
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    else:
        torch.save(official_checkpoint(source), path)
    target = tiny()
    model.load_pretrained(target, path)
    video = clip_input()
    torch.testing.assert_close(logits(target, video), logits(source, video), atol=1e-5, rtol=1e-5)


class _NotATensor:
    pass


def test_pickled_objects_are_refused(tmp_path, source):
    path = tmp_path / "pickled.pth"
    torch.save({"model_state": source.state_dict(), "cfg": _NotATensor()}, path)
    with pytest.raises(ValueError, match="tensors only"):
        model.load_pretrained(tiny(), path)


def test_missing_keys_are_named_and_nothing_is_loaded(source):
    state = official_checkpoint(source)
    del state["model_state"]["backbone.transformer.dec.1.ln_3.weight"]
    target = tiny()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"missing keys: dec\.1\.ln_3\.weight"):
        model.load_pretrained(target, state)
    for key, value in target.state_dict().items():
        torch.testing.assert_close(value, before[key])


def test_unexpected_keys_and_wrong_shapes_are_named(source):
    state = official_checkpoint(source)
    state["model_state"]["backbone.transformer.surprise"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected keys: transformer\.surprise"):
        model.load_pretrained(tiny(), state)
    with pytest.raises(ValueError, match=r"shape mismatches: .*blocks\.0\.attn\.in_proj_weight \(288, 96\) vs model \(192, 64\)"):
        model.load_pretrained(model.create_model("uniformerv2_tiny", 5, width=64, heads=4, n_head=4), source.state_dict())


def test_unknown_layout_names_what_it_found():
    state = {f"encoder.layer.{i}.weight": torch.zeros(2) for i in range(3)} | {"decoder.out.bias": torch.zeros(2)}
    with pytest.raises(ValueError, match="fits no known layout") as refused:
        model.load_pretrained(tiny(), state)
    assert "4 tensors, first keys: decoder.out.bias, encoder.layer.0.weight" in str(refused.value)
    assert "encoder.layer.* (3), decoder.out (1)" in str(refused.value)


def test_check_pretrained_reports_without_touching_the_model_even_on_meta(source):
    with torch.device("meta"):
        on_meta = model.create_model("uniformerv2_tiny", num_classes=9)
    report = model.check_pretrained(on_meta, official_checkpoint(source))
    assert report.skipped_head and not report.inflated
    assert report.kept_initialisation == ["head.fc.bias", "head.fc.weight"]
    assert all(t.is_meta for t in on_meta.state_dict().values())

    target = tiny()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    checked = model.check_pretrained(target, clip_visual_state(source))
    assert checked == model.load_pretrained(tiny(), clip_visual_state(source))
    for key, value in target.state_dict().items():
        torch.testing.assert_close(value, before[key])


@pytest.mark.parametrize(
    "build, implied",
    [
        (clip_visual_state, dict(width=96, patch_size=8, layers=4, input_resolution=32)),
        (official_checkpoint, dict(width=96, patch_size=8, layers=4, input_resolution=32, temporal_downsample=True,
                                   no_lmhra=False, num_classes=5)),
    ],
)
def test_checkpoint_names_the_architecture_its_tensors_imply(source, build, implied):
    assert model.read_checkpoint(build(source)).architecture() == implied


def test_load_report_summary_says_what_came_from_the_file(source):
    clip = {"visual." + k: v for k, v in clip_visual_state(source).items()} | {"logit_scale": torch.tensor(1.0)}
    summary = model.load_pretrained(tiny(), clip).summary()
    assert "inflated      conv1.weight" in summary
    assert re.search(r"initialised   \d+ tensors the file does not hold: .*blocks\.\*\.lmhra1 \(", summary)
    assert "ignored       4 tensors of the file: ln_post (2), logit_scale (1), proj (1)" in summary
