"""Building blocks of UniFormerV2: the CLIP ViT pieces, the local UniBlock (LMHRA) and the global UniBlock.

Tokens are batch-first: a clip of N videos and T frames is processed as `[N*T, 1 + L, C]` frames of one class token
and L = h*w patch tokens. Parameter names follow OpenAI CLIP / the official UniFormerV2 release (`in_proj_weight`,
`ln_1`, `mlp.c_fc`, `lmhra1.pos_embed.{0..3}`, ...) so that foreign checkpoints map onto them with few renames.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype, as CLIP does, so that fp16/bf16 stay stable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        return super().forward(x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    """The GELU approximation CLIP was trained with; swapping in exact GELU changes the pretrained function."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class DropPath(nn.Module):
    """Stochastic depth per sample (dimension 0 of the residual branch)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    """CLIP's MLP: Linear -> QuickGELU -> (dropout) -> Linear."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden)
        self.gelu = QuickGELU()
        self.dropout = nn.Dropout(dropout)
        self.c_proj = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.dropout(self.gelu(self.c_fc(x))))


class Attention(nn.Module):
    """Multi-head attention with `nn.MultiheadAttention`'s parameters, computed by `scaled_dot_product_attention`.

    Self-attention when `context` is None; otherwise queries come from `x` and keys/values from `context`
    (the global UniBlock's cross-attention), using the query / key-value slices of the same packed projection.

    Cross-attention never projects the context. Scores are q_h . (W_k,h c + b_k,h) = (W_k,h^T q_h) . c + const, and
    the constant drops out of the softmax; the output is sum_i a_i (W_v,h c_i + b_v,h) = W_v,h (sum_i a_i c_i) + b_v,h.
    So each head attends over the raw context with its query mapped back to the model width. For the global blocks'
    single query over every token of a clip this costs heads*width per token instead of 2*width^2 (64x fewer FLOPs
    for B/16); the result is the same up to float rounding.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is not None:
            return self.out_proj(self._cross_attention(x, context))
        batch, length, dim = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, length, head_dim]
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))

    def _cross_attention(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        _, w_k, w_v = self.in_proj_weight.view(3, heads, head_dim, dim).unbind(0)
        b_v = self.in_proj_bias[2 * dim :].view(heads, head_dim)
        q = F.linear(x, self.in_proj_weight[:dim], self.in_proj_bias[:dim]).view(batch, length, heads, head_dim)
        # each head's query in the context's width, scaled as SDPA would scale q . k
        query = torch.einsum("blhe,hed->bhld", q, w_k) * head_dim**-0.5
        weights = torch.softmax(query.reshape(batch, heads * length, dim) @ context.transpose(1, 2), dim=-1)
        pooled = (weights @ context).view(batch, heads, length, dim)
        out = torch.einsum("bhld,hed->blhe", pooled, w_v) + b_v
        return out.reshape(batch, length, dim)


class LocalMHRA(nn.Module):
    """Local temporal relation aggregation: BN -> 1x1x1 reduce -> depthwise temporal conv -> 1x1x1 expand.

    Parameters live in Conv3d/BatchNorm3d modules (the released checkpoints' layout); the forward runs on
    channels-last patch tokens `[N, T, h, w, C]`, where the 1x1x1 convs are plain matrix products and the temporal
    depthwise conv is a sum of shifted frames. The expand conv is zero-initialised so the block starts as identity.
    """

    def __init__(self, dim: int, dw_reduction: float = 1.5, kernel_size: int = 3) -> None:
        super().__init__()
        reduced = int(dim // dw_reduction)
        self.pos_embed = nn.Sequential(
            nn.BatchNorm3d(dim),
            nn.Conv3d(dim, reduced, kernel_size=1),
            nn.Conv3d(reduced, reduced, (kernel_size, 1, 1), padding=(kernel_size // 2, 0, 0), groups=reduced),
            nn.Conv3d(reduced, dim, kernel_size=1),
        )
        nn.init.zeros_(self.pos_embed[3].weight)
        nn.init.zeros_(self.pos_embed[3].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm, reduce, temporal, expand = self.pos_embed
        x = norm(x.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)
        x = F.linear(x, reduce.weight.flatten(1), reduce.bias)
        x = temporal_depthwise_conv(x, temporal.weight, temporal.bias)
        return F.linear(x, expand.weight.flatten(1), expand.bias)


def temporal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Depthwise conv along T of channels-last `[N, T, h, w, C]` with a Conv3d weight `[C, 1, k, 1, 1]`."""
    kernel = weight.shape[2]
    frames = x.shape[1]
    pad = kernel // 2
    padded = F.pad(x, (0, 0, 0, 0, 0, 0, pad, pad))
    taps = weight.view(weight.shape[0], kernel).t()  # [k, C]
    out = padded[:, 0:frames] * taps[0]
    for k in range(1, kernel):
        out = out + padded[:, k : k + frames] * taps[k]
    return out if bias is None else out + bias


class LocalUniBlock(nn.Module):
    """A CLIP ViT layer with local temporal relation aggregators around its spatial attention.

    x = x + LMHRA1(x) (patch tokens only), x = x + MHSA(LN1(x)) per frame, [x = x + LMHRA2(x)], x = x + MLP(LN2(x)).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        drop_path: float = 0.0,
        dw_reduction: float = 1.5,
        no_lmhra: bool = False,
        double_lmhra: bool = True,
    ) -> None:
        super().__init__()
        self.lmhra1 = None if no_lmhra else LocalMHRA(dim, dw_reduction)
        self.lmhra2 = LocalMHRA(dim, dw_reduction) if not no_lmhra and double_lmhra else None
        self.attn = Attention(dim, num_heads)
        self.ln_1 = LayerNorm(dim)
        self.mlp = Mlp(dim, dim * 4)
        self.ln_2 = LayerNorm(dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        if self.lmhra1 is not None:
            x = self._local_relation(x, self.lmhra1, num_frames)
        x = x + self._per_clip_drop_path(self.attn(self.ln_1(x)), num_frames)
        if self.lmhra2 is not None:
            x = self._local_relation(x, self.lmhra2, num_frames)
        return x + self._per_clip_drop_path(self.mlp(self.ln_2(x)), num_frames)

    def _per_clip_drop_path(self, branch: torch.Tensor, num_frames: int) -> torch.Tensor:
        # Drop a residual branch for all frames of a clip together, not frame by frame.
        return self.drop_path(branch.unflatten(0, (-1, num_frames))).flatten(0, 1)

    def _local_relation(self, x: torch.Tensor, lmhra: LocalMHRA, num_frames: int) -> torch.Tensor:
        frames, tokens, dim = x.shape
        side = math.isqrt(tokens - 1)
        patches = x[:, 1:].reshape(frames // num_frames, num_frames, side, side, dim)
        patches = patches + self.drop_path(lmhra(patches))
        return torch.cat([x[:, :1], patches.reshape(frames, tokens - 1, dim)], dim=1)


class GlobalUniBlock(nn.Module):
    """Cross-attention of one video query token over every token of a layer: q = q + Attn(LN1(q), LN3(tokens)),
    q = q + MLP(LN2(q)). Output projections start at zero so the query starts as the learnable `temporal_cls_token`."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_factor: float = 4.0,
        dropout: float = 0.5,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.attn = Attention(dim, num_heads)
        self.ln_1 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, round(mlp_factor * dim), dropout)
        self.ln_2 = nn.LayerNorm(dim)
        self.ln_3 = nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path)
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)
        nn.init.xavier_uniform_(self.mlp.c_fc.weight)
        nn.init.zeros_(self.mlp.c_proj.weight)
        nn.init.zeros_(self.mlp.c_proj.bias)

    def forward(self, query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        query = query + self.drop_path(self.attn(self.ln_1(query), self.ln_3(tokens)))
        return query + self.drop_path(self.mlp(self.ln_2(query)))
