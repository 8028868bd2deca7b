import numpy as np
import pytest

from pipeline.decode import VideoDecodeError, decode_clips
from pipeline.synthetic import write_motion_video
from pipeline.views import crop_offsets, decode_views, parse_views, resize_short_side, spatial_crops


def test_views_are_written_temporal_by_spatial():
    assert parse_views("4x3") == (4, 3)
    assert parse_views(" 1X1 ") == (1, 1)
    for bad in ("4", "4x", "0x3", "4x3x8", "a x b"):
        with pytest.raises(ValueError, match="TEMPORALxSPATIAL"):
            parse_views(bad)


def test_crop_offsets_span_the_side_first_to_last_and_one_is_centred():
    assert crop_offsets(64, 32, 3) == [0, 16, 32]
    assert crop_offsets(43, 32, 3) == [0, 5, 11]
    assert crop_offsets(43, 32, 1) == [5]
    assert crop_offsets(32, 32, 3) == [0, 0, 0]
    with pytest.raises(ValueError):
        crop_offsets(20, 32, 1)


@pytest.mark.parametrize("height,width,expected", [(48, 64, (32, 43)), (64, 36, (57, 32)), (32, 32, (32, 32))])
def test_resize_short_side_keeps_the_aspect_ratio(height, width, expected):
    frames = np.random.default_rng(0).integers(0, 255, (2, height, width, 3), dtype=np.uint8)
    out = resize_short_side(frames, 32)
    assert out.shape == (2, *expected, 3) and out.dtype == np.uint8


def test_three_crops_are_left_centre_right_of_landscape_and_top_centre_bottom_of_portrait():
    # Each pixel holds its own column (channel 0) and row (channel 1), so a crop tells where it came from.
    rows, cols = np.meshgrid(np.arange(20), np.arange(40), indexing="ij")
    landscape = np.stack([cols, rows, np.zeros_like(rows)], axis=-1).astype(np.uint8)[None]  # [1, 20, 40, 3]
    crops = spatial_crops(landscape, 20, 3)
    assert crops.shape == (3, 1, 20, 20, 3)
    assert [int(c[0, 0, 0, 0]) for c in crops] == [0, 10, 20]  # left edges: left, centre, right
    assert all(int(c[0, 0, 0, 1]) == 0 for c in crops)  # the whole height

    portrait = landscape.transpose(0, 2, 1, 3)  # [1, 40, 20, 3]: channel 0 now counts rows
    crops = spatial_crops(portrait, 20, 3)
    assert [int(c[0, 0, 0, 0]) for c in crops] == [0, 10, 20]  # top edges: top, centre, bottom
    assert [int(c[0, 0, 0, 0]) for c in spatial_crops(portrait, 20, 1)] == [10]


def test_views_of_a_square_video_are_the_clips_of_each_temporal_offset(tmp_path):
    path = tmp_path / "square.mp4"
    write_motion_video(path, "left", size=(40, 40), num_frames=24, seed=1)
    views, info = decode_views(path, frames=4, crop=32, temporal_views=2, spatial_views=3)
    assert views.shape == (6, 4, 32, 32, 3) and views.dtype == np.uint8
    clips, clip_info = decode_clips(path, frames=4, short_side=32, clips_per_video=2)
    np.testing.assert_array_equal(info.frame_indices, clip_info.frame_indices)
    for k in range(2):
        for s in range(3):  # a square frame scaled to the crop size has one crop position only
            np.testing.assert_array_equal(views[k * 3 + s], clips[k])
    assert not np.array_equal(views[0], views[3])  # the two temporal clips differ


def test_crops_of_a_wide_video_tile_the_frame(tmp_path):
    path = tmp_path / "wide.mp4"
    write_motion_video(path, "right", size=(96, 48), num_frames=16, seed=2)
    views, _ = decode_views(path, frames=4, crop=24, temporal_views=1, spatial_views=3)
    left, centre, right = views
    # scaled to 48 x 24: crops at 0, 12, 24 -- the centre crop's halves are the outer crops' inner halves
    np.testing.assert_array_equal(centre[:, :, :12], left[:, :, 12:])
    np.testing.assert_array_equal(centre[:, :, 12:], right[:, :, :12])
    assert not np.array_equal(left, right)


def test_a_larger_short_side_scales_first_then_crops_the_centre_band(tmp_path):
    path = tmp_path / "wide.mp4"
    write_motion_video(path, "up", size=(64, 48), num_frames=16, seed=3)
    views, _ = decode_views(path, frames=2, crop=24, temporal_views=1, spatial_views=1, short_side=32)
    assert views.shape == (1, 2, 24, 24, 3)
    with pytest.raises(ValueError, match="short_side"):
        decode_views(path, frames=2, crop=24, short_side=16)


def test_broken_video_raises_a_decode_error(tmp_path, broken_video):
    path = broken_video(tmp_path / "bad.mp4", "text")
    with pytest.raises(VideoDecodeError):
        decode_views(path, frames=4, crop=32)
