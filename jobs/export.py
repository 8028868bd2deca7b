"""`uniformer export`: a packaged model as one self-contained file for runtimes without this project: ONNX (through
`torch.onnx.export(dynamo=True)`, run by onnxruntime) or TorchScript (`torch.jit.trace`, run by libtorch).

What the file computes (`model.deploy.ClipClassifier`): input `clips`, uint8 `[batch, T, S, S, 3]` RGB pixels, T the
card's frames and S its crop size (frames resized to the card's short side and centre-cropped, as `score` decodes
them); outputs `logits` and `probs` (softmax), float32 `[batch, num_classes]`. The batch is dynamic; the pixel
normalisation the model was trained with is inside the graph, so the file needs no preprocessing constants.
The same facts, the class names and the model's identity are in the file's metadata: ONNX `metadata_props`, the
TorchScript archive's extra file `uniformer.json` (one JSON object with the same keys and string values).

Nothing is written unless the exported file agrees with PyTorch: it is written to a temporary file beside `out`,
loaded back (onnxruntime on CPU, or `torch.jit.load`), run on random clips of a batch other than the one exported
with, and renamed to `out` only when every logit and probability is within `tolerance` of the PyTorch model's.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from jobs.exitcodes import OptionError
from jobs.registry import ModelIdentity, resolve_model

FORMATS = ("onnx", "torchscript")
TOLERANCE = 1e-4  # max abs difference of logits and probabilities accepted between the file and PyTorch
VALIDATION_BATCH = 2  # clips the check runs; the export's example has another batch size, so the check runs the
# dynamic batch dimension at a size the export did not see
TORCHSCRIPT_METADATA = "uniformer.json"  # the TorchScript archive's extra file holding the metadata
# what the ONNX format needs besides torch, and the extra that installs it
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
EXTRA = "export"


class ExportError(RuntimeError):
    """The exported file failed its check, or could not be written or logged; nothing was left at `out`."""


@dataclass
class ExportResult:
    path: str
    format: str
    max_difference: float  # max abs difference of logits and probabilities, file vs PyTorch, on the check's clips
    seconds: float  # the whole command: resolving, exporting, checking, logging
    model: dict  # ModelIdentity.to_dict()
    artifact_uri: str | None = None  # where --log-artifact put it

    def to_dict(self) -> dict:
        return asdict(self)


def require_packages(export_format: str) -> None:
    """OptionError (exit 2) naming the extra to install when `export_format` needs packages that are not there."""
    if export_format not in FORMATS:
        raise OptionError("--format", f"must be one of {', '.join(FORMATS)}, not {export_format!r}")
    if export_format != "onnx":
        return
    missing = []
    for name in ONNX_PACKAGES:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise OptionError("--format", f"onnx needs {', '.join(missing)}: install the `{EXTRA}` extra "
                                      f"(pip install 'uniformer-pipeline[{EXTRA}]')")


def export_model(
    model: str,
    export_format: str,
    out: str,
    tracking_uri: str | None = None,
    log_artifact: bool = False,
    tolerance: float | None = None,
    seed: int = 0,
    echo: Callable[[str], None] = lambda line: None,
) -> ExportResult:
    """Export the package `model` (a models:/ reference or a package folder) as `export_format` to `out`, checked
    against PyTorch (`tolerance`: TOLERANCE when None); with `log_artifact`, also log it under `export/` of the run
    that logged the model."""
    import torch

    from model.deploy import ClipClassifier
    from model.package import load_package

    started = time.monotonic()
    tolerance = TOLERANCE if tolerance is None else tolerance
    require_packages(export_format)
    if log_artifact and not model.startswith("models:/"):
        raise OptionError("--log-artifact", "needs a models:/ reference: a local package folder has no MLflow run")
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.isdir(out):
        raise OptionError("--out", f"{out} is a folder; give the file to write")
    with tempfile.TemporaryDirectory() as scratch:
        resolved = resolve_model(model, scratch, tracking_uri)
        net, card = load_package(resolved.weights_path, resolved.config_path)
    wrapper = ClipClassifier(net).eval()
    metadata = export_metadata(card, resolved.identity, wrapper.normalization, export_format)
    generator = torch.Generator().manual_seed(seed)

    def clips(batch: int) -> torch.Tensor:
        shape = (batch, card.frames, card.crop_size, card.crop_size, 3)
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)

    os.makedirs(os.path.dirname(out), exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.", suffix=".partial", dir=os.path.dirname(out))
    os.close(handle)
    try:
        echo(f"exporting {resolved.identity.describe()} as {export_format}")
        inputs = clips(VALIDATION_BATCH)
        with torch.inference_mode():
            expected = [tensor.numpy() for tensor in wrapper(inputs)]
        if export_format == "onnx":
            _write_onnx(wrapper, clips(VALIDATION_BATCH + 1), metadata, partial)
            got = _run_onnx(partial, inputs.numpy(), metadata)
        else:
            _write_torchscript(wrapper, clips(1), metadata, partial)
            got = _run_torchscript(partial, inputs, metadata)
        difference = max_difference(expected, got)
        if not difference <= tolerance:  # NaN fails too
            raise ExportError(f"the {export_format} file's outputs differ from PyTorch's by {difference:.3g} "
                              f"(> {tolerance:g}) on {VALIDATION_BATCH} random clips; nothing written to {out}")
        os.chmod(partial, 0o666 & ~_umask())  # mkstemp's file is private; the export is an ordinary file
        os.replace(partial, out)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise
    artifact_uri = None
    if log_artifact:
        artifact_uri = _log_artifact(out, resolved.identity, tracking_uri)
    return ExportResult(out, export_format, difference, time.monotonic() - started, resolved.identity.to_dict(),
                        artifact_uri)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def export_metadata(card, identity: ModelIdentity, normalization: str, export_format: str) -> dict[str, str]:
    """The file's metadata, every value a string (ONNX metadata_props are)."""
    import torch

    from model.uniformerv2 import NORMALIZATIONS

    mean, std = NORMALIZATIONS[normalization]
    return {
        "uniformer.input": f"clips: uint8 [batch, {card.frames}, {card.crop_size}, {card.crop_size}, 3] RGB pixels: "
        f"frames resized to short side {card.short_side}, centre crop {card.crop_size}",
        "uniformer.outputs": f"logits, probs: float32 [batch, {card.num_classes}] (probs = softmax(logits))",
        "uniformer.normalization": json.dumps({
            "name": normalization, "mean": list(mean), "std": list(std),
            "applied": "inside the graph: (pixels / 255 - mean) / std per RGB channel",
        }),
        "uniformer.class_names": json.dumps(card.class_names),
        "uniformer.num_classes": str(card.num_classes),
        "uniformer.frames": str(card.frames),
        "uniformer.crop_size": str(card.crop_size),
        "uniformer.short_side": str(card.short_side),
        "uniformer.architecture": json.dumps({"model": card.model, "overrides": card.overrides}),
        "uniformer.model": json.dumps(identity.to_dict()),
        "uniformer.exported_by": f"uniformer export --format {export_format}, torch {torch.__version__}",
    }


def max_difference(expected: list[np.ndarray], got: list[np.ndarray]) -> float:
    """Max abs difference over every output; inf when the shapes differ, NaN when any value is NaN."""
    if len(expected) != len(got) or any(a.shape != b.shape for a, b in zip(expected, got)):
        return float("inf")
    return max(float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) for a, b in zip(expected, got))


def _write_onnx(wrapper, example, metadata: dict[str, str], path: str) -> None:
    import torch

    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper, (example,), dynamo=True, input_names=["clips"], output_names=["logits", "probs"],
            dynamic_shapes={"clips": {0: batch}}, verbose=False,
        )
    program.model.metadata_props.update(metadata)
    program.save(path, external_data=False)  # one file (up to protobuf's 2 GB: every named model fits)


def _run_onnx(path: str, clips: np.ndarray, metadata: dict[str, str]) -> list[np.ndarray]:
    import onnx
    import onnxruntime

    onnx.checker.check_model(path)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    stored = session.get_modelmeta().custom_metadata_map
    if any(stored.get(key) != value for key, value in metadata.items()):
        raise ExportError(f"the onnx file lost its metadata: {sorted(set(metadata) - set(stored))}")
    return session.run(["logits", "probs"], {"clips": clips})


def _write_torchscript(wrapper, example, metadata: dict[str, str], path: str) -> None:
    import torch

    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes on shape checks it records as constants
        traced = torch.jit.trace(wrapper, (example,), check_trace=False)
        torch.jit.save(traced, path, _extra_files={TORCHSCRIPT_METADATA: json.dumps(metadata, indent=1)})


def _run_torchscript(path: str, clips, metadata: dict[str, str]) -> list[np.ndarray]:
    import torch

    extra = {TORCHSCRIPT_METADATA: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice: libtorch still loads these
        module = torch.jit.load(path, map_location="cpu", _extra_files=extra)
    if json.loads(extra[TORCHSCRIPT_METADATA] or "{}") != metadata:
        raise ExportError("the torchscript file lost its metadata")
    with torch.inference_mode():
        return [tensor.numpy() for tensor in module(clips)]


def _log_artifact(path: str, identity: ModelIdentity, tracking_uri: str | None) -> str:
    import mlflow
    from mlflow.exceptions import MlflowException

    from jobs.credentials import redact

    if identity.run_id is None:
        raise ExportError(f"wrote {path}, but {identity.uri} has no run to log it into")
    client = mlflow.MlflowClient(tracking_uri)
    try:
        client.log_artifact(identity.run_id, path, artifact_path="export")
        root = client.get_run(identity.run_id).info.artifact_uri
    except (MlflowException, OSError) as error:
        raise ExportError(f"wrote {path}, but could not log it into run {identity.run_id}: "
                          f"{redact(str(error))}") from None
    return f"{root.rstrip('/')}/export/{os.path.basename(path)}"
