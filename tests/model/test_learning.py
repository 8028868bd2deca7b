"""The small config learns motion that a frame-averaging image model cannot see.

Videos come from the synthetic generator (real H.264 files, decoded by the pipeline): classes differ only in the
direction a texture moves, and the texture drifts exactly one period over the video, so every frame statistic and
the time-average carry no class information.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import model
from model.transforms import eval_transform, train_transform
from pipeline import decode_clips, generate_motion_dataset

CROP = 32
NUM_CLASSES = 4


@pytest.fixture(scope="module")
def motion_clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("motion")
    items = generate_motion_dataset(folder, num_per_class=250, size=(40, 40), num_frames=16, seed=3, layout="flat")
    names = sorted({label for _, label in items})
    clips = np.concatenate([decode_clips(path, frames=8, short_side=40)[0] for path, _ in items])
    labels = np.array([names.index(label) for _, label in items])
    order = np.random.default_rng(0).permutation(len(labels))
    split = int(0.75 * len(labels))
    train, val = order[:split], order[split:]
    return (torch.from_numpy(clips[train]), torch.from_numpy(labels[train]),
            torch.from_numpy(clips[val]), torch.from_numpy(labels[val]))


class FrameAveragingViT(torch.nn.Module):
    """The image ViT of the same size applied to each frame, logits averaged over time (a TSN-style baseline)."""

    def __init__(self):
        super().__init__()
        self.vit = VisionTransformer(
            img_size=CROP, patch_size=8, embed_dim=96, depth=4, num_heads=4, num_classes=NUM_CLASSES,
            pre_norm=True, act_layer="quick_gelu", norm_layer=torch.nn.LayerNorm,
        )

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        n, _, t, h, w = video.shape
        frames = video.permute(0, 2, 1, 3, 4).reshape(n * t, 3, h, w)
        return self.vit(frames).view(n, t, -1).mean(dim=1)


def fit_and_score(net: torch.nn.Module, data, epochs: int, lr: float) -> float:
    train_x, train_y, val_x, val_y = data
    torch.manual_seed(0)
    batch = 16
    steps = epochs * (len(train_y) // batch)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_y), generator=generator)
        for i in range(len(train_y) // batch):
            index = order[i * batch : (i + 1) * batch]
            # no flips: a mirrored video moves the other way, which would relabel left/right
            inputs = train_transform(train_x[index], CROP, generator, flip=False)
            loss = F.cross_entropy(net(inputs), train_y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    net.eval()
    with torch.no_grad():
        predictions = net(eval_transform(val_x, CROP)).argmax(dim=1)
    return (predictions == val_y).float().mean().item()


def test_uniformerv2_learns_motion_that_frame_averaging_cannot(motion_clips):
    torch.manual_seed(0)
    video_model = model.create_model("uniformerv2_tiny", num_classes=NUM_CLASSES)
    video_accuracy = fit_and_score(video_model, motion_clips, epochs=12, lr=1e-3)

    torch.manual_seed(0)
    baseline_accuracy = fit_and_score(FrameAveragingViT(), motion_clips, epochs=12, lr=1e-3)

    assert video_accuracy >= 0.9, f"UniFormerV2 tiny reached {video_accuracy:.2f} validation accuracy"
    assert baseline_accuracy <= 0.4, f"the frame-averaging baseline reached {baseline_accuracy:.2f} (chance 0.25)"
