"""`uniformer predict`: a video's top-k by the scoring path (the same decoding and multi-view inference), from a local
file or S3, in one process; unreadable videos are told apart and the others still answered."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import model
from jobs.cli import app
from jobs.predict import predict_videos
from model.package import ModelCard, save_package
from model.transforms import eval_transform
from pipeline import generate_motion_dataset
from pipeline.views import decode_views

CLASSES = ["down", "left", "right", "up"]
CARD = ModelCard("uniformerv2_tiny", 4, {"t_size": 8, "input_normalization": "slowfast"}, CLASSES, 8, 32, 40)


def random_package(tmp_path_factory, name: str, seed: int):
    """A package of CARD with random weights drawn from `seed`."""
    torch.manual_seed(seed)
    folder = tmp_path_factory.mktemp("package") / name
    save_package(model.create_model(CARD.model, CARD.num_classes, **CARD.overrides), CARD, folder)
    return folder


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return random_package(tmp_path_factory, "motion", 3)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    generate_motion_dataset(folder, 1, classes=("left", "up"), size=(64, 48), num_frames=16, seed=9)
    return sorted(folder.rglob("*.mp4"))


def direct_probs(package, path, views=(2, 3)) -> np.ndarray:
    net, card = model.load_package(package / "model.safetensors", package / "model_config.json")
    clips, _ = decode_views(path, card.frames, card.crop_size, *views)
    with torch.no_grad():
        logits = net(eval_transform(torch.from_numpy(clips), card.crop_size, "slowfast"))
    return torch.softmax(logits, dim=-1).mean(dim=0).numpy()


def test_each_video_gets_the_probabilities_the_scoring_path_gives_and_bad_ones_their_error(package, videos, tmp_path):
    broken = tmp_path / "notes.mp4"
    broken.write_text("not a video")
    identity, predictions = predict_videos([str(videos[0]), str(tmp_path / "gone.mp4"), str(broken), str(videos[1])],
                                           str(package), views="2x3", top_k=4)
    results = list(predictions)
    assert identity.name == "motion" and [r.video for r in results][1:3] == [str(tmp_path / "gone.mp4"), str(broken)]
    assert results[1].error == "read: FileNotFoundError: no such video"
    assert results[2].error.startswith("decode: VideoDecodeError: cannot open as a video")
    for result, path in ((results[0], videos[0]), (results[3], videos[1])):
        want = direct_probs(package, path)
        order = np.argsort(-want, kind="stable")
        assert [top["id"] for top in result.top_k] == order.tolist()
        assert [top["name"] for top in result.top_k] == [CLASSES[i] for i in order]
        np.testing.assert_allclose([top["prob"] for top in result.top_k], want[order], atol=2e-5)
    assert 0 < results[0].seconds <= results[3].seconds


def test_the_command_prints_one_line_or_json_object_per_video_and_exits_5_on_a_bad_one(package, videos, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["predict", str(videos[0]), "--model", str(package), "--views", "1x1", "--top-k", "2"])
    assert result.exit_code == 0, result.output
    [line] = [line for line in result.stdout.splitlines() if line.startswith(str(videos[0]))]
    assert len(line.split()) == 5  # the video, then two names with their probabilities
    result = runner.invoke(app, ["predict", str(videos[1]), str(tmp_path / "gone.mp4"), "--model", str(package),
                                 "--json"])
    assert result.exit_code == 5, result.output
    objects = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [o["video"] for o in objects] == [str(videos[1]), str(tmp_path / "gone.mp4")]
    assert len(objects[0]["top_k"]) == 4 and objects[0]["error"] is None and objects[1]["error"]
    assert objects[0]["model"]["package_sha256"]
    refused = runner.invoke(app, ["predict", str(videos[0]), "--model", str(tmp_path / "nothing")])
    assert refused.exit_code == 1 and "is not a model package folder" in refused.output


@pytest.mark.integration
def test_a_video_on_s3_is_predicted_like_the_local_file(package, videos, s3_server, s3_bucket):
    s3_server.client().upload_file(str(videos[0]), s3_bucket, "archive/clip.mp4")
    _, predictions = predict_videos([f"s3://{s3_bucket}/archive/clip.mp4", f"s3://{s3_bucket}/archive/gone.mp4"],
                                    str(package), views="2x3", top_k=4, endpoint_url=s3_server.endpoint_url)
    remote, gone = list(predictions)
    _, local = predict_videos([str(videos[0])], str(package), views="2x3", top_k=4)
    assert remote.top_k == next(local).top_k and gone.error == "read: FileNotFoundError: no such video"
