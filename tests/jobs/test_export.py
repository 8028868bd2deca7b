"""`uniformer export`: a package as one ONNX or TorchScript file that takes uint8 clips and gives what the scoring path
gives, checked before it is written; a registered model by alias, logged back to its run; nothing left on failure."""

from __future__ import annotations

import json
import re
import sys
import uuid

import mlflow
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import jobs.export
import model
from jobs.cli import app
from jobs.registry import log_model
from model.inference import predict_views
from model.package import ModelCard, save_package
from tests.jobs.test_predict import CARD, CLASSES, package  # noqa: F401 (package: a fixture)

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

# reading TorchScript back is the test's point, whatever torch.jit's deprecation notice says
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")

def export(*args: str):
    return CliRunner().invoke(app, ["export", *args])


def clips(batch: int, card: ModelCard = CARD, seed: int = 11) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, card.frames, card.crop_size, card.crop_size, 3), dtype=torch.uint8,
                         generator=generator)


def scoring_probs(package, inputs: torch.Tensor) -> np.ndarray:
    """The scoring path's probabilities of single-view clips (the crop of an S x S clip is the clip)."""
    net, card = model.load_package(package / "model.safetensors", package / "model_config.json")
    return predict_views(net, inputs[:, None], card.crop_size).numpy()


def reported_difference(output: str) -> float:
    return float(re.search(r"max difference to PyTorch (\S+)", output).group(1).rstrip(","))


def no_partial_files(folder) -> bool:
    return not [path for path in folder.iterdir() if path.name.endswith(".partial")]


def test_onnx_takes_uint8_clips_of_any_batch_and_gives_the_scoring_paths_probabilities(package, tmp_path):
    out = tmp_path / "motion.onnx"
    result = export("--model", str(package), "--format", "onnx", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert out.is_file() and no_partial_files(tmp_path) and reported_difference(result.output) <= 1e-4
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    [clip_input] = session.get_inputs()
    assert clip_input.name == "clips" and clip_input.type == "tensor(uint8)"
    assert isinstance(clip_input.shape[0], str) and clip_input.shape[1:] == [8, 32, 32, 3]
    for batch in (1, 3):  # neither the export's example batch nor its check's
        inputs = clips(batch)
        logits, probs = session.run(["logits", "probs"], {"clips": inputs.numpy()})
        assert logits.shape == probs.shape == (batch, 4)
        np.testing.assert_allclose(probs, scoring_probs(package, inputs), atol=1e-4, rtol=0)
    props = {prop.key: prop.value for prop in onnx.load(str(out)).metadata_props}
    assert json.loads(props["uniformer.class_names"]) == CLASSES
    assert (props["uniformer.frames"], props["uniformer.crop_size"], props["uniformer.num_classes"]) == ("8", "32", "4")
    normalization = json.loads(props["uniformer.normalization"])
    assert normalization["name"] == "slowfast" and normalization["mean"] == [0.45] * 3
    identity = json.loads(props["uniformer.model"])
    assert identity["name"] == "motion" and len(identity["package_sha256"]) == 64


def test_torchscript_gives_the_same_probabilities_and_carries_the_same_metadata(package, tmp_path):
    out = tmp_path / "nested" / "motion.pt"
    result = export("--model", str(package), "--format", "torchscript", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert reported_difference(result.output) <= 1e-4 and no_partial_files(out.parent)
    extra = {jobs.export.TORCHSCRIPT_METADATA: ""}
    module = torch.jit.load(str(out), _extra_files=extra)
    metadata = json.loads(extra[jobs.export.TORCHSCRIPT_METADATA])
    assert json.loads(metadata["uniformer.class_names"]) == CLASSES and metadata["uniformer.crop_size"] == "32"
    assert json.loads(metadata["uniformer.normalization"])["std"] == [0.225] * 3
    inputs = clips(3)
    with torch.no_grad():
        logits, probs = module(inputs)
    np.testing.assert_allclose(probs.numpy(), scoring_probs(package, inputs), atol=1e-4, rtol=0)
    np.testing.assert_allclose(torch.softmax(logits, -1).numpy(), probs.numpy(), atol=1e-6)


def test_a_registered_model_by_alias_is_exported_and_logged_into_its_run(package, mlflow_server, tmp_path):
    name = f"export-{uuid.uuid4().hex[:8]}"
    client = mlflow.MlflowClient(mlflow_server.uri)
    run_id = client.create_run(client.create_experiment(f"export-tests-{uuid.uuid4().hex[:8]}")).info.run_id
    _, version = log_model(run_id, str(package / "model.safetensors"), CARD, mlflow_server.uri, register_as=name)
    client.set_registered_model_alias(name, "champion", str(version))
    out = tmp_path / "champion.pt"
    result = export("--model", f"models:/{name}@champion", "--format", "torchscript", "--out", str(out),
                    "--tracking-uri", mlflow_server.uri, "--log-artifact")
    assert result.exit_code == 0, result.output
    assert "logged as " in result.output and "/export/champion.pt" in result.output
    assert [a.path for a in client.list_artifacts(run_id, "export")] == ["export/champion.pt"]
    logged = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="export/champion.pt",
                                                 dst_path=str(tmp_path / "download"), tracking_uri=mlflow_server.uri)
    assert open(logged, "rb").read() == out.read_bytes()
    extra = {jobs.export.TORCHSCRIPT_METADATA: ""}
    torch.jit.load(str(out), _extra_files=extra)
    identity = json.loads(json.loads(extra[jobs.export.TORCHSCRIPT_METADATA])["uniformer.model"])
    assert (identity["name"], identity["version"], identity["alias"], identity["run_id"]) == (
        name, version, "champion", run_id)


def test_an_onnx_file_that_disagrees_with_pytorch_fails_and_leaves_nothing(package, tmp_path, monkeypatch):
    corrupted = []
    write = jobs.export._write_onnx

    def write_corrupt(wrapper, example, metadata, path):
        write(wrapper, example, metadata, path)
        graph = onnx.load(path)
        [bias] = [tensor for tensor in graph.graph.initializer if tensor.name.endswith("head.fc.bias")]
        values = onnx.numpy_helper.to_array(bias) + 0.5  # the head's bias shifted: logits off by 0.5
        bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
        onnx.save(graph, path)
        corrupted.append(bias.name)

    monkeypatch.setattr(jobs.export, "_write_onnx", write_corrupt)
    out = tmp_path / "motion.onnx"
    result = export("--model", str(package), "--format", "onnx", "--out", str(out))
    assert corrupted and result.exit_code == 1, result.output
    [line] = result.output.strip().splitlines()[-1:]
    assert line.startswith("export failed: the onnx file's outputs differ from PyTorch's by 0.5")
    assert not out.exists() and no_partial_files(tmp_path)


def test_a_failed_check_leaves_an_existing_file_as_it_was(package, tmp_path, monkeypatch):
    monkeypatch.setattr(jobs.export, "TOLERANCE", -1.0)  # no difference passes, not even 0
    out = tmp_path / "motion.pt"
    out.write_bytes(b"the previous export")
    result = export("--model", str(package), "--format", "torchscript", "--out", str(out))
    assert result.exit_code == 1 and "(> -1)" in result.output, result.output
    assert out.read_bytes() == b"the previous export" and no_partial_files(tmp_path)


def test_onnx_without_its_packages_names_the_extra_and_a_local_folder_cannot_be_logged(package, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    out = tmp_path / "motion.onnx"
    result = export("--model", str(package), "--format", "onnx", "--out", str(out))
    assert result.exit_code == 2, result.output
    assert "onnx needs onnxruntime: install the `export` extra" in result.output and not out.exists()
    monkeypatch.undo()
    result = export("--model", str(package), "--format", "torchscript", "--out", str(out), "--log-artifact")
    assert result.exit_code == 2 and "needs a models:/ reference" in result.output and not out.exists()
    result = export("--model", str(package), "--format", "tflite", "--out", str(out))
    assert result.exit_code == 2 and "must be one of onnx, torchscript" in result.output


def test_an_out_that_cannot_be_written_fails_in_one_line(package, tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    result = export("--model", str(package), "--format", "torchscript", "--out", str(tmp_path / "taken" / "m.pt"))
    assert result.exit_code == 1 and result.output.startswith("export failed: "), result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.integration
def test_b16_at_224_by_8_frames_with_400_classes_exports_to_onnx_within_tolerance(tmp_path):
    card = ModelCard("uniformerv2_b16", 400, {}, [f"class {i}" for i in range(400)], 8, 224, 256)
    torch.manual_seed(0)
    save_package(model.create_model(card.model, card.num_classes), card, tmp_path / "b16")
    out = tmp_path / "b16.onnx"
    # one check: the export runs PyTorch and onnxruntime once each on 2 clips of [8, 224, 224, 3]
    result = export("--model", str(tmp_path / "b16"), "--format", "onnx", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert reported_difference(result.output) <= 1e-4
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [8, 224, 224, 3]
    assert [o.shape[1] for o in session.get_outputs()] == [400, 400]
    assert len(json.loads(session.get_modelmeta().custom_metadata_map["uniformer.class_names"])) == 400
