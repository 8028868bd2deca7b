"""What a person running the jobs sees: `uniformer ingest` and `uniformer train` as real commands (own processes,
own local Ray) against the session's mlflow server; the console shows the jobs' progress and not Ray's internals
unless -v asks; MLflow shows the run's datasets, system metrics and a registered version with its input example and
a description."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import mlflow
import pytest

import jobs.console
from jobs.cli import app
from jobs.console import NORMAL, QUIET, Pace, configure_logging, duration
from jobs.training.progress import ProgressBoard, RankZeroProgress, progress_line
from pipeline import generate_motion_dataset, load_manifest
from tests.conftest import REPO_ROOT

# What Ray printed on the console of every training run before: the cleaner actor's warning every few seconds (the
# state API it polls needs the dashboard), the controller's and workers' lines, Ray Data's execution lines.
RAY_INTERNALS = ("PlacementGroupCleaner", "Failed to query Ray Train Controller", "(TrainController",
                 "(RayTrainWorker", "Starting execution of Dataset", "Execution plan of Dataset")


def uniformer(*arguments: str, env: dict) -> str:
    """Runs `uniformer ARGUMENTS` as its own process and returns what it wrote on stdout and stderr together."""
    done = subprocess.run([sys.executable, "-m", "jobs.cli", *arguments], cwd=REPO_ROOT, env=env, timeout=600,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert done.returncode == 0, done.stdout
    return done.stdout


def test_durations_and_etas_read_as_people_write_them(monkeypatch):
    assert [duration(s) for s in (0, 42.4, 185, 7620)] == ["0s", "42s", "3m05s", "2h07m"]
    clock = iter([100.0, 130.0, 131.0, 134.0])  # 30 s of start-up before the first item, then 1 item per 2 s
    monkeypatch.setattr(jobs.console.time, "monotonic", lambda: next(clock))
    pace = Pace()
    assert pace.eta(0, 10) == "ETA -"  # nothing done
    assert pace.eta(1, 10) == "ETA -"  # the first item carries the start-up: no pace yet (not 9 x 30 s)
    assert pace.eta(1, 10) == "ETA -"
    assert pace.eta(3, 10) == "ETA 14s"  # 2 items in 4 s since the first: 7 left


def test_a_progress_line_carries_the_figures_of_its_window_and_the_last_validation():
    post = {"epoch": 1, "epochs": 10, "epoch_end": False, "step": 140, "total_steps": 480, "loss": 0.81234,
            "lr": 9.1e-4, "clips_per_s": 88.04, "data_wait_share": 0.021, "eta_s": 185.0,
            "validation": {"accuracy": 0.7123, "top5_accuracy": 0.99, "loss": 0.6421}}
    assert progress_line(post) == ("epoch 2/10  step 140/480  loss 0.8123  lr 9.10e-04  88.0 clips/s  data wait 2%  "
                                   "ETA 3m05s  val top-1 0.712 top-5 0.990 loss 0.642")
    assert progress_line({**post, "eta_s": None, "validation": None}).endswith("ETA -")
    nothing = {"accuracy": float("nan"), "top5_accuracy": float("nan"), "loss": float("nan")}
    assert progress_line({**post, "validation": nothing}).endswith("ETA 3m05s  no validation split")


@pytest.fixture
def console_logging():
    """configure_logging as the CLI calls it; the handler it adds to the root logger is taken away afterwards."""
    yield configure_logging
    configure_logging(NORMAL)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if type(h).__name__ == "_ConsoleHandler"]:
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)


def test_quiet_drops_progress_and_keeps_warnings(console_logging, capsys):
    console_logging(QUIET)
    logging.getLogger("jobs.train").info("epoch 1/2  step 4/8")
    logging.getLogger("jobs.train").warning("MLflow unavailable")
    console_logging(NORMAL)
    logging.getLogger("jobs.train").info("epoch 2/2  step 8/8")
    logging.getLogger("ray.train").info("Started training worker group")  # another library's info: -v only
    assert capsys.readouterr().err.splitlines() == ["WARNING [jobs.train] MLflow unavailable", "epoch 2/2  step 8/8"]


def test_the_console_follows_stderr_after_the_one_it_started_on_was_closed(console_logging, monkeypatch, tmp_path):
    import io

    with open(tmp_path / "captured", "w") as first:  # as a CLI command run in-process under a capture that ends
        monkeypatch.setattr(sys, "stderr", first)
        console_logging(NORMAL)
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("jobs.train").warning("could not renew the run lock")
    assert second.getvalue() == "WARNING [jobs.train] could not renew the run lock\n"


def test_verbose_and_quiet_together_are_a_usage_error():
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["-v", "-q", "models"])
    assert result.exit_code == 2 and "contradict" in result.output


@pytest.mark.integration
def test_rank_zero_posts_paced_figures_and_forwards_notices(ray_local):
    board = ray_local.remote(num_cpus=0)(ProgressBoard).remote()
    reporter = RankZeroProgress(board, True, epochs=2, total_steps=10, world=2, interval_s=0.0)
    try:
        reporter.steps([(1, {"train_loss": 2.0, "lr": 1e-4, "clips_per_s_per_worker": 5.0})], 0, 0.5)
        reporter.steps([(2, {"train_loss": 1.0, "lr": 2e-4}), (3, {"train_loss": 3.0, "lr": 3e-4,
                                                                     "clips_per_s_per_worker": 10.0})], 0, 0.25)
        logging.getLogger("jobs.training.loop").info("resumed at epoch 1 step 3 (global 3)")
        reporter.epoch_end([], 0, 3, 0.2, {"accuracy": 0.5, "top5_accuracy": 1.0, "loss": 0.7})
    finally:
        reporter.close()
    logging.getLogger("jobs.training.loop").info("after close: not forwarded")
    window, notice, epoch_end = ray_local.get(board.take.remote())
    # the first read-back starts the pace and posts nothing; the next posts its window's mean loss and all ranks' rate
    assert (window["step"], window["loss"], window["lr"], window["clips_per_s"]) == (3, 2.0, 3e-4, 20.0)
    assert window["eta_s"] > 0 and window["data_wait_share"] == 0.25 and window["validation"] is None
    assert notice == {"logger": "jobs.training.loop", "level": logging.INFO,
                      "message": "resumed at epoch 1 step 3 (global 3)"}
    # an epoch that ended on a read-back step still shows that window, and now the validation
    assert epoch_end["epoch_end"] and epoch_end["loss"] == 2.0 and epoch_end["validation"]["accuracy"] == 0.5

    silent = RankZeroProgress(board, False, epochs=2, total_steps=10, world=2, interval_s=0.0)  # another rank
    silent.steps([(4, {"train_loss": 1.0, "lr": 1e-4, "clips_per_s_per_worker": 1.0})], 0, 0.0)
    logging.getLogger("jobs.train").info("not rank 0's")
    assert ray_local.get(board.take.remote()) == []


@pytest.mark.integration
def test_train_console_shows_progress_not_ray_and_mlflow_shows_what_it_was_trained_on(tmp_path, mlflow_server):
    generate_motion_dataset(tmp_path / "videos", num_per_class=12, size=(40, 40), num_frames=16, seed=3)
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update(MLFLOW_TRACKING_URI=mlflow_server.uri, MLFLOW_EXPERIMENT_NAME="console-experiment",
               MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1")
    clips = str(tmp_path / "clips")

    ingested = uniformer("ingest", str(tmp_path / "videos"), "--out", clips, "--labels-from-dirs", "--frames", "8",
                         "--size", "32", "--short-side", "40", env=env)
    assert "clips/s  ETA" in ingested
    assert not [line for line in ingested.splitlines() if any(noise in line for noise in RAY_INTERNALS)]

    train = ["train", "--data", clips, "--model", "uniformerv2_tiny", "--workers", "2", "--epochs", "2",
             "--batch-size", "4", "--lr", "1e-3", "--no-hflip", "--augment", "crop", "--log-every", "1",
             "--storage", str(tmp_path / "runs"), "--register-as", "console-model"]
    printed = uniformer(*train, env=env)
    lines = printed.splitlines()
    steps = [line for line in lines if line.startswith("epoch ") and " loss " in line and " ETA " in line]
    assert any(line.startswith("epoch 1/2 ") and "step " in line and " clips/s " in line for line in steps), printed
    assert any(line.startswith("epoch 2/2 done  step ") and "val top-1 " in line for line in steps), printed
    assert not [line for line in lines if any(noise in line for noise in RAY_INTERNALS)], printed

    client = mlflow.MlflowClient(mlflow_server.uri)
    version = client.get_model_version("console-model", "1")
    run = client.get_run(version.run_id)
    assert client.get_experiment(run.info.experiment_id).name == "console-experiment"  # no --experiment given
    inputs = {tags["mlflow.data.context"]: (entry.dataset, tags) for entry in run.inputs.dataset_inputs
              for tags in [{tag.key: tag.value for tag in entry.tags}]}
    assert set(inputs) == {"training", "validation"}
    manifest = load_manifest(clips)
    assert sum(int(tags["clips"]) for _, tags in inputs.values()) == sum(shard.rows for shard in manifest.shards)
    for dataset, tags in inputs.values():
        assert json.loads(dataset.source)["uri"] == f"{clips}@1" and tags["version"] == "1"
        assert json.loads(dataset.profile)["clips"] == int(tags["clips"]) > 0
    assert inputs["training"][0].digest != inputs["validation"][0].digest  # two held-out splits of one version
    assert any(key.startswith("system/cpu_utilization") for key in run.data.metrics), run.data.metrics.keys()

    description = version.description
    assert f"trained on {clips}@1" in description and "validation" in description and "top-1 " in description
    for _, tags in inputs.values():
        assert f"{tags['clips']} clips" in description
    mlflow.set_tracking_uri(mlflow_server.uri)
    model = mlflow.models.Model.load(version.source)
    example = model.load_input_example(mlflow.artifacts.download_artifacts(version.source))
    # one short synthetic video's bytes (base64, as a JSON input example holds binary; MLflow predicted it when logging)
    assert list(example.columns) == ["video"] and len(example) == 1 and len(example["video"][0]) < 16_000

    # -v brings Ray's own lines back: Ray Data's execution lines of a second ingest (into a dataset of its own)
    verbose = uniformer("-v", "ingest", str(tmp_path / "videos"), "--out", str(tmp_path / "clips-verbose"),
                        "--labels-from-dirs", "--frames", "8", "--size", "32", "--short-side", "40", env=env)
    assert "Starting execution of Dataset" in verbose and "clips/s  ETA" in verbose, verbose
