import numpy as np
import pytest

from pipeline.decode import (
    VideoDecodeError,
    decode_clips,
    parse_aspect,
    resize_center_crop,
    resize_keep_aspect,
    sample_frame_indices,
    stored_width,
)
from pipeline.synthetic import render_motion_frames, write_motion_video


def test_uniform_single_clip_takes_segment_centres():
    indices, padded = sample_frame_indices(16, 8, "uniform")
    assert indices.tolist() == [[1, 3, 5, 7, 9, 11, 13, 15]]
    assert indices.dtype == np.int32 and not padded


def test_uniform_several_clips_are_spread_inside_every_segment():
    indices, _ = sample_frame_indices(40, 4, "uniform", clips_per_video=2)
    # segments of 10 frames; clip 0 at 1/4 of each segment, clip 1 at 3/4
    assert indices.tolist() == [[2, 12, 22, 32], [7, 17, 27, 37]]


def test_dense_single_clip_is_centred_with_stride():
    indices, padded = sample_frame_indices(100, 4, "dense", stride=8)
    span = 3 * 8 + 1
    start = (100 - span) // 2
    assert indices.tolist() == [[start, start + 8, start + 16, start + 24]] and not padded


def test_dense_several_clips_start_at_spread_offsets():
    indices, _ = sample_frame_indices(100, 2, "dense", stride=10, clips_per_video=3)
    starts = indices[:, 0].tolist()
    assert starts == sorted(starts) and len(set(starts)) == 3
    assert indices[0, 0] >= 0 and indices[-1, -1] <= 99
    assert (np.diff(indices, axis=1) == 10).all()


@pytest.mark.parametrize("sampling", ["uniform", "dense"])
def test_short_video_repeats_last_frame_and_says_padded(sampling):
    indices, padded = sample_frame_indices(3, 8, sampling, stride=2)
    assert padded
    assert indices.max() == 2 and indices[0, -1] == 2
    assert indices[0, 0] == 0


def test_no_frames_is_a_decode_error():
    with pytest.raises(VideoDecodeError, match="no frames"):
        sample_frame_indices(0, 8)


def test_unknown_sampling_is_refused():
    with pytest.raises(ValueError, match="sampling"):
        sample_frame_indices(10, 4, "random")


@pytest.mark.parametrize("height,width", [(48, 64), (64, 36), (17, 33), (6, 10), (720, 1280)])
def test_resize_center_crop_gives_square_of_short_side(height, width):
    frames = np.random.default_rng(0).integers(0, 255, (2, height, width, 3), dtype=np.uint8)
    out = resize_center_crop(frames, 32)
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.uint8


def test_resize_center_crop_keeps_the_centre_of_a_landscape_frame():
    frame = np.zeros((1, 40, 120, 3), dtype=np.uint8)
    frame[:, :, 40:80] = 255  # only the centre square is white
    out = resize_center_crop(frame, 20)
    # the filter of the outermost columns reaches one source pixel past the square, as resize-then-crop would
    assert out[:, :, 1:-1].min() == 255 and out.mean() > 245


def _sides_marked(height: int, width: int, side: int) -> np.ndarray:
    """A grey frame whose `side` leftmost and rightmost columns are white."""
    frame = np.full((1, height, width, 3), 100, dtype=np.uint8)
    frame[:, :, :side], frame[:, :, width - side :] = 255, 255
    return frame


def test_stored_width_is_the_short_side_times_the_maximum_aspect_made_even():
    assert stored_width(256, "16:9") == 456  # 455.1, as decode_size rounds 1280x720 to the short side 256
    assert stored_width(224, "16:9") == 398 and stored_width(256, "4:3") == 342 and stored_width(256, "1:1") == 256
    assert parse_aspect("21:9") == (21, 9)
    for bad in ("9:16", "16", "a:b", "0:1", "16:0"):
        with pytest.raises(ValueError, match="WIDTH:HEIGHT"):
            parse_aspect(bad)


def test_keep_aspect_stores_a_16_9_frame_whole_with_its_sides():
    frame = _sides_marked(720, 1280, 40)  # 40 source columns are 8 at short side 144
    out, valid = resize_keep_aspect(frame, 144, stored_width(144, "16:9"))
    assert out.shape == (1, 144, 256, 3) and valid == 256
    assert out[0, :, :6].min() == 255 and out[0, :, -6:].min() == 255  # the sides the centre square loses
    assert out[0, :, 100:156].max() == 100


def test_keep_aspect_centre_crops_a_wider_frame_to_the_maximum():
    frame = np.full((1, 100, 400, 3), 100, dtype=np.uint8)  # 4:1 at short side 100 is 400 wide; 16:9 keeps 178
    frame[:, :, :100], frame[:, :, 300:] = 255, 255  # only beyond the centre 200 columns
    out, valid = resize_keep_aspect(frame, 100, stored_width(100, "16:9"))
    assert out.shape == (1, 100, 178, 3) and valid == 178
    assert out.max() == 100  # the centre 178 of 400 columns: none of the white ones


def test_keep_aspect_pads_a_4_3_frame_centred_and_says_its_valid_width():
    frame = _sides_marked(480, 640, 30)
    out, valid = resize_keep_aspect(frame, 120, stored_width(120, "16:9"))  # 160 of 214 columns hold the frame
    assert out.shape == (1, 120, 214, 3) and valid == 160
    pad = (214 - 160) // 2
    assert out[0, :, :pad].max() == 0 and out[0, :, pad + valid :].max() == 0
    assert out[0, :, pad : pad + 5].min() == 255 and out[0, :, pad + valid - 5 : pad + valid].min() == 255


def test_keep_aspect_stores_the_centre_square_of_a_portrait_frame():
    frame = np.full((1, 200, 100, 3), 255, dtype=np.uint8)
    frame[:, 50:150] = 100  # the centre square
    out, valid = resize_keep_aspect(frame, 50, stored_width(50, "16:9"))
    assert out.shape == (1, 50, 88, 3) and valid == 50
    square = out[0, :, 19:69]
    assert square.min() >= 99 and square.max() <= 101 and out[0, :, :19].max() == 0 and out[0, :, 69:].max() == 0
    assert np.array_equal(square, resize_center_crop(frame, 50)[0])


def test_decode_clips_keeps_the_aspect_at_the_decoded_short_side(tmp_path):
    path = tmp_path / "v.mp4"
    write_motion_video(path, "right", size=(128, 72), num_frames=16, fps=8)
    clips, info = decode_clips(path, frames=4, short_side=36, width=stored_width(36, "16:9"))
    assert clips.shape == (1, 4, 36, 64, 3) and info.valid_width == 64
    square, info = decode_clips(path, frames=4, short_side=36)
    assert square.shape == (1, 4, 36, 36, 3) and info.valid_width is None


def test_decode_clips_from_bytes_and_path_agree(tmp_path):
    path = tmp_path / "v.mp4"
    write_motion_video(path, "right", size=(64, 48), num_frames=16, fps=8)
    from_path, info = decode_clips(str(path), frames=4, short_side=32)
    from_bytes, info_bytes = decode_clips(path.read_bytes(), frames=4, short_side=32)
    assert from_path.shape == (1, 4, 32, 32, 3) and from_path.dtype == np.uint8
    np.testing.assert_array_equal(from_path, from_bytes)
    assert info.num_video_frames == 16 and info.fps == pytest.approx(8.0)
    assert (info.width, info.height) == (64, 48) and not info.padded
    assert info.frame_indices.tolist() == info_bytes.frame_indices.tolist() == [[2, 6, 10, 14]]


def test_decoded_frames_match_what_was_encoded(tmp_path):
    rng_seed = 3
    frames = render_motion_frames("down", 64, 64, 16, np.random.default_rng(rng_seed))
    path = tmp_path / "v.mp4"
    write_motion_video(path, "down", size=(64, 64), num_frames=16, seed=rng_seed)
    clips, info = decode_clips(str(path), frames=4, short_side=64)
    expected = frames[info.frame_indices[0]]
    # H.264 at crf 20 is lossy; the frames are the same pictures within coding noise
    assert np.abs(clips[0].astype(int) - expected.astype(int)).mean() < 6


def test_several_clips_per_video(tmp_path):
    path = tmp_path / "v.mp4"
    write_motion_video(path, "left", size=(64, 48), num_frames=24)
    clips, info = decode_clips(str(path), frames=4, short_side=32, clips_per_video=3)
    assert clips.shape == (3, 4, 32, 32, 3)
    assert len({tuple(row) for row in info.frame_indices.tolist()}) == 3


def test_short_video_is_padded(tmp_path):
    path = tmp_path / "short.mp4"
    write_motion_video(path, "left", size=(64, 48), num_frames=3)
    clips, info = decode_clips(str(path), frames=8, short_side=32)
    assert clips.shape == (1, 8, 32, 32, 3) and info.padded
    assert info.frame_indices[0].tolist() == [0, 1, 2, 2, 2, 2, 2, 2]
    np.testing.assert_array_equal(clips[0, 2], clips[0, 7])


@pytest.mark.parametrize("size", [(48, 96), (33, 17), (16, 16), (97, 55)], ids=["portrait", "odd", "tiny", "odd2"])
def test_unusual_resolutions_decode_to_the_fixed_square(tmp_path, size):
    path = tmp_path / "v.mp4"
    write_motion_video(path, "up", size=size, num_frames=16)
    clips, info = decode_clips(str(path), frames=4, short_side=40)
    assert clips.shape == (1, 4, 40, 40, 3)
    assert (info.width, info.height) == size


def test_variable_frame_rate_video_decodes_by_frame_count(tmp_path):
    path = tmp_path / "vfr.mp4"
    write_motion_video(path, "right", size=(64, 48), num_frames=20, fps=10, variable_frame_rate=True)
    clips, info = decode_clips(str(path), frames=5, short_side=32)
    assert clips.shape == (1, 5, 32, 32, 3)
    assert info.num_video_frames == 20
    assert 0 < info.fps < 30


@pytest.mark.parametrize(
    "kind,message",
    [
        ("zero_byte", "empty file"),
        ("text", "not a readable video container"),
        ("png", "non-video file"),
        ("truncated", "truncated"),
        ("truncated_faststart", "truncated"),
        ("audio_only", "no video stream"),
        ("corrupt_header", "cannot open as a video"),
    ],
)
def test_broken_inputs_raise_one_clear_line(tmp_path, broken_video, kind, message):
    path = broken_video(tmp_path / f"{kind}.mp4", kind)
    with pytest.raises(VideoDecodeError) as caught:
        decode_clips(path.read_bytes() if kind != "zero_byte" else b"", frames=4, short_side=32)
    text = str(caught.value)
    assert message in text
    assert "\n" not in text and ".cc:" not in text  # no C++ source positions or stack traces


def test_a_segment_samples_only_frames_that_start_inside_it(tmp_path):
    path = tmp_path / "untrimmed.mp4"
    write_motion_video(path, "left", size=(64, 48), num_frames=80, fps=8)  # 10 s
    clips, info = decode_clips(str(path), frames=4, short_side=32, clips_per_video=2, segment=(3.0, 6.5))
    assert clips.shape == (2, 4, 32, 32, 3) and not info.padded
    # frames start at i / 8 s: 3.0 s is frame 24, the last frame starting before 6.5 s is frame 51
    assert info.frame_indices.min() >= 24 and info.frame_indices.max() <= 51
    assert info.frame_indices.max() - info.frame_indices.min() > 20  # spread over the segment, not bunched
    whole, _ = decode_clips(str(path), frames=4, short_side=32)
    assert info.num_video_frames == 80 and whole.shape == (1, 4, 32, 32, 3)


def test_a_segment_past_the_end_keeps_the_frames_up_to_it_and_one_after_it_is_refused(tmp_path):
    path = tmp_path / "untrimmed.mp4"
    write_motion_video(path, "left", size=(64, 48), num_frames=16, fps=8)  # 2 s
    _, info = decode_clips(str(path), frames=6, short_side=32, segment=(1.5, 4.0))
    assert info.frame_indices.tolist() == [[12, 13, 14, 15, 15, 15]] and info.padded
    with pytest.raises(VideoDecodeError, match="segment 2.5-4 s holds no frame of this 2.00 s video"):
        decode_clips(str(path), frames=4, short_side=32, segment=(2.5, 4.0))
