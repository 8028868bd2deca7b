"""Horizontal flips of left/right classes (Something-Something's "pushing left to right"): with --flip-pairs a
flipped clip is trained on its mirror label, and bad pair files are refused on the driver."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from jobs.exitcodes import OptionError
from jobs.train import check_flip_pairs
from jobs.training import checkpoint as ckpt
from jobs.training.config import TrainConfig
from jobs.training.data import StepLayout
from jobs.training.loop import Trainer, build_train_state
from jobs.training.network import flip_swap, read_flip_pairs
from model.transforms import train_transform

CLASSES = ["pushing left to right", "pushing right to left", "lifting", "dropping"]


def test_pairs_read_from_csv_map_each_class_to_its_mirror(tmp_path):
    (tmp_path / "pairs.csv").write_text("# a,b\npushing left to right,pushing right to left\n")
    pairs = read_flip_pairs(str(tmp_path / "pairs.csv"))
    assert flip_swap(pairs, CLASSES).tolist() == [1, 0, 2, 3]
    for content, message in [("a\n", "expected two different class names"), ("a,a\n", "two different"),
                             ("a,b\nb,c\n", "already has a mirror")]:
        (tmp_path / "bad.csv").write_text(content)
        with pytest.raises(ValueError, match=message):
            read_flip_pairs(str(tmp_path / "bad.csv"))
    with pytest.raises(ValueError, match="name classes the dataset does not have: nope"):
        flip_swap([("lifting", "nope")], CLASSES)


@pytest.mark.parametrize("augment", ["crop", "recipe"])
def test_the_flip_mask_is_the_flips_the_transform_made(augment):
    clips = torch.zeros(6, 2, 8, 8, 3, dtype=torch.uint8)
    clips[..., :4, :] = 255  # a bright left half: flipped clips have it on the right
    inputs, flipped = train_transform(clips, 8, torch.Generator().manual_seed(1), augment=augment, return_flips=True)
    assert flipped.any() and not flipped.all()
    bright_left = inputs[:, 0, 0, :, :4].mean(dim=(1, 2)) > inputs[:, 0, 0, :, 4:].mean(dim=(1, 2))
    if augment == "crop":  # RandAugment may change colours, never which side is which for the plain crop
        assert torch.equal(bright_left, ~flipped)


def test_a_flipped_clip_is_trained_on_its_mirror_label(tmp_path, monkeypatch):
    (tmp_path / "pairs.csv").write_text("pushing left to right,pushing right to left\n")
    cfg = TrainConfig(data="clips@1", model="uniformerv2_tiny", compile="off", batch_size=4, augment="crop",
                      flip_pairs=str(tmp_path / "pairs.csv"))
    layout, cpu = StepLayout((2,), 2, 4), torch.device("cpu")
    state = build_train_state(cfg, len(CLASSES), 4, cpu, layout.total_steps, 0)
    trainer = Trainer(cfg, state, ckpt.Progress(), layout, cpu, crop_size=32, class_names=CLASSES)
    seen = []
    monkeypatch.setattr(F, "cross_entropy", lambda logits, labels, **kw: seen.append(labels) or logits.sum() * 0)
    batch = {"frames": torch.zeros(4, 4, 40, 40, 3, dtype=torch.uint8), "label": torch.tensor([0, 1, 2, 0])}
    generator = torch.Generator().manual_seed(5)
    _, flipped = train_transform(batch["frames"], 32, torch.Generator().manual_seed(5), augment="crop",
                                 return_flips=True)
    trainer.forward_backward(batch, generator, last_micro_step=True)
    expected = torch.where(flipped, torch.tensor([1, 0, 2, 3])[batch["label"]], batch["label"])
    assert flipped.any() and torch.equal(seen[0], expected)


def test_the_driver_refuses_pairs_it_cannot_use(tmp_path):
    (tmp_path / "pairs.csv").write_text("lifting,flying\n")
    with pytest.raises(OptionError, match="--flip-pairs: it needs --hflip|needs --hflip"):
        check_flip_pairs(TrainConfig(data="c", hflip=False, flip_pairs=str(tmp_path / "pairs.csv")), CLASSES)
    with pytest.raises(OptionError, match="name classes the dataset does not have: flying"):
        check_flip_pairs(TrainConfig(data="c", flip_pairs=str(tmp_path / "pairs.csv")), CLASSES)
