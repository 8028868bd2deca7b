"""`uniformer evaluate`: the field's figures, through the scoring pipeline's inference path, on a real mlflow server
and local Ray; figures kept on the model version so a champion is evaluated once per dataset version and views."""

from __future__ import annotations

import json
import math
import uuid

import mlflow
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import model
from jobs.cli import app
from jobs.config import build
from jobs.evaluate import EvaluationError, cached_evaluation, evaluate_model, score_rows
from jobs.ingest import run_ingest
from jobs.options import EvaluateConfig, IngestConfig
from jobs.registry import log_model, resolve_model
from model.inference import predict_views
from model.package import ModelCard, save_package
from pipeline import generate_motion_dataset
from pipeline.views import decode_views

CLASSES = ["down", "left", "right", "up"]
CARD = ModelCard("uniformerv2_tiny", 4, {"t_size": 8}, CLASSES, frames=8, crop_size=32, short_side=40)


def test_figures_from_prediction_rows():
    probs = {
        "a": [0.7, 0.1, 0.1, 0.1],  # class 0, right
        "b": [0.1, 0.2, 0.3, 0.4],  # class 1, wrong, in the top 5
        "c": [0.0, 0.0, 1.0, 0.0],  # class 2, right
    }
    labels = {"a": "down", "b": "left", "c": "right", "d": "up"}
    rows = [{"video_id": v, "probs": p, "error_type": None} for v, p in probs.items()]
    rows.append({"video_id": "d", "probs": None, "error_type": "VideoDecodeError", "error_message": "truncated"})
    metrics, per_class, failed = score_rows(rows, labels, CLASSES)
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["top5_accuracy"] == 1.0
    assert metrics["mean_class_accuracy"] == pytest.approx((1 + 0 + 1) / 3)
    assert metrics["loss"] == pytest.approx(-(math.log(0.7) + math.log(0.2) + math.log(1.0)) / 3)
    assert failed == [{"video_id": "d", "error_type": "VideoDecodeError", "message": "truncated"}]
    assert per_class["most_confused"] == [{"true": "left", "predicted": "up", "count": 1}]
    with pytest.raises(EvaluationError, match="does not know the dataset's classes"):
        score_rows(rows[:1], {"a": "sideways"}, CLASSES)


@pytest.mark.integration
def test_evaluate_a_registered_model_like_production_scores_it(tmp_path, mlflow_server, ray_local):
    videos, clips = tmp_path / "videos", str(tmp_path / "clips")
    generate_motion_dataset(videos, 2, size=(64, 48), num_frames=16, seed=11)
    run_ingest(
        build(IngestConfig, dict(src=str(videos), out=clips, labels_from_dirs=True, frames=8, short_side=40, size=32))
    )
    torch.manual_seed(0)
    net = model.create_model(CARD.model, CARD.num_classes, **CARD.overrides).eval()
    save_package(net, CARD, tmp_path / "package")
    name = f"eval-{uuid.uuid4().hex[:8]}"
    client = mlflow.MlflowClient(mlflow_server.uri)
    run_id = client.create_run(client.create_experiment(f"eval-{uuid.uuid4().hex[:8]}")).info.run_id
    log_model(run_id, str(tmp_path / "package" / "model.safetensors"), CARD, mlflow_server.uri, register_as=name)
    mlflow.set_tracking_uri(mlflow_server.uri)
    pinned = open(mlflow.pyfunc.get_model_dependencies(f"models:/{name}/1")).read().split()
    # the served model meets the torch and safetensors it was logged with
    assert {line.split("==")[0] for line in pinned if "==" in line} >= {"torch", "safetensors", "numpy", "mlflow"}

    experiment = f"evaluations-{uuid.uuid4().hex[:8]}"
    evaluation = evaluate_model(
        EvaluateConfig(
            f"{clips}@1", f"models:/{name}/1", views="2x3", tracking_uri=mlflow_server.uri, experiment=experiment
        )
    )

    # the same figures as the model run directly on each video's 2x3 views
    labels, expected = [], []
    for path in sorted(videos.rglob("*.mp4")):
        views, _ = decode_views(str(path), frames=8, crop=32, short_side=32, temporal_views=2, spatial_views=3)
        expected.append(predict_views(net, torch.from_numpy(views)[None], 32)[0].numpy())
        labels.append(CLASSES.index(path.parent.name))
    expected, labels = np.stack(expected), np.array(labels)
    assert evaluation.videos == 8 and not evaluation.failed
    assert evaluation.metrics["accuracy"] == pytest.approx(float((expected.argmax(1) == labels).mean()))
    assert evaluation.metrics["loss"] == pytest.approx(
        float(-np.log(expected[np.arange(8), labels]).mean()), rel=1e-4)

    run = client.get_run(evaluation.mlflow_run_id)
    assert run.data.tags["dataset"] == f"{clips}@1" and run.data.tags["views"] == "2x3"
    assert run.data.metrics["accuracy"] == pytest.approx(evaluation.metrics["accuracy"])
    assert "evaluation/per_class.json" in {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}

    # kept on the version: the next evaluation on the same dataset version and views is read back, not recomputed
    identity = resolve_model(f"models:/{name}/1", str(tmp_path / "download"), mlflow_server.uri).identity
    cached = cached_evaluation(identity, f"{clips}@1", "2x3", mlflow_server.uri)
    assert cached is not None and cached.metrics == pytest.approx(evaluation.metrics)
    assert cached_evaluation(identity, f"{clips}@1", "1x1", mlflow_server.uri) is None

    result = CliRunner().invoke(app, ["evaluate", "--data", clips, "--model", f"models:/{name}/1", "--views", "2x3",
                                      "--json", "--tracking-uri", mlflow_server.uri, "--experiment", experiment])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["metrics"] == pytest.approx(evaluation.metrics) and printed["dataset"] == f"{clips}@1"
    assert "top-1 accuracy" in result.stderr

    unlabelled = str(tmp_path / "unlabelled")
    run_ingest(build(IngestConfig, dict(src=str(videos), out=unlabelled, frames=8, short_side=40, size=32)))
    refused = CliRunner().invoke(app, ["evaluate", "--data", unlabelled, "--model", f"models:/{name}/1",
                                       "--tracking-uri", mlflow_server.uri])
    assert refused.exit_code == 1 and "has no labels" in refused.stderr
