"""UniFormerV2: a CLIP image ViT armed with local temporal blocks, a global cross-attention decoder and fusion.

Reads top to bottom next to ../shared/uniformerv2.md:
  video [N, 3, T, H, W] -> 3D patch embed -> per frame: class token + 2D positional embedding + ln_pre
  -> local UniBlocks (ViT layers with LMHRA) -> after each layer in `return_list`: DPE + global UniBlock that
  updates one video query (sequential multi-stage fusion) -> z = (1 - sigmoid(balance)) * query
  + sigmoid(balance) * mean_t(frame class token) -> LayerNorm -> Dropout -> Linear.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.blocks import GlobalUniBlock, LayerNorm, LocalUniBlock

# CLIP's input normalisation (RGB, on [0, 1] pixels).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The input normalisations weights are trained with, (mean, std) on [0, 1] RGB pixels: OpenAI CLIP's, and PySlowFast's
# defaults, with which the official UniFormerV2 code trains and tests every released checkpoint (no official config
# overrides them; MMAction2's UniFormerV2 configs repeat them as 114.75 / 57.375 on [0, 255]).
NORMALIZATIONS = {"clip": (CLIP_MEAN, CLIP_STD), "slowfast": ((0.45,) * 3, (0.225,) * 3)}


@dataclass(frozen=True)
class UniFormerV2Config:
    """Every option of the official implementation, under its official name."""

    # image ViT
    input_resolution: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    # video
    t_size: int = 8  # frames per clip the model is built for; the forward reads T from its input
    temporal_downsample: bool = True
    no_lmhra: bool = False
    double_lmhra: bool = True
    dw_reduction: float = 1.5
    backbone_drop_path_rate: float = 0.0
    # global UniBlocks
    return_list: tuple[int, ...] = (8, 9, 10, 11)
    n_layers: int | None = None  # must equal len(return_list); derived when None
    n_dim: int | None = None  # must equal width (the query is fused with the frame class token); derived when None
    n_head: int = 12
    mlp_factor: float = 4.0
    drop_path_rate: float = 0.0
    mlp_dropout: float | tuple[float, ...] = 0.5
    cls_dropout: float = 0.5
    frozen: bool = False
    # memory
    use_checkpoint: bool = False
    checkpoint_num: int | None = None  # checkpoint the first N local blocks; None = all of them
    # the pixels' normalisation the weights expect (NORMALIZATIONS): no option of the official constructor (its data
    # loader normalises), kept here so that every package and checkpoint carries it; packages written before it
    # existed were trained on CLIP's
    input_normalization: str = "clip"

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        set_("return_list", tuple(sorted(int(i) for i in self.return_list)))
        if isinstance(self.checkpoint_num, Sequence):  # the official code passes [n]
            set_("checkpoint_num", int(self.checkpoint_num[0]))
        if self.n_layers is None:
            set_("n_layers", len(self.return_list))
        if self.n_dim is None:
            set_("n_dim", self.width)
        if isinstance(self.mlp_dropout, (int, float)):
            set_("mlp_dropout", (float(self.mlp_dropout),) * self.n_layers)
        else:
            set_("mlp_dropout", tuple(float(p) for p in self.mlp_dropout))
        self.validate()

    def validate(self) -> None:
        if self.input_resolution % self.patch_size:
            raise ValueError(f"input_resolution {self.input_resolution} is not a multiple of patch {self.patch_size}")
        if self.n_layers != len(self.return_list):
            raise ValueError(f"n_layers={self.n_layers} but return_list has {len(self.return_list)} entries")
        if len(set(self.return_list)) != len(self.return_list) or not all(
            0 <= i < self.layers for i in self.return_list
        ):
            raise ValueError(f"return_list {self.return_list} must be distinct layer indices in [0, {self.layers})")
        if self.n_dim != self.width:
            raise ValueError(f"n_dim={self.n_dim} must equal width={self.width}: the query is fused with the ViT")
        if len(self.mlp_dropout) != self.n_layers:
            raise ValueError(f"mlp_dropout needs {self.n_layers} values, got {len(self.mlp_dropout)}")
        if self.temporal_downsample and self.t_size % 2:
            raise ValueError(f"temporal_downsample halves T: t_size={self.t_size} must be even")
        if self.input_normalization not in NORMALIZATIONS:
            raise ValueError(f"input_normalization must be one of {', '.join(NORMALIZATIONS)}, not "
                             f"{self.input_normalization!r}")

    def replace(self, **overrides) -> UniFormerV2Config:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown UniFormerV2 option(s): {sorted(unknown)}")
        derived = {}
        if "return_list" in overrides and "n_layers" not in overrides:
            derived["n_layers"] = None
            if "mlp_dropout" not in overrides:
                derived["mlp_dropout"] = self.mlp_dropout[0]
        if "width" in overrides and "n_dim" not in overrides:
            derived["n_dim"] = None
        return dataclasses.replace(self, **{**derived, **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ClassifierHead(nn.Module):
    def __init__(self, dim: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.norm(features)))


class UniFormerV2(nn.Module):
    def __init__(self, config: UniFormerV2Config, num_classes: int) -> None:
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        width, patch = config.width, config.patch_size
        if config.temporal_downsample:
            self.conv1 = nn.Conv3d(3, width, (3, patch, patch), (2, patch, patch), (1, 0, 0), bias=False)
        else:
            self.conv1 = nn.Conv3d(3, width, (1, patch, patch), (1, patch, patch), bias=False)
        scale = width**-0.5
        grid = config.input_resolution // patch
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)

        drop_paths = torch.linspace(0, config.backbone_drop_path_rate, config.layers, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            LocalUniBlock(
                width,
                config.heads,
                drop_path=drop_paths[i],
                dw_reduction=config.dw_reduction,
                no_lmhra=config.no_lmhra,
                double_lmhra=config.double_lmhra,
            )
            for i in range(config.layers)
        )

        self.temporal_cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.dpe = nn.ModuleList(
            nn.Conv3d(width, width, kernel_size=3, padding=1, groups=width) for _ in config.return_list
        )
        for conv in self.dpe:
            nn.init.zeros_(conv.bias)
        global_drop_paths = torch.linspace(0, config.drop_path_rate, config.n_layers, device="cpu").tolist()
        self.dec = nn.ModuleList(
            GlobalUniBlock(
                width,
                config.n_head,
                mlp_factor=config.mlp_factor,
                dropout=config.mlp_dropout[j],
                drop_path=global_drop_paths[j],
            )
            for j in range(config.n_layers)
        )
        self.balance = None if config.frozen else nn.Parameter(torch.zeros(width))
        self.head = ClassifierHead(width, num_classes, config.cls_dropout)
        self._stage_of_layer = {layer: stage for stage, layer in enumerate(config.return_list)}
        if config.frozen:
            for p in self.backbone_parameters():
                p.requires_grad_(False)

    def backbone_parameters(self):
        """The image ViT's own parameters (what `frozen` freezes): patch embed, embeddings, ln_pre, local blocks."""
        yield self.conv1.weight
        yield self.class_embedding
        yield self.positional_embedding
        yield from self.ln_pre.parameters()
        yield from self.blocks.parameters()

    def forward_tokens(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the video query `[N, C]` after the last global UniBlock and the last layer's per-frame class
        tokens `[N, T', C]`."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"expected video [N, 3, T, H, W], got {tuple(video.shape)}")
        x = self.conv1(video)  # [N, C, T', h, w]
        n, dim, frames, h, w = x.shape
        if h * w + 1 != self.positional_embedding.shape[0]:
            raise ValueError(
                f"input {tuple(video.shape[-2:])} gives a {h}x{w} patch grid but the positional embedding is for "
                f"{self.config.input_resolution}x{self.config.input_resolution}; resize the clips or build the model "
                f"with input_resolution={video.shape[-1]}"
            )
        x = x.permute(0, 2, 3, 4, 1).reshape(n * frames, h * w, dim)
        cls = self.class_embedding.to(x.dtype).expand(n * frames, 1, dim)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)  # [N*T', 1 + L, C]

        query = self.temporal_cls_token.to(x.dtype).expand(n, 1, dim)
        checkpointed = self._num_checkpointed_blocks()
        for i, block in enumerate(self.blocks):
            if i < checkpointed and self.training:
                x = checkpoint(block, x, frames, use_reentrant=False)
            else:
                x = block(x, frames)
            stage = self._stage_of_layer.get(i)
            if stage is not None:
                query = self.dec[stage](query, self._tokens_with_dpe(x, stage, n, frames, h, w))
        return query[:, 0], x[:, 0].reshape(n, frames, dim)

    def _num_checkpointed_blocks(self) -> int:
        if not self.config.use_checkpoint:
            return 0
        return len(self.blocks) if self.config.checkpoint_num is None else self.config.checkpoint_num

    def _tokens_with_dpe(self, x: torch.Tensor, stage: int, n: int, frames: int, h: int, w: int) -> torch.Tensor:
        """All T' * (1 + L) tokens of one clip, the patch tokens plus their dynamic positional encoding."""
        dim = x.shape[-1]
        patches = x[:, 1:].reshape(n, frames, h, w, dim)
        conv = self.dpe[stage]
        dpe = F.conv3d(patches.permute(0, 4, 1, 2, 3), conv.weight, conv.bias, padding=1, groups=dim)
        patches = patches + dpe.permute(0, 2, 3, 4, 1)
        tokens = torch.cat([x[:, :1], patches.reshape(n * frames, h * w, dim)], dim=1)
        return tokens.reshape(n, frames * (1 + h * w), dim)

    def compile_blocks(self, **compile_options) -> None:
        """Compiles each local and global block in place, so that its LayerNorms, QuickGELU and residual adds fuse
        into a few kernels. Per block rather than the whole model: one small graph compiled once serves every layer,
        activation checkpointing keeps wrapping whole blocks, and DDP wraps the model afterwards as usual. The state
        dict keys do not change."""
        for block in (*self.blocks, *self.dec):
            block.compile(**compile_options)

    def forward_features(self, video: torch.Tensor) -> torch.Tensor:
        query, frame_cls = self.forward_tokens(video)
        if self.balance is None:
            return query
        weight = torch.sigmoid(self.balance)
        return (1 - weight) * query + weight * frame_cls.mean(dim=1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(video))

    def extra_repr(self) -> str:
        grid = math.isqrt(self.positional_embedding.shape[0] - 1)
        return f"num_classes={self.num_classes}, frames={self.config.t_size}, grid={grid}x{grid}"
