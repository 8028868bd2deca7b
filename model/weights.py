"""Loading foreign checkpoints into UniFormerV2.

Each supported layout has a filter that renames keys into ours; shape adapters then inflate 2D patch weights and
interpolate positional embeddings; `load_pretrained` checks what is missing or unexpected before loading anything.
Layouts, detected from the keys:
  clip      OpenAI CLIP visual weights, bare or `visual.`-prefixed (a whole CLIP model keeps only its visual part)
  timm      timm CLIP ViT (`vit_base_patch16_clip_224`: `patch_embed.proj`, `blocks.N.attn.qkv`, ...)
  official  official UniFormerV2 release (`model_state`, keys optionally under `backbone.`)
  mmaction  MMAction2 UniFormerV2 (`state_dict`, `backbone.transformer.norm`, `cls_head.fc_cls`)
  native    this package's own `state_dict()`
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from model.uniformerv2 import UniFormerV2

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

# Keys that image-only layouts carry for CLIP's own image-text projection; UniFormerV2 has no use for them.
_UNUSED_IMAGE_KEYS = re.compile(r"^(ln_post\.|proj$|norm\.|fc_norm\.|head\.)")


@dataclass
class LoadReport:
    layout: str
    loaded: list[str] = field(default_factory=list)
    inflated: list[str] = field(default_factory=list)
    interpolated: list[str] = field(default_factory=list)
    kept_initialisation: list[str] = field(default_factory=list)
    skipped_head: bool = False


def load_state_dict_file(path: str | os.PathLike) -> Mapping:
    """Reads a checkpoint without unpickling code: safetensors, or torch files restricted to tensors/containers."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError or RuntimeError depending on the content
        raise ValueError(
            f"{path}: cannot be read as tensors only ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
            "Checkpoints holding pickled Python objects are refused; re-save the state dict alone "
            "(torch.save(ckpt['state_dict'], ...)) or as safetensors."
        ) from exc


def _unwrap(checkpoint: Mapping) -> StateDict:
    """Finds the tensor dict inside training checkpoints ({'model_state': ...}, {'state_dict': ...}, ...)."""
    for wrapper in ("model_state", "state_dict", "model", "module"):
        inner = checkpoint.get(wrapper)
        if isinstance(inner, Mapping):
            return _unwrap(inner)
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"no tensors found in checkpoint; top-level keys: {sorted(checkpoint)[:20]}")
    return tensors


def _strip_prefix(state: StateDict, prefix: str) -> StateDict:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}


def _rename(state: StateDict, rules: list[tuple[str, str]]) -> StateDict:
    out = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


_BACKBONE_RULES = [(r"^transformer\.resblocks\.", "blocks.")]
_GLOBAL_RULES = [
    (r"^transformer\.temporal_cls_token$", "temporal_cls_token"),
    (r"^transformer\.(dpe|dec)\.", r"\1."),
    (r"^transformer\.balance$", "balance"),
]


def _from_clip(state: StateDict) -> StateDict:
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    return _rename(state, _BACKBONE_RULES)


def _from_timm(state: StateDict) -> StateDict:
    out = {}
    for key, value in state.items():
        if key == "cls_token":
            out["class_embedding"] = value.reshape(-1)
        elif key == "pos_embed":
            out["positional_embedding"] = value.reshape(-1, value.shape[-1])
        elif key == "patch_embed.proj.bias":
            if value.abs().max() > 0:
                raise ValueError("timm checkpoint has a patch-embedding bias; CLIP ViTs (and UniFormerV2) have none")
        else:
            out[key] = value
    return _rename(
        out,
        [
            (r"^patch_embed\.proj\.", "conv1."),
            (r"^norm_pre\.", "ln_pre."),
            (r"\.norm1\.", ".ln_1."),
            (r"\.norm2\.", ".ln_2."),
            (r"\.attn\.qkv\.(weight|bias)$", r".attn.in_proj_\1"),
            (r"\.attn\.proj\.", ".attn.out_proj."),
            (r"\.mlp\.fc1\.", ".mlp.c_fc."),
            (r"\.mlp\.fc2\.", ".mlp.c_proj."),
        ],
    )


def _from_official(state: StateDict) -> StateDict:
    state = _strip_prefix(state, "backbone.")
    return _rename(
        state,
        _BACKBONE_RULES
        + _GLOBAL_RULES
        + [(r"^transformer\.proj\.0\.", "head.norm."), (r"^transformer\.proj\.2\.", "head.fc.")],
    )


def _from_mmaction(state: StateDict) -> StateDict:
    state = _strip_prefix(state, "backbone.")
    return _rename(
        state,
        _BACKBONE_RULES
        + _GLOBAL_RULES
        + [(r"^transformer\.norm\.", "head.norm."), (r"^cls_head\.fc_cls\.", "head.fc.")],
    )


_CONVERTERS: dict[str, Callable[[StateDict], StateDict]] = {
    "native": lambda state: state,
    "official": _from_official,
    "mmaction": _from_mmaction,
    "clip": _from_clip,
    "timm": _from_timm,
}
IMAGE_LAYOUTS = frozenset({"clip", "timm"})


def detect_layout(state: StateDict) -> str:
    keys = set(state)
    bare = {k.removeprefix("backbone.") for k in keys}
    if "conv1.weight" in keys and any(k.startswith("blocks.0.attn.in_proj_weight") for k in keys):
        return "native"
    if "cls_head.fc_cls.weight" in bare or "transformer.norm.weight" in bare:
        return "mmaction"
    video_keys = ("transformer.temporal_cls_token", "transformer.dec.0.ln_1.weight", "transformer.proj.2.weight")
    if any(k in bare for k in video_keys):
        return "official"
    if "conv1.weight" in keys or "visual.conv1.weight" in keys:
        return "clip"
    if "patch_embed.proj.weight" in keys and "blocks.0.attn.qkv.weight" in keys:
        return "timm"
    sample = ", ".join(sorted(keys)[:12])
    raise ValueError(
        "checkpoint fits no known layout (OpenAI CLIP visual, timm CLIP ViT, official UniFormerV2, MMAction2 "
        f"UniFormerV2, native); first keys: {sample}"
    )


def inflate_patch_weight(weight_2d: torch.Tensor, time_kernel: int) -> torch.Tensor:
    """[C, 3, p, p] -> [C, 3, k, p, p] with the 2D kernel at the centre time index and zeros elsewhere, so that a
    clip of identical frames embeds exactly like the image."""
    weight_3d = weight_2d.new_zeros(weight_2d.shape[:2] + (time_kernel,) + weight_2d.shape[2:])
    weight_3d[:, :, time_kernel // 2] = weight_2d
    return weight_3d


def interpolate_positional_embedding(pos: torch.Tensor, rows: int) -> torch.Tensor:
    """Resizes a `[1 + g*g, C]` ViT positional embedding to `rows = 1 + G*G` (bicubic on the grid, class row kept)."""
    src, dst = math.isqrt(pos.shape[0] - 1), math.isqrt(rows - 1)
    if src * src + 1 != pos.shape[0] or dst * dst + 1 != rows:
        raise ValueError(f"positional embedding rows {pos.shape[0]} -> {rows} are not 1 + square grids")
    grid = pos[1:].reshape(1, src, src, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(dst * dst, -1).to(pos.dtype)
    return torch.cat([pos[:1], grid], dim=0)


def _adapt_shapes(state: StateDict, target: StateDict, report: LoadReport) -> StateDict:
    out = dict(state)
    conv = out.get("conv1.weight")
    want = target["conv1.weight"].shape
    if conv is not None and conv.ndim == 4 and conv.shape[-2:] == want[-2:]:
        out["conv1.weight"] = inflate_patch_weight(conv, want[2])
        report.inflated.append("conv1.weight")
    pos = out.get("positional_embedding")
    rows = target["positional_embedding"].shape[0]
    if pos is not None and pos.ndim == 2 and pos.shape[0] != rows:
        out["positional_embedding"] = interpolate_positional_embedding(pos, rows)
        report.interpolated.append("positional_embedding")
    return out


def _backbone_keys(target: StateDict) -> set[str]:
    image_vit = re.compile(r"^(conv1\.|class_embedding$|positional_embedding$|ln_pre\.|blocks\.\d+\.(attn|ln_1|mlp|ln_2)\.)")
    return {k for k in target if image_vit.match(k)}


def _describe(keys: set[str], limit: int = 15) -> str:
    listed = sorted(keys)
    more = f" (+{len(listed) - limit} more)" if len(listed) > limit else ""
    return ", ".join(listed[:limit]) + more


def load_pretrained(model: UniFormerV2, source: str | os.PathLike | Mapping) -> LoadReport:
    """Loads `source` (a path or a state dict in any supported layout) into `model`, in place.

    Image-ViT layouts fill the ViT and leave the video parts at their identity-preserving initialisation; video
    layouts must cover the whole model. A classifier head of another class count is skipped (fine-tuning to new
    classes), and reported. Anything missing, unexpected or of the wrong shape raises before the model is touched.
    """
    raw = load_state_dict_file(source) if isinstance(source, (str, os.PathLike)) else source
    state = _unwrap(raw)
    layout = detect_layout(state)
    report = LoadReport(layout=layout)
    target = model.state_dict()
    state = _adapt_shapes(_CONVERTERS[layout](state), target, report)

    if layout in IMAGE_LAYOUTS:
        state = {k: v for k, v in state.items() if not _UNUSED_IMAGE_KEYS.match(k)}
        required = _backbone_keys(target)
    else:
        required = set(target)
    # BatchNorm's step counter is bookkeeping, absent from some exports.
    required = {k for k in required if not k.endswith("num_batches_tracked")}

    head = {"head.fc.weight", "head.fc.bias"}
    if layout not in IMAGE_LAYOUTS and head <= set(state) and state["head.fc.weight"].shape != target["head.fc.weight"].shape:
        log.info("skipping classifier head: checkpoint has %d classes, model %d",
                 state["head.fc.weight"].shape[0], target["head.fc.weight"].shape[0])
        state = {k: v for k, v in state.items() if k not in head}
        required -= head
        report.skipped_head = True

    missing = required - set(state)
    unexpected = set(state) - set(target)
    wrong_shape = {
        f"{k} {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
        for k in set(state) & set(target)
        if state[k].shape != target[k].shape
    }
    problems = []
    if missing:
        problems.append(f"missing keys: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_describe(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatches: {_describe(wrong_shape)}")
    if problems:
        raise ValueError(f"checkpoint detected as '{layout}' layout does not fit the model: " + "; ".join(problems))

    model.load_state_dict(state, strict=False)
    report.loaded = sorted(state)
    report.kept_initialisation = sorted(set(target) - set(state))
    return report
