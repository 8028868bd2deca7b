"""`uniformer weights inspect|convert` on checkpoints as users download them."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import model
from jobs.cli import app

from tests.model.test_weights import clip_visual_state, official_checkpoint, source  # noqa: F401 (source: a fixture)
from tests.model.test_weights_formats import assert_same_logits, openai_archive, seeded_tiny

runner = CliRunner()


def test_inspect_names_layout_architecture_and_what_would_load(tmp_path, source):
    path = tmp_path / "ViT-B-16.pt"
    openai_archive(path, clip_visual_state(source))
    result = runner.invoke(app, ["weights", "inspect", str(path), "--model", "uniformerv2_tiny", "--classes", "5"])
    assert result.exit_code == 0, result.output
    assert "layout        clip: OpenAI CLIP or open_clip" in result.output
    assert "architecture  width=96, layers=4, patch_size=8, input_resolution=32\n" in result.output
    assert "inflated      conv1.weight" in result.output
    assert "interpolated  -" in result.output
    assert "ignored       10 tensors of the file: ln_final (2), ln_post (2), input_resolution (1)" in result.output


def test_inspect_of_a_video_checkpoint_says_why_it_does_not_fit_the_default_model(tmp_path, source):
    path = tmp_path / "k400.pyth"
    torch.save(official_checkpoint(source), path)
    result = runner.invoke(app, ["weights", "inspect", str(path)])
    assert result.exit_code == 1
    assert "temporal_downsample=True, no_lmhra=False, num_classes=5" in result.output
    assert "does not load into uniformerv2_b16" in result.output and "shape mismatches" in result.output


def test_inspect_of_an_unknown_file_names_what_it_found(tmp_path):
    path = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"encoder.layer.0.weight": torch.zeros(2)}, str(path))
    result = runner.invoke(app, ["weights", "inspect", str(path)])
    assert result.exit_code == 1 and "first keys: encoder.layer.0.weight" in result.output


def test_convert_writes_the_vit_as_safetensors_that_load_like_the_archive(tmp_path, source):
    archive, out = tmp_path / "ViT-B-16.pt", tmp_path / "vit-b-16.safetensors"
    openai_archive(archive, clip_visual_state(source))
    result = runner.invoke(app, ["weights", "convert", str(archive), str(out)])
    assert result.exit_code == 0, result.output

    tensors = load_file(out)
    assert "conv1.weight" in tensors and "transformer.resblocks.3.mlp.c_proj.bias" in tensors
    assert not any(k.startswith(("token_embedding", "ln_post", "proj", "logit_scale")) for k in tensors)
    assert tensors["conv1.weight"].dtype == torch.float16  # as stored
    from_converted, from_archive = seeded_tiny(), seeded_tiny()
    assert model.load_pretrained(from_converted, out).layout == "clip"
    model.load_pretrained(from_archive, archive)
    assert_same_logits(from_converted, from_archive)


def test_convert_refuses_an_output_it_could_not_read_back(tmp_path):
    result = runner.invoke(app, ["weights", "convert", str(tmp_path / "in.pt"), str(tmp_path / "out.pt")])
    assert result.exit_code != 0 and ".safetensors" in result.output


@pytest.mark.parametrize(("make", "args", "code", "message"), [
    (lambda path: torch.save([1, 2], path), [], 1, "the file holds a list, not a state dict"),
    (lambda path: torch.save(torch.zeros(3), path), [], 1, "the file holds a Tensor, not a state dict"),
    (lambda path: path.write_bytes(b""), [], 1, "cannot be read as tensors only (EOFError"),
    (lambda path: torch.save({}, path), ["--model", "nosuch"], 2, "unknown model 'nosuch'"),
    (lambda path: torch.save({}, path), ["--set", "bogus=1"], 2, "unknown UniFormerV2 option(s): ['bogus']"),
    (lambda path: torch.save({}, path), ["--classes", "-3"], 2, "greater than or equal to 1"),
])
def test_inspect_refuses_what_is_no_checkpoint_or_no_model_in_one_line(tmp_path, make, args, code, message):
    path = tmp_path / "weights.pt"
    make(path)
    result = CliRunner().invoke(app, ["weights", "inspect", str(path), *args])
    assert result.exit_code == code and "Traceback" not in result.output, result.output
    assert message in " ".join(result.output.split()), result.output
