"""The network as a self-contained inference graph for export (ONNX, TorchScript): the stored clip pixels in, the
logits and probabilities out, with the model's own pixel normalisation inside, so that a consumer of the exported
file needs nothing from this package but the clip format (frames, crop size) its metadata states."""

from __future__ import annotations

import torch
from torch import nn

from model.transforms import input_normalization, normalize


class ClipClassifier(nn.Module):
    """`[B, T, S, S, 3]` uint8 pixels (or 0..255 floats), S the model's crop size (the centre crop already taken, as
    `model.inference.predict_views` takes it) -> (logits `[B, C]`, softmax probabilities `[B, C]`, float32).
    The same computation as `predict_views` for one view at fp32: `normalize` then the network."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.normalization = input_normalization(net)

    def forward(self, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(normalize(clips, self.normalization)).float()
        return logits, torch.softmax(logits, dim=-1)
