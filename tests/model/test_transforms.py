"""Training augmentation on the device: the official recipe (RandAugment m7 n4, RandomResizedCrop, flip), the same
for every frame of a clip, and reproducible from the step's seeds."""

import pytest
import torch

from model.transforms import recipe_augment, resized_crop_box, train_transform


def augmented(clips: torch.Tensor, seed: int, **options) -> torch.Tensor:
    torch.manual_seed(seed)  # what training does at every step (RandAugment draws from the global RNG)
    return train_transform(clips, 48, torch.Generator().manual_seed(seed), augment="recipe", **options)


def test_recipe_is_reproducible_per_step_and_differs_between_steps():
    clips = torch.randint(0, 256, (3, 4, 64, 80, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    first = augmented(clips, seed=11)
    assert first.shape == (3, 3, 4, 48, 48) and first.dtype == torch.float32
    torch.testing.assert_close(augmented(clips, seed=11), first, rtol=0, atol=0)
    assert not torch.equal(augmented(clips, seed=12), first)


def test_every_frame_of_a_clip_gets_the_same_ops_and_window():
    frame = torch.randint(0, 256, (1, 1, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    clips = frame.expand(2, 5, 64, 64, 3).contiguous()  # clips of identical frames stay so after augmenting
    for seed in range(5):
        torch.manual_seed(seed)
        out = recipe_augment(clips, 32, torch.Generator().manual_seed(seed))
        assert torch.equal(out, out[:, :1].expand_as(out))


def test_crop_windows_follow_torchvision_ranges():
    generator = torch.Generator().manual_seed(3)
    for _ in range(200):
        top, left, h, w = resized_crop_box(100, 150, generator)
        assert 0 <= top <= 100 - h and 0 <= left <= 150 - w
        assert 0.08 * 100 * 150 * 0.9 <= h * w <= 100 * 150
    assert resized_crop_box(10, 1000, torch.Generator().manual_seed(0), scale=(0.99, 1.0)) == (0, 493, 10, 13)


def test_unknown_augmentation_is_refused():
    with pytest.raises(ValueError, match="augment must be one of recipe, crop"):
        train_transform(torch.zeros(1, 1, 8, 8, 3, dtype=torch.uint8), 8, augment="mixup")
