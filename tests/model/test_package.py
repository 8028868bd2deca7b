"""A package held in memory, as a scoring actor receives it through Ray's object store, loads as its files do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import model
from model.package import ModelCard, load_package_bytes, save_package


def test_a_package_in_memory_loads_as_its_files_do_and_refuses_weights_that_do_not_fit(tmp_path):
    card = ModelCard("uniformerv2_tiny", 5, {}, list("abcde"), 8, 32, 40)
    weights, config = save_package(model.create_model("uniformerv2_tiny", num_classes=5), card, tmp_path)
    data, text = Path(weights).read_bytes(), Path(config).read_text()
    from_files, _ = model.load_package(weights, config)
    from_memory, loaded = load_package_bytes(data, text)
    assert loaded == card and not from_memory.training
    expected = from_files.state_dict()
    assert all(torch.equal(tensor, expected[key]) for key, tensor in from_memory.state_dict().items())
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_package_bytes(data, ModelCard("uniformerv2_tiny", 7).to_json())
