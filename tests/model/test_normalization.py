"""The input normalisation is the model's: official and MMAction2 checkpoints scored from uint8 pixels as the official
code scores them (PySlowFast's mean and std), packages carry theirs, and packages written before keep CLIP's."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import model
from jobs.training.config import TrainConfig
from jobs.training.network import model_overrides
from model.inference import predict_views
from model.package import ModelCard, save_package
from tests.model.test_weights import mmaction_checkpoint, official_checkpoint, source  # noqa: F401 (a fixture)

CROP = 32


def pixels(seed: int = 0) -> torch.Tensor:
    """uint8 clips [2, 8, 40, 40, 3], as decoded and stored."""
    return torch.randint(0, 256, (2, 8, 40, 40, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def reference_probs(net, clips: torch.Tensor, mean: float | tuple, std: float | tuple) -> torch.Tensor:
    """The official test path written out: centre crop, pixels / 255, (x - mean) / std, [B, 3, T, H, W], softmax."""
    crop = clips[:, :, 4:4 + CROP, 4:4 + CROP].float() / 255.0
    x = ((crop - torch.tensor(mean)) / torch.tensor(std)).permute(0, 4, 1, 2, 3)
    with torch.no_grad():
        return torch.softmax(net.eval()(x), dim=-1)


@pytest.mark.parametrize("checkpoint", [official_checkpoint, mmaction_checkpoint])
def test_a_released_checkpoint_scores_uint8_pixels_as_the_official_code(source, checkpoint, tmp_path):  # noqa: F811
    net = model.create_model("uniformerv2_tiny", num_classes=5, input_normalization="slowfast").eval()
    report = model.load_pretrained(net, checkpoint(source))
    assert report.trained_normalization == "slowfast" and "normalisation" not in report.summary()
    clips = pixels()
    expected = reference_probs(source, clips, 0.45, 0.225)
    torch.testing.assert_close(predict_views(net, clips[:, None], CROP), expected, atol=1e-5, rtol=0)

    # a package of it, and the MLflow pyfunc built from that package, read the normalisation from the model
    card = ModelCard("uniformerv2_tiny", 5, {"input_normalization": "slowfast"}, list("abcde"), 8, CROP, 40)
    weights, config = save_package(net, card, tmp_path / "package")
    from jobs.serving.pyfunc_model import UniFormerV2Classifier

    served = UniFormerV2Classifier()
    served.load_context(SimpleNamespace(artifacts={"weights": weights, "config": config}))
    rows = served.predict(None, clips.numpy(), params={"full_probs": True})
    torch.testing.assert_close(torch.tensor(np.stack(rows["probs"]), dtype=torch.float32), expected, atol=1e-5, rtol=0)


def test_a_model_that_normalises_otherwise_than_its_checkpoint_says_so(source):  # noqa: F811
    net = model.create_model("uniformerv2_tiny", num_classes=5).eval()  # CLIP's, the default of a bare config
    report = model.load_pretrained(net, official_checkpoint(source))
    assert "the file was trained on slowfast pixels, the model normalises clip" in report.summary()
    clips = pixels(1)
    off = (predict_views(net, clips[:, None], CROP) - reference_probs(source, clips, 0.45, 0.225)).abs().max()
    assert off > 1e-3  # what the wrong normalisation costs, so the two are told apart


def test_a_package_written_before_the_normalisation_was_recorded_keeps_clips(source, tmp_path):  # noqa: F811
    card = ModelCard("uniformerv2_tiny", 5, {}, list("abcde"), 8, CROP, 40)  # no input_normalization override
    weights, config = save_package(source, card, tmp_path / "old")
    net, loaded = model.load_package(weights, config)
    clips = pixels(2)
    expected = reference_probs(source, clips, model.CLIP_MEAN, model.CLIP_STD)
    torch.testing.assert_close(predict_views(net, clips[:, None], CROP), expected, atol=1e-5, rtol=0)


def test_training_records_the_recipes_normalisation_in_the_model():
    assert model_overrides(TrainConfig(data="clips"), 8)["input_normalization"] == "slowfast"
    assert model_overrides(TrainConfig(data="clips", input_normalization="clip"), 8)["input_normalization"] == "clip"
    with pytest.raises(ValueError, match="input_normalization must be one of clip, slowfast"):
        TrainConfig(data="clips", input_normalization="imagenet")
