"""Training augmentation on the device: the official recipe (RandAugment m7 n4, RandomResizedCrop, flip), the same
for every frame of a clip, and reproducible from the step's seeds."""

import pytest
import torch

from model.transforms import center_crop, random_crop_flip, recipe_augment, resized_crop_box, train_transform


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


RED = torch.tensor([255, 0, 0], dtype=torch.uint8)


def aspect_clips() -> tuple[torch.Tensor, torch.Tensor]:
    """Two grey clips as a keep="aspect" dataset stores them, 32 high and 56 wide, with their valid widths: a 16:9
    one whose columns beyond the centre square (12..43) are red, and a 4:3 one 42 wide centred in black padding
    (columns 7..48), red beyond the centre square too."""
    clips = torch.full((2, 2, 32, 56, 3), 100, dtype=torch.uint8)
    clips[0, :, :, :12], clips[0, :, :, 44:] = RED, RED
    clips[1, :, :, 7:12], clips[1, :, :, 44:49] = RED, RED
    clips[1, :, :, :7], clips[1, :, :, 49:] = 0, 0
    return clips, torch.tensor([56, 42])


def red(windows: torch.Tensor) -> torch.Tensor:
    """Per clip of float or uint8 `[B, T, H, W, 3]` windows: whether any pixel is the sides' red."""
    pixels = windows.float()
    return ((pixels[..., 0] > 200) & (pixels[..., 1] < 50)).flatten(1).any(1)


def dark(windows: torch.Tensor) -> torch.Tensor:
    """Per clip: whether any pixel reached the black padding (grey and red pixels sum to 255 or more)."""
    return (windows.float().sum(-1) < 200).flatten(1).any(1)


def test_random_crops_reach_the_sides_of_an_aspect_frame_and_never_its_padding():
    clips, valid_widths = aspect_clips()
    sides_seen, padding_without_widths = torch.zeros(2, dtype=torch.int64), 0
    for seed in range(60):
        windows = random_crop_flip(clips, 28, torch.Generator().manual_seed(seed), valid_widths=valid_widths)
        assert windows.shape == (2, 2, 28, 28, 3) and not dark(windows).any()
        sides_seen += red(windows)
        padding_without_widths += int(dark(random_crop_flip(clips, 28, torch.Generator().manual_seed(seed)))[1])
    assert (sides_seen > 20).all()  # a centre-square dataset has no such pixels to draw
    assert padding_without_widths > 0  # what the valid widths keep out


def test_random_resized_crops_reach_the_sides_of_an_aspect_frame_and_never_its_padding(monkeypatch):
    from torchvision.transforms import v2

    # windows only: RandAugment's rotations and shears fill with black of their own
    monkeypatch.setattr(v2, "RandAugment", lambda **options: (lambda frames: frames))
    clips, valid_widths = aspect_clips()
    sides_seen, padding_without_widths = torch.zeros(2, dtype=torch.int64), 0
    for seed in range(60):
        windows = recipe_augment(clips, 28, torch.Generator().manual_seed(seed), valid_widths=valid_widths)
        assert not dark(windows).any()
        sides_seen += red(windows)
        padding_without_widths += int(dark(recipe_augment(clips, 28, torch.Generator().manual_seed(seed)))[1])
    assert (sides_seen > 20).all()
    assert padding_without_widths > 0


def test_the_centre_crop_of_an_aspect_frame_lies_inside_every_clips_video():
    clips, _ = aspect_clips()
    for size in (28, 32):
        assert not dark(center_crop(clips, size)).any()


def test_valid_widths_outside_the_crop_size_or_the_frame_are_refused():
    clips, _ = aspect_clips()
    for widths in ([56, 20], [58, 42]):
        with pytest.raises(ValueError, match="valid widths"):
            train_transform(clips, 28, torch.Generator().manual_seed(0), augment="crop",
                            valid_widths=torch.tensor(widths))
