"""The main path at the shapes users run, through the CLI: UniFormerV2-B/16 at 224 x 8 frames with Kinetics-400's
400 classes, initialised from an OpenAI-layout TorchScript archive, videos and clips on the S3 server, two CPU
workers with activation checkpointing, a worker killed and the run resumed, registration, `evaluate` and scoring at
4x3 views. A few steps at these shapes find what the tiny config hides (figure sizes, memory, formats, timeouts)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import mlflow
import psutil
import pyarrow.fs as pafs
import pytest
import torch
import yaml
from typer.testing import CliRunner

import model
from jobs.cli import app
from jobs.train import final_checkpoint
from jobs.training import checkpoint as ckpt
from pipeline import load_manifest, write_motion_video
from tests.jobs.test_train import finished, in_background, train_worker_pids, wait_for_checkpoint
from tests.model.test_weights_formats import openai_archive

pytestmark = pytest.mark.integration

# Four Kinetics-400 class names the videos use, inside a 400-name label map in the order of the official one.
USED_CLASSES = {"abseiling": "left", "air drumming": "right", "juggling balls": "up", "zumba": "down"}
STEPS = 2  # 4 training clips, 2 workers x batch 1: one epoch


def kinetics_like_class_list() -> list[str]:
    fillers = [f"class {index:03d}" for index in range(400 - len(USED_CLASSES))]
    return sorted([*USED_CLASSES, *fillers])


def write_videos(folder: Path, names: list[tuple[str, str]], seed: int) -> list[str]:
    """(class, file name) pairs as 320x240 mp4s of 2 s; returns the 'path,label' CSV rows."""
    rows = []
    for index, (label, name) in enumerate(names):
        path = f"{label.replace(' ', '_')}/{name}.mp4"
        write_motion_video(folder / path, USED_CLASSES[label], size=(320, 240), fps=16, num_frames=32,
                           seed=seed + index)
        rows.append(f"{path},{label}")
    return rows


def cli(*args: str, endpoint: str | None = None, exit_codes: tuple[int, ...] = (0,)) -> str:
    started = time.monotonic()
    result = CliRunner().invoke(app, [*args, *(["--endpoint-url", endpoint] if endpoint else [])],
                                catch_exceptions=False)
    assert result.exit_code in exit_codes, result.output
    STAGE_SECONDS[args[0]] = STAGE_SECONDS.get(args[0], 0.0) + time.monotonic() - started
    return result.stdout


STAGE_SECONDS: dict[str, float] = {}


class PeakWorkerMemory:
    """The largest resident set of any Ray Train worker process, sampled twice a second in a thread."""

    def __init__(self):
        self.peak = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stopped.wait(0.5):
            for pid in train_worker_pids():
                try:
                    self.peak = max(self.peak, psutil.Process(pid).memory_info().rss)
                except psutil.NoSuchProcess:
                    pass

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()


def logged_model_bytes(client, model_id: str, path: str | None = None) -> int:
    return sum(
        logged_model_bytes(client, model_id, entry.path) if entry.is_dir else entry.file_size
        for entry in client.list_logged_model_artifacts(model_id, path)
    )


def s3_bytes(s3_server, uri: str) -> dict[str, int]:
    fs = pafs.S3FileSystem(endpoint_override=s3_server.endpoint_url, scheme="http")
    infos = fs.get_file_info(pafs.FileSelector(uri.removeprefix("s3://"), recursive=True))
    return {info.path: info.size for info in infos if info.type == pafs.FileType.File}


# about 7 min alone on this 2-core machine (B/16 forwards at 12 views a video): room for a machine loaded by CI
@pytest.mark.timeout(1800)
def test_b16_kinetics_shapes_from_an_openai_archive_through_train_resume_register_evaluate_score(
    tmp_path, s3_server, s3_bucket, mlflow_server, ray_local, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    bucket = f"s3://{s3_bucket}"
    train_rows = write_videos(tmp_path / "train", [(label, "a") for label in USED_CLASSES], seed=1)
    # one validation video: evaluate, score and the gate each run its 12 B/16 views (about 45 s a video here)
    val_rows = write_videos(tmp_path / "val", [("abseiling", "v")], seed=20)
    (tmp_path / "train" / "labels.csv").write_text("path,label\n" + "\n".join(train_rows) + "\n")
    (tmp_path / "val" / "labels.csv").write_text("path,label\n" + "\n".join(val_rows) + "\n")
    (tmp_path / "classes.txt").write_text("\n".join(kinetics_like_class_list()) + "\n")
    for name in ("train", "val"):
        s3_server.upload_folder(tmp_path / name, s3_bucket, f"videos/{name}")
    s3_server.client().upload_file(str(tmp_path / "classes.txt"), s3_bucket, "meta/classes.txt")

    for name in ("train", "val"):
        cli("ingest", f"{bucket}/videos/{name}", "--out", f"{bucket}/clips/{name}",
            "--labels", f"{bucket}/videos/{name}/labels.csv", "--classes", f"{bucket}/meta/classes.txt",
            "--frames", "8", "--size", "224", "--short-side", "256", endpoint=s3_server.endpoint_url)
    manifest = load_manifest(f"{bucket}/clips/train", endpoint_url=s3_server.endpoint_url)
    assert len(manifest.class_names) == 400 and manifest.num_clips == 4
    shard_bytes = sum(size for path, size in s3_bytes(s3_server, f"{bucket}/clips/train").items()
                      if path.endswith(".parquet") and "/shards/" in path)

    # OpenAI's ViT-B/16 file layout: a traced TorchScript archive of fp16 weights (random ones: nothing downloads)
    torch.manual_seed(0)
    archive = tmp_path / "ViT-B-16.pt"
    openai_archive(archive, None, config_name="uniformerv2_b16")
    inspected = cli("weights", "inspect", str(archive), "--model", "uniformerv2_b16")
    assert "width=768, layers=12, patch_size=16, input_resolution=224" in inspected
    assert "loaded        149 tensors" in inspected and "inflated      conv1.weight" in inspected

    runs = tmp_path / "runs"
    train_args = [
        "train", "--data", f"{bucket}/clips/train", "--val", f"{bucket}/clips/val", "--model", "uniformerv2_b16",
        "--pretrained", str(archive), "--workers", "2", "--batch-size", "1", "--epochs", "1",
        "--max-steps", str(STEPS), "--checkpoint-every", "1", "--activation-checkpointing", "--augment", "recipe",
        "--max-failures", "2", "--storage", str(runs), "--experiment", "real-shapes", "--register-as", "k400-b16",
    ]
    # a worker is killed after the first checkpoint: the run resumes from it on a restarted worker group
    thread, outcome = in_background(lambda: cli(*train_args, endpoint=s3_server.endpoint_url))
    peak_rss = PeakWorkerMemory()
    deadline = time.monotonic() + 300
    while not list(runs.glob("*/")) and time.monotonic() < deadline:
        time.sleep(0.2)
    run_dir = next(runs.glob("*/"))
    assert wait_for_checkpoint(run_dir) < STEPS
    victims = train_worker_pids()
    assert victims, "no Ray Train worker process found"
    os.kill(victims[-1], signal.SIGKILL)
    train_stdout = finished(thread, outcome, timeout_s=900)
    peak_rss.stop()
    assert not psutil.pid_exists(victims[-1])
    assert "registered k400-b16 version 1" in train_stdout
    assert not ckpt.orphaned_staging_directories()  # 1.6 GB a kill at B/16 would otherwise leave on the node

    client = mlflow.MlflowClient(mlflow_server.uri)
    version = client.get_model_version("k400-b16", "1")
    run = client.get_run(version.run_id)
    assert run.data.metrics["global_step"] == STEPS
    history = client.get_metric_history(version.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))  # each step once across the restart
    plots = [artifact for artifact in client.list_artifacts(version.run_id, "plots")]
    assert not any("confusion" in artifact.path and artifact.path.endswith(".png") for artifact in plots)
    _, checkpoint = final_checkpoint(str(runs), run_dir.name)
    with checkpoint.as_directory() as directory:
        checkpoint_bytes = sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())
    # MLflow 3 names the logged model in the version's source (models:/m-...); its model_id field may stay empty
    model_bytes = logged_model_bytes(client, version.model_id or version.source.removeprefix("models:/"))
    assert model_bytes > 4 * model.count_parameters("uniformerv2_b16", 400) * 0.99  # fp32 weights, all of them

    evaluation = json.loads(cli("evaluate", "--data", f"{bucket}/clips/val", "--model", "models:/k400-b16/1",
                                "--views", "4x3", "--json", endpoint=s3_server.endpoint_url))
    assert evaluation["views"] == "4x3" and evaluation["videos"] == 1 and not evaluation["failed"]
    assert {"accuracy", "top5_accuracy", "mean_class_accuracy", "loss"} <= set(evaluation["metrics"])

    cli("score", f"{bucket}/videos/val", "--model", "models:/k400-b16/1", "--out", f"{bucket}/scores",
        "--views", "4x3", endpoint=s3_server.endpoint_url)
    scores = [path for path in s3_bytes(s3_server, f"{bucket}/scores") if path.endswith(".parquet")]
    assert scores

    # a retrain on one new video: the candidate starts from the champion, and the gate judges it at 4x3 against the
    # champion's figures that `evaluate` kept on its version
    client.set_registered_model_alias("k400-b16", "champion", "1")
    train_rows += write_videos(tmp_path / "train", [("juggling balls", "b")], seed=40)
    (tmp_path / "train" / "labels.csv").write_text("path,label\n" + "\n".join(train_rows) + "\n")
    s3_server.upload_folder(tmp_path / "train", s3_bucket, "videos/train")
    retrain = {
        "source": f"{bucket}/videos/train", "dataset": f"{bucket}/clips/train", "model_name": "k400-b16",
        "val": f"{bucket}/clips/val", "gate_views": "4x3", "endpoint_url": s3_server.endpoint_url,
        "train": {"model": "uniformerv2_b16", "workers": 2, "batch_size": 1, "epochs": 1, "max_steps": 1,
                  "activation_checkpointing": True, "storage": str(tmp_path / "retrain-runs")},
        "ingest": {"labels": f"{bucket}/videos/train/labels.csv", "classes": f"{bucket}/meta/classes.txt",
                   "frames": 8, "size": 224, "short_side": 256},
    }
    (tmp_path / "retrain.yaml").write_text(yaml.safe_dump(retrain))
    outcome = json.loads(cli("retrain", "--config", str(tmp_path / "retrain.yaml"), "--json", exit_codes=(0, 4)))
    decision = outcome["decision"]
    assert decision["champion_version"] == 1 and decision["candidate_version"] == 2 and decision["views"] == "4x3"
    assert outcome["exit_code"] == (0 if decision["promoted"] else 4)
    assert decision["promoted"] == (decision["candidate_score"] > decision["champion_score"])
    assert client.get_model_version_by_alias("k400-b16", "champion").version == ("2" if decision["promoted"] else "1")

    print(json.dumps({
        "stage_seconds": {name: round(seconds, 1) for name, seconds in STAGE_SECONDS.items()},
        "bytes_per_stored_clip": shard_bytes // manifest.num_clips,
        "checkpoint_bytes": checkpoint_bytes,
        "registered_model_bytes": model_bytes,
        "peak_worker_rss_bytes": peak_rss.peak,
        "plots": {artifact.path: artifact.file_size for artifact in plots},
        "params": model.count_parameters("uniformerv2_b16"),
    }))
