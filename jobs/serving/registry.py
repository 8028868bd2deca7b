"""Logging a trained model to MLflow (weights + config + models-from-code pyfunc) and registering it."""

from __future__ import annotations

import os
import tempfile

import numpy as np

import model
from model.package import ModelCard

PYFUNC_SOURCE = os.path.join(os.path.dirname(__file__), "pyfunc_model.py")
MODEL_PACKAGE_DIR = os.path.dirname(model.__file__)


def model_versions(client, name: str) -> list:
    """Every registered version of model `name`; none when there is no such model."""
    # MLflow takes the text between matching quotes as is (no escapes): quote with a character the name does not
    # hold, so that a name like "x' AND name='y" is one literal and cannot pick another model's versions.
    quote = next((q for q in ("'", '"') if q not in name), None)
    if quote is None:
        raise ValueError(f"model name {name!r} holds both quote characters: MLflow cannot search for it")
    return client.search_model_versions(f"name={quote}{name}{quote}")


def pinned_requirements() -> list[str]:
    """What the pyfunc imports, at the versions that trained and logged it: a served model must not meet another
    torch or safetensors than the one its weights were checked against."""
    from importlib.metadata import version

    return [f"{package}=={version(package)}" for package in ("torch", "safetensors", "numpy", "mlflow")]


def input_example(card: ModelCard) -> np.ndarray:
    """One clip in the stored format the pyfunc takes (uint8 `[1, T, S, S, 3]`, S the stored square side): black
    frames, which say the shape and type without shipping anyone's video with the model."""
    return np.zeros((1, card.frames, card.short_side, card.short_side, 3), dtype=np.uint8)


def log_model(
    run_id: str,
    weights_path: str,
    card: ModelCard,
    tracking_uri: str,
    register_as: str | None = None,
    version_tags: dict | None = None,
    description: str | None = None,
):
    """Logs the model into run `run_id`; registers a new version of `register_as` when given, with `description`.

    Returns (model_uri, registered version number or None)."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    if register_as:
        done = [v for v in model_versions(client, register_as) if v.run_id == run_id]
        if done:  # a re-run after a completed registration registers nothing new
            return done[0].source, int(done[0].version)
    signature = ModelSignature(
        # unnamed tensors: predict() receives the clip array itself, not a {name: array} dict
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, card.frames, card.short_side, card.short_side, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, card.num_classes))]),
    )
    with tempfile.TemporaryDirectory() as directory:
        config_path = os.path.join(directory, model.package.CONFIG_FILE)
        with open(config_path, "w", encoding="utf-8") as handle:
            handle.write(card.to_json())
        # MLflow refuses to resume a run outside the process's active experiment: make the run's own one active
        mlflow.set_experiment(experiment_id=client.get_run(run_id).info.experiment_id)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=PYFUNC_SOURCE,
                artifacts={"weights": weights_path, "config": config_path},
                code_paths=[MODEL_PACKAGE_DIR],
                signature=signature,
                input_example=input_example(card),
                pip_requirements=pinned_requirements(),
            )
    version = None
    if register_as:
        registered = mlflow.register_model(info.model_uri, register_as, tags=version_tags or {})
        version = int(registered.version)
        if description:
            client.update_model_version(register_as, registered.version, description=description)
    return info.model_uri, version
