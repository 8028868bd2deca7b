"""What registering a finished run says when it fails: MLflow or its artifact store out of reach is told as such, with
the checkpoint safe and the command that finishes the job (tests/jobs/test_train.py); any other error is raised as
itself. Real local Ray and a real MLflow server."""

from __future__ import annotations

import json
import os

import pytest

from jobs.config import build
from jobs.ingest import run_ingest
from jobs.options import IngestConfig, RegisterConfig
from jobs.train import final_checkpoint, register_run, run_train
from jobs.training.checkpoint import PROGRESS
from jobs.training.config import TrainConfig
from pipeline import generate_motion_dataset

pytestmark = pytest.mark.integration


def test_an_error_that_is_not_mlflows_is_raised_as_itself_not_as_mlflow_out_of_reach(tmp_path, mlflow_server,
                                                                                       ray_local):
    generate_motion_dataset(tmp_path / "videos", num_per_class=2, size=(40, 40), num_frames=16, seed=3)
    clips = str(tmp_path / "clips")
    run_ingest(
        build(
            IngestConfig,
            dict(src=str(tmp_path / "videos"), out=clips, labels_from_dirs=True, frames=8, size=32, short_side=40),
        )
    )
    storage = str(tmp_path / "runs")
    cfg = TrainConfig(data=clips, model="uniformerv2_tiny", workers=1, epochs=1, max_steps=2, batch_size=4,
                      hflip=False, augment="crop", storage=storage, tracking_uri=mlflow_server.uri,
                      experiment="register-errors", seed=5)
    assert run_train(cfg).model_uri  # logged at the end of the run

    # figures that do not format: the registration's own code fails, with MLflow up all along
    progress, checkpoint = final_checkpoint(storage, cfg.name)
    progress["metrics"]["val_loss"] = "n/a"
    with open(os.path.join(checkpoint.path, PROGRESS), "w") as handle:
        json.dump(progress, handle)
    with pytest.raises(ValueError, match="Unknown format code 'f'") as failure:
        register_run(
            RegisterConfig(cfg.name, storage, register_as="register-errors-again", tracking_uri=mlflow_server.uri)
        )
    assert "MLflow" not in str(failure.value)  # not told to wait for MLflow, which no re-run would mend
