"""Weights as users download them: OpenAI's TorchScript archives (read without running them), Hugging Face CLIP and
open_clip checkpoints load with the same logits as the same weights in CLIP's own layout."""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import model
from model.uniformerv2 import UniFormerV2

from tests.model.test_uniformerv2 import clip_input, tiny
from tests.model.test_weights import clip_visual_state, logits, renamed, source  # noqa: F401 (source: a fixture)


class _ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), c_proj=nn.Linear(4 * width, width)))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(*[_ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class _VisionTransformer(nn.Module):
    """OpenAI CLIP's `VisionTransformer`: its attribute names and shapes are the archive's `visual.*` keys."""

    def __init__(self, resolution: int, patch: int, width: int, layers: int, heads: int, embed_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn((resolution // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = _Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, embed_dim))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.conv1(image).flatten(2).permute(0, 2, 1)  # [N, L, C]
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x).permute(1, 0, 2)).permute(1, 0, 2)  # sequence-first, as CLIP
        return self.ln_post(x[:, 0]) @ self.proj


class _CLIP(nn.Module):
    """A whole CLIP: the visual tower, a text tower's own tensors, and the scalars OpenAI's archives carry."""

    def __init__(self, visual: _VisionTransformer, width: int) -> None:
        super().__init__()
        self.visual = visual
        self.token_embedding = nn.Embedding(10, width)
        self.positional_embedding = nn.Parameter(torch.randn(7, width))  # the text tower's: same name, other shape
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, visual.proj.shape[1]))
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))
        self.register_buffer("input_resolution", torch.tensor(32))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)


def openai_archive(path: os.PathLike, visual_state: dict | None, config_name: str = "uniformerv2_tiny") -> dict:
    """Traces and saves a CLIP of a configuration's ViT as OpenAI ships theirs (a TorchScript archive of fp16
    weights), with `visual_state`'s weights or random ones; returns the same weights as a plain state dict."""
    config = model.get_config(config_name)
    embed_dim = visual_state["proj"].shape[1] if visual_state else 512
    visual = _VisionTransformer(config.input_resolution, config.patch_size, config.width, config.layers,
                                config.heads, embed_dim=embed_dim)
    if visual_state:
        visual.load_state_dict(visual_state)  # strict: every name and shape is OpenAI's
    clip = _CLIP(visual, config.width).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, and still how these files exist
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # MultiheadAttention's shape checks, traced once
        traced = torch.jit.trace(clip, torch.randn(1, 3, config.input_resolution, config.input_resolution))
        torch.jit.save(traced.half(), os.fspath(path))
    return clip.half().state_dict()


def seeded_tiny() -> UniFormerV2:
    """The same initialisation for the video parts an image checkpoint leaves alone, in every model built here."""
    torch.manual_seed(7)
    return tiny()


def assert_same_logits(a: UniFormerV2, b: UniFormerV2) -> None:
    video = clip_input()
    torch.testing.assert_close(logits(a, video), logits(b, video), atol=1e-5, rtol=1e-5)


def test_openai_torchscript_archive_loads_like_its_state_dict_without_running_it(tmp_path, source, monkeypatch):
    path = tmp_path / "ViT-B-16.pt"
    state = openai_archive(path, clip_visual_state(source))

    def refuse(*args, **kwargs):
        raise AssertionError("the archive's code was loaded")

    monkeypatch.setattr(torch.jit, "load", refuse)
    monkeypatch.setattr(torch._C, "import_ir_module", refuse)
    from_archive, from_state = seeded_tiny(), seeded_tiny()
    report = model.load_pretrained(from_archive, path)
    model.load_pretrained(from_state, state)

    assert report.layout == "clip" and report.inflated == ["conv1.weight"]
    text_tower_and_projection = {"token_embedding.weight", "logit_scale", "input_resolution", "ln_post.weight", "proj"}
    assert text_tower_and_projection <= set(report.ignored)
    assert_same_logits(from_archive, from_state)


class _RunsACommand:
    """The classic pickle payload: unpickling it calls os.system."""

    def __init__(self, marker: os.PathLike) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_code_in_a_torchscript_archive_pickle_is_not_run(tmp_path):
    marker, path = tmp_path / "it-ran", tmp_path / "crafted.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("crafted/data.pkl", pickle.dumps(_RunsACommand(marker), protocol=2))
        archive.writestr("crafted/code/__torch__.py", "")
        archive.writestr("crafted/constants.pkl", pickle.dumps((), protocol=2))
    with pytest.raises(ValueError, match="no tensors found"):
        model.load_pretrained(tiny(), path)
    assert not marker.exists()


def test_a_truncated_torchscript_storage_is_refused(tmp_path, source):
    path = tmp_path / "ViT-B-16.pt"
    openai_archive(path, clip_visual_state(source))
    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    shortened = next(name for name in entries if name.endswith("/data/0"))
    entries[shortened] = entries[shortened][:2]
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    with pytest.raises(ValueError, match="TorchScript archive whose tensors cannot be read"):
        model.load_pretrained(tiny(), path)


# CLIP's visual names -> transformers' CLIPVisionModel names, written out independently of model/weights.py.
_HF_NAMES = [
    (r"^conv1\.", "embeddings.patch_embedding."),
    (r"^class_embedding$", "embeddings.class_embedding"),
    (r"^positional_embedding$", "embeddings.position_embedding.weight"),
    (r"^ln_pre\.", "pre_layrnorm."),
    (r"^ln_post\.", "post_layernorm."),
    (r"^transformer\.resblocks\.", "encoder.layers."),
    (r"\.attn\.out_proj\.", ".self_attn.out_proj."),
    (r"\.ln_1\.", ".layer_norm1."),
    (r"\.ln_2\.", ".layer_norm2."),
    (r"\.mlp\.c_fc\.", ".mlp.fc1."),
    (r"\.mlp\.c_proj\.", ".mlp.fc2."),
]


def hf_state(source: UniFormerV2, whole_model: bool) -> dict:
    """A transformers CLIPVisionModel (or, with `whole_model`, CLIPModel) state dict of the same weights."""
    clip = clip_visual_state(source)
    proj = clip.pop("proj")
    for key in [k for k in clip if ".attn.in_proj_" in k]:
        block, kind = key.split(".attn.in_proj_")
        for name, part in zip("qkv", clip.pop(key).chunk(3)):
            clip[f"{block}.self_attn.{name}_proj.{kind}"] = part
    state = {"vision_model." + k: v for k, v in renamed(clip, _HF_NAMES).items()}
    rows = clip["positional_embedding"].shape[0]
    state["vision_model.embeddings.position_ids"] = torch.arange(rows)[None]
    if whole_model:
        state.update({
            "visual_projection.weight": proj.t().contiguous(),
            "text_model.embeddings.token_embedding.weight": torch.randn(10, 32),
            "text_model.encoder.layers.0.self_attn.q_proj.weight": torch.randn(32, 32),
            "text_model.final_layer_norm.weight": torch.ones(32),
            "text_projection.weight": torch.randn(16, 32),
            "logit_scale": torch.tensor(2.6592),
        })
    return state


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
@pytest.mark.parametrize("whole_model", [True, False], ids=["CLIPModel", "CLIPVisionModel"])
def test_hugging_face_clip_checkpoints_load_with_equal_logits(tmp_path, source, suffix, whole_model):
    path = tmp_path / f"model{suffix}"
    state = hf_state(source, whole_model)
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    from_hf, from_clip = seeded_tiny(), seeded_tiny()
    report = model.load_pretrained(from_hf, path)
    model.load_pretrained(from_clip, clip_visual_state(source))

    assert report.layout == "hf" and report.inflated == ["conv1.weight"]
    assert "embeddings.position_ids" in report.ignored
    assert ("text_model.final_layer_norm.weight" in report.ignored) == whole_model
    assert_same_logits(from_hf, from_clip)


def test_open_clip_training_checkpoint_loads_with_equal_logits(tmp_path, source):
    """open_clip saves its training state with the model under DistributedDataParallel's `module.` prefix."""
    state = {"visual." + k: v for k, v in clip_visual_state(source).items()}
    state.update({
        "token_embedding.weight": torch.randn(10, 32),
        "positional_embedding": torch.randn(7, 32),  # the text tower's
        "transformer.resblocks.0.attn.in_proj_weight": torch.randn(96, 32),
        "logit_scale": torch.tensor(4.6052),
    })
    path = tmp_path / "epoch_32.pt"
    torch.save({"epoch": 32, "name": "ViT-B-16", "state_dict": {"module." + k: v for k, v in state.items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]}}, path)
    from_open_clip, from_clip = seeded_tiny(), seeded_tiny()
    report = model.load_pretrained(from_open_clip, path)
    model.load_pretrained(from_clip, clip_visual_state(source))

    assert report.layout == "clip" and "transformer.resblocks.0.attn.in_proj_weight" in report.ignored
    assert_same_logits(from_open_clip, from_clip)


def test_open_clip_timm_trunk_is_named_as_unsupported():
    state = {"visual.trunk.patch_embed.proj.weight": torch.zeros(1), "visual.head.proj.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=re.escape("timm trunk (visual.trunk.*) is not supported")):
        model.load_pretrained(tiny(), state)
