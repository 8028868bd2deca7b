"""Training's initial weights: any file the loader reads, with its load report on the console (a `jobs` logger's info
line, which rank 0 forwards to the driver's console)."""

from __future__ import annotations

import logging

from jobs.training.network import load_initial_weights
from tests.model.test_weights import clip_visual_state, source  # noqa: F401 (source: a fixture)
from tests.model.test_weights_formats import openai_archive, seeded_tiny


def test_training_prints_the_load_report(tmp_path, source, caplog):
    path = tmp_path / "ViT-B-16.pt"
    openai_archive(path, clip_visual_state(source))
    with caplog.at_level(logging.INFO, logger="jobs"):
        load_initial_weights(seeded_tiny(), str(path), tracking_uri=None)
    printed = caplog.text
    assert f"initial weights from {path} (clip layout):\nloaded        53 tensors\n" in printed
    assert "\ninflated      conv1.weight\n" in printed
