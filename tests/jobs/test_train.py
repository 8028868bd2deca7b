"""Ray Train training end to end: real local Ray, a real `mlflow server`, checkpoints on local disk and on the
S3-compatible server, workers killed from outside the training function."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import psutil
import pytest
import torch
from safetensors.torch import load_file

from jobs.config import build
from jobs.ingest import run_ingest
from jobs.options import IngestConfig, RegisterConfig
from jobs.train import (
    RunInProgress,
    TrainingFailed,
    final_checkpoint,
    register_run,
    run_checkpoints,
    run_train,
    select_checkpoints,
)
from jobs.training import checkpoint as ckpt
from jobs.training.config import TrainConfig
from pipeline import generate_motion_dataset, iter_clips
from tests.conftest import MlflowServer, start_local_ray, two_node_ray

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def motion_dataset(tmp_path_factory) -> str:
    """Synthetic motion videos ingested as 8-frame clips of 40 px squares (32 px model crops)."""
    root = tmp_path_factory.mktemp("train-data")
    generate_motion_dataset(root / "videos", num_per_class=200, size=(40, 40), num_frames=16, seed=11)
    start_local_ray()
    run_ingest(
        build(
            IngestConfig,
            dict(
                src=str(root / "videos"),
                out=str(root / "clips"),
                labels_from_dirs=True,
                frames=8,
                size=32,
                short_side=40,
            ),
        )
    )
    return str(root / "clips")


def small_config(data: str, tmp_path: Path, tracking_uri: str, **overrides) -> TrainConfig:
    values = dict(
        data=data, model="uniformerv2_tiny", workers=2, epochs=1, batch_size=8, lr=1e-3, warmup_epochs=0.2,
        hflip=False, augment="crop", storage=str(tmp_path / "runs"), tracking_uri=tracking_uri, seed=5,
    )
    values.update(overrides)
    return TrainConfig(**values)


def train_worker_pids(node=None) -> list[int]:
    """Ray Train worker processes on one Ray node (default: this session's local Ray), not anyone else's."""
    import ray

    node = node or ray._private.worker._global_node
    raylet = node.all_processes["raylet"][0].process.pid
    pids = []
    for child in psutil.Process(raylet).children(recursive=True):
        try:
            command = " ".join(child.cmdline())
        except (psutil.ZombieProcess, psutil.NoSuchProcess):  # exited between the listing and the read: not running
            continue
        if "RayTrainWorker" in command:
            pids.append(child.pid)
    return pids


def in_background(job) -> tuple[threading.Thread, dict]:
    """Runs `job()` in a thread; the dict gets "result" or "error"."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = job()
        except Exception as error:  # re-raised by the test through outcome
            outcome["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def train_in_background(cfg: TrainConfig) -> tuple[threading.Thread, dict]:
    return in_background(lambda: run_train(cfg))


def finished(thread: threading.Thread, outcome: dict, timeout_s: float = 600):
    thread.join(timeout=timeout_s)
    assert not thread.is_alive(), "the job did not finish"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def final_weights(storage: Path, run_name: str) -> dict:
    with final_checkpoint(str(storage), run_name)[1].as_directory() as directory:
        return load_file(os.path.join(directory, "model.safetensors"))


# A short pinned run with checkpoints every 4 steps, interrupted by the tests below and compared with an uninterrupted
# run of the same seed. Pinned to a version up front: the run name (the checkpoint folder they watch) covers it.
RESUMED_STEPS = 24
RESUMED_RUN = dict(max_steps=RESUMED_STEPS, checkpoint_every=4, epochs=3, experiment="resume")


@pytest.fixture(scope="module")
def uninterrupted_weights(motion_dataset, tmp_path_factory, mlflow_server) -> dict:
    root = tmp_path_factory.mktemp("uninterrupted")
    start_local_ray()
    reference = run_train(small_config(f"{motion_dataset}@1", root, mlflow_server.uri, **RESUMED_RUN))
    return final_weights(root / "runs", reference.run_name)


def assert_resumed_exactly(result, tmp_path: Path, mlflow_server, uninterrupted_weights: dict) -> None:
    """K steps in all, each step logged once to MLflow, and the weights of the uninterrupted run."""
    assert result.metrics["global_step"] == RESUMED_STEPS
    history = mlflow.MlflowClient(mlflow_server.uri).get_metric_history(result.mlflow_run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, RESUMED_STEPS + 1))
    actual = final_weights(tmp_path / "runs", result.run_name)
    for key, expected in uninterrupted_weights.items():
        torch.testing.assert_close(actual[key], expected, rtol=1e-6, atol=1e-7, msg=key)


def wait_for_checkpoint(run_dir: Path, timeout_s: float = 300) -> int:
    """Waits for the first checkpoint of a run and returns its step."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for progress in run_dir.glob("checkpoint_*/progress.json"):
            try:
                return json.loads(progress.read_text())["global_step"]
            except ValueError:  # still being written
                pass
        time.sleep(0.05)
    raise TimeoutError(f"no checkpoint appeared under {run_dir}")


def test_two_workers_learn_motion_and_register_a_loadable_model(motion_dataset, tmp_path, mlflow_server):
    cfg = small_config(motion_dataset, tmp_path, mlflow_server.uri, epochs=20, batch_size=16, lr=2e-3,
                       register_as="motion-classifier", experiment="learn")
    result = run_train(cfg)

    assert result.metrics["val_accuracy"] >= 0.9, result.metrics
    assert result.registered_version == 1
    client = mlflow.MlflowClient(mlflow_server.uri)
    version = client.get_model_version("motion-classifier", "1")
    assert version.tags["dataset_version"] == "1" and float(version.tags["val_accuracy"]) >= 0.9
    # the best epoch end is registered (--select best, the default), and the version says which
    (final_progress, _), (chosen_progress, chosen) = select_checkpoints(cfg.storage, result.run_name, "best")
    assert version.tags["checkpoint_selected"] == "best"
    assert version.tags["checkpoint_global_step"] == str(chosen_progress["global_step"])
    assert chosen_progress["metrics"]["val_accuracy"] >= result.metrics["val_accuracy"]
    assert chosen_progress["metrics"]["val_accuracy"] == max(
        p["metrics"]["val_accuracy"] for p, _ in run_checkpoints(cfg.storage, result.run_name) if p["metrics"])
    run = client.get_run(result.mlflow_run_id)
    assert run.data.params["model"] == "uniformerv2_tiny" and run.data.tags["dataset"].endswith("@1")
    # ended, and says who ran what, as mlflow.start_run would
    assert run.info.status == "FINISHED" and run.info.end_time
    assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.type"] == "LOCAL"
    assert run.data.tags["uniformer.entry_point"] == "train"
    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id, "plots")}
    assert "plots/curves.png" in artifacts and "plots/confusion_epoch_019.png" in artifacts

    # the registered pyfunc predicts on the stored clip format (rows of top-k and, asked for, every probability), and
    # agrees with the checkpoint's weights
    mlflow.set_tracking_uri(mlflow_server.uri)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        served = mlflow.pyfunc.load_model("models:/motion-classifier/1")
    assert not [w for w in caught if "type hints" in str(w.message)], [str(w.message) for w in caught]
    rows = list(iter_clips(motion_dataset, columns=["frames", "label"]))[:6]
    clips = np.stack([row["frames"] for row in rows])
    rows = served.predict(clips, params={"full_probs": True})
    assert rows["error"].isna().all() and [len(names) for names in rows["top_k_names"]] == [4] * 6
    probabilities = np.stack(rows["probs"])
    assert probabilities.shape == (6, 4)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)

    import model

    net = model.create_model("uniformerv2_tiny", num_classes=4, t_size=8)
    with chosen.as_directory() as directory:
        net.load_state_dict(load_file(os.path.join(directory, "model.safetensors")))
    # pixels normalised as the official code does (PySlowFast's mean and std), which the registered model records
    normalized = (torch.from_numpy(clips[:, :, 4:36, 4:36]).float() / 255.0 - 0.45) / 0.225
    with torch.no_grad():
        direct = torch.softmax(net.eval()(normalized.permute(0, 4, 1, 2, 3)), dim=-1).numpy()
    np.testing.assert_allclose(probabilities, direct, atol=1e-5)
    assert served.unwrap_python_model().card.overrides["input_normalization"] == "slowfast"

    # videos it was trained on, as a serving client sends them (bytes, or paths), decoded as score decodes them: named
    sources = [path for folder in sorted((Path(motion_dataset).parent / "videos").iterdir())
               for path in sorted(folder.glob("*.mp4"))[:3]]
    as_bytes = served.predict(pd.DataFrame({"video": [path.read_bytes() for path in sources]}), params={"top_k": 2})
    as_paths = served.predict([str(path) for path in sources], params={"top_k": 2})
    assert as_bytes["error"].isna().all() and as_bytes["top_k_probs"].tolist() == as_paths["top_k_probs"].tolist()
    named = [names[0] == path.parent.name for names, path in zip(as_paths["top_k_names"], sources)]
    assert sum(named) >= len(sources) - 2, list(zip(as_paths["top_k_names"], sources))


def test_relative_paths_reach_the_workers_as_the_driver_meant_them(motion_dataset, tmp_path, mlflow_server,
                                                                     monkeypatch):
    # Ray Train's workers run in a run folder of Ray's session: `./clips` there is another folder
    os.symlink(motion_dataset, tmp_path / "clips")
    monkeypatch.chdir(tmp_path)
    result = run_train(small_config("./clips@1", tmp_path, mlflow_server.uri, storage="./runs", max_steps=2))
    assert result.checkpoint.startswith(f"{tmp_path}/runs/")
    run = mlflow.MlflowClient(mlflow_server.uri).get_run(result.mlflow_run_id)
    assert run.data.params["data"] == f"{tmp_path}/clips@1" and run.info.status == "FINISHED"


def test_a_failed_training_fails_its_mlflow_run_and_tells_the_workers_error_in_one_paragraph(
    motion_dataset, tmp_path, mlflow_server
):
    not_weights = tmp_path / "weights.pt"
    not_weights.write_bytes(b"not a checkpoint")  # found by the driver, refused by the workers that load it
    cfg = small_config(f"{motion_dataset}@1", tmp_path, mlflow_server.uri, pretrained=str(not_weights),
                       max_failures=0, experiment="fails")
    with pytest.raises(TrainingFailed) as failed:
        run_train(cfg)
    message = str(failed.value)
    assert "\n" not in message and "Traceback" not in message, message
    # each worker that failed, by rank, with its own error (Ray may report one rank or both: both fail alike)
    assert f"training run {cfg.name}" in message, message
    assert re.search(r"failed: rank [01]: ValueError: .*weights\.pt: cannot be read as tensors only", message), message
    client = mlflow.MlflowClient(mlflow_server.uri)
    [run] = client.search_runs([client.get_experiment_by_name("fails").experiment_id])
    assert run.info.status == "FAILED" and run.info.end_time  # not RUNNING forever


def test_two_identical_train_commands_started_at_once_train_one_run(motion_dataset, tmp_path, mlflow_server):
    start_local_ray()
    commands = [train_in_background(small_config(f"{motion_dataset}@1", tmp_path, mlflow_server.uri,
                                                 experiment="twice")) for _ in range(2)]
    while all(thread.is_alive() for thread, _ in commands):
        time.sleep(0.05)
    (loser, refused), (winner, outcome) = sorted(commands, key=lambda command: command[0].is_alive())
    assert winner.is_alive(), "the second command waited for the first instead of failing at once"
    assert isinstance(refused.get("error"), RunInProgress), refused
    result = finished(winner, outcome)
    assert f"training run {result.run_name} is already being trained" in str(refused["error"])
    client = mlflow.MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("twice").experiment_id
    assert [run.info.run_id for run in client.search_runs([experiment])] == [result.mlflow_run_id]


def test_worker_killed_mid_run_resumes_with_exact_steps_and_weights(
    motion_dataset, uninterrupted_weights, tmp_path, mlflow_server
):
    start_local_ray()
    cfg = small_config(f"{motion_dataset}@1", tmp_path, mlflow_server.uri, max_failures=2, **RESUMED_RUN)
    thread, outcome = train_in_background(cfg)
    assert wait_for_checkpoint(tmp_path / "runs" / cfg.name) < RESUMED_STEPS
    victims = train_worker_pids()
    assert victims, "no Ray Train worker process found"
    os.kill(victims[-1], signal.SIGKILL)  # a real process kill, from outside the training function
    result = finished(thread, outcome)
    assert not psutil.pid_exists(victims[-1])
    assert_resumed_exactly(result, tmp_path, mlflow_server, uninterrupted_weights)
    assert not ckpt.orphaned_staging_directories()  # a killed rank 0's local checkpoint is not left on the node


def test_mlflow_down_at_the_end_keeps_the_checkpoint_and_register_finishes(
    motion_dataset, tmp_path, s3_server, s3_bucket, monkeypatch
):
    # fail fast instead of MLflow's minutes of retries against a stopped server
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    server = MlflowServer(tmp_path)
    storage = f"s3://{s3_bucket}/runs"
    cfg = small_config(motion_dataset, tmp_path, server.uri, workers=1, max_steps=4, checkpoint_every=2,
                       storage=storage, endpoint_url=s3_server.endpoint_url, register_as="late")
    try:
        thread, outcome = train_in_background(cfg)
        deadline = time.monotonic() + 300
        bucket = s3_server.client()
        while time.monotonic() < deadline and not bucket.list_objects_v2(Bucket=s3_bucket, Prefix="runs/").get("KeyCount"):
            time.sleep(0.2)
        while time.monotonic() < deadline and not any(
            "checkpoint_" in o["Key"] for o in bucket.list_objects_v2(Bucket=s3_bucket, Prefix="runs/").get("Contents", [])
        ):
            time.sleep(0.2)
        server.stop()
        with pytest.raises(RuntimeError) as failure:
            finished(thread, outcome)
        message = str(failure.value)
        assert "checkpoint is safe" in message and f"uniformer register --run {cfg.name}" in message
        assert "testing-secret-key" not in message
    finally:
        server.stop()

    restarted = MlflowServer(tmp_path)  # same sqlite file and artifacts
    try:
        model_uri, version = register_run(
            RegisterConfig(cfg.name, storage, tracking_uri=restarted.uri, endpoint_url=s3_server.endpoint_url)
        )
        assert version == 1 and model_uri.startswith("models:/")
        # repeating it registers nothing new
        assert (
            register_run(
                RegisterConfig(cfg.name, storage, tracking_uri=restarted.uri, endpoint_url=s3_server.endpoint_url)
            )[1]
            == 1
        )
    finally:
        restarted.stop()


def test_node_removed_mid_run_resumes_on_the_remaining_node(
    motion_dataset, uninterrupted_weights, tmp_path, mlflow_server, _ray_session_teardown
):
    # Head: 3 CPUs, worker node: 2. SPREAD puts one training worker on each node; once the worker node is gone both
    # workers fit on the head with a CPU left for their data readers.
    with two_node_ray(head_cpus=3, worker_cpus=2) as (cluster, worker_node):
        cfg = small_config(f"{motion_dataset}@1", tmp_path, mlflow_server.uri, max_failures=2,
                           placement_strategy="SPREAD", **RESUMED_RUN)
        thread, outcome = train_in_background(cfg)
        assert wait_for_checkpoint(tmp_path / "runs" / cfg.name) < RESUMED_STEPS
        assert len(train_worker_pids(cluster.head_node)) == 1 and len(train_worker_pids(worker_node)) == 1
        cluster.remove_node(worker_node, allow_graceful=False)  # the node dies: raylet and its workers killed
        result = finished(thread, outcome)
        assert len(train_worker_pids(cluster.head_node)) == 0  # the run ended; its restarted group was on the head
    assert_resumed_exactly(result, tmp_path, mlflow_server, uninterrupted_weights)
