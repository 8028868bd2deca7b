import csv

import av
import numpy as np
import pytest

from pipeline.synthetic import MOTION_CLASSES, generate_motion_dataset, render_motion_frames


def test_time_average_is_the_same_for_every_direction():
    # Same seed -> same background, window, texture; only the direction differs.
    means = [
        render_motion_frames(direction, 64, 48, 16, np.random.default_rng(7)).astype(float).mean(0)
        for direction in MOTION_CLASSES
    ]
    for other in means[1:]:
        assert np.abs(other - means[0]).max() < 1.0  # uint8 rounding only


def test_frame_statistics_have_the_same_distribution_in_every_class():
    # Over random videos, a class shows the same kind of frames and the same amount of motion; only the direction
    # differs. (One video's horizontal and vertical texture frequencies differ, so this holds across videos.)
    def statistics(direction):
        contrast, motion = [], []
        for seed in range(40):
            frames = render_motion_frames(direction, 32, 32, 8, np.random.default_rng(seed)).astype(float)
            contrast.append(frames[0].std())
            motion.append(np.abs(np.diff(frames, axis=0)).mean())
        return np.mean(contrast), np.mean(motion)

    per_class = np.array([statistics(direction) for direction in MOTION_CLASSES])
    assert (per_class.max(0) / per_class.min(0) < 1.1).all()


def test_the_texture_moves_in_the_class_direction():
    frames = render_motion_frames("right", 64, 64, 16, np.random.default_rng(3)).astype(float)
    first, second = frames[0], frames[1]

    def error(dx, dy):
        shifted = np.roll(np.roll(first, dy, axis=0), dx, axis=1)
        return np.abs(shifted[8:-8, 8:-8] - second[8:-8, 8:-8]).mean()

    # shifting frame 0 rightwards predicts frame 1 better than shifting it the other ways
    assert error(2, 0) < min(error(-2, 0), error(0, 2), error(0, -2))


def test_no_video_looks_the_same_in_two_directions():
    # Same seed -> same texture; a texture made only of waves along one diagonal would drift identically left and up
    # (or left and down), which caps any model's accuracy: such pairs differed by 0 here, every other pair by > 1.3.
    for seed in range(64):
        videos = [render_motion_frames(d, 32, 32, 8, np.random.default_rng(seed)).astype(float) for d in MOTION_CLASSES]
        for i in range(len(videos)):
            for j in range(i + 1, len(videos)):
                difference = np.abs(videos[i] - videos[j]).mean()
                assert difference > 1.0, (seed, MOTION_CLASSES[i], MOTION_CLASSES[j], difference)


def test_dataset_is_real_h264_in_kinetics_layout(tmp_path):
    videos = generate_motion_dataset(tmp_path, 2, size=(64, 48), num_frames=12, fps=6)
    assert len(videos) == 8 and {label for _, label in videos} == set(MOTION_CLASSES)
    for path, label in videos:
        assert f"/{label}/" in path and path.endswith(".mp4")
    with av.open(videos[0][0]) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert (stream.codec_context.width, stream.codec_context.height) == (64, 48)
        assert sum(1 for _ in container.decode(video=0)) == 12
    with open(tmp_path / "labels.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((row["path"], row["label"]) for row in rows) == sorted(
        (str(__import__("pathlib").Path(p).relative_to(tmp_path)), label) for p, label in videos
    )


def test_flat_layout_names_do_not_reveal_the_class(tmp_path):
    videos = generate_motion_dataset(tmp_path, 2, layout="flat", size=(32, 32), num_frames=8)
    for path, label in videos:
        assert label not in path.rsplit("/", 1)[-1]
    assert (tmp_path / "labels.csv").exists()


def test_generation_is_deterministic_for_a_seed(tmp_path):
    a = generate_motion_dataset(tmp_path / "a", 1, size=(32, 32), num_frames=8, seed=5)
    b = generate_motion_dataset(tmp_path / "b", 1, size=(32, 32), num_frames=8, seed=5)
    for (path_a, _), (path_b, _) in zip(a, b):
        assert open(path_a, "rb").read() == open(path_b, "rb").read()


def test_unknown_direction_is_refused():
    with pytest.raises(ValueError, match="direction"):
        render_motion_frames("sideways", 8, 8, 2, np.random.default_rng(0))
