"""Weeks of the shipped schedule, run as a team runs it: from a fresh working directory with relative paths only
(`./raw`, `./clips`, `./scores`, `sqlite:///mlflow.db`), through the CLI, with the commands and job configs that
infra/k8s ships (the RayJobs' and the CronJob's argv, infra/k8s/jobs/*.yaml), their paths rewritten to the test's
folders and their shapes to a CPU's (the tiny model on 40 px clips)."""

from __future__ import annotations

import csv
import json
import shlex
import shutil
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from jobs.cli import app
from pipeline import generate_motion_dataset
from pipeline.predictions import read_predictions
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration

K8S = REPO_ROOT / "infra" / "k8s"
MODEL = "k400-b16"  # the shipped configs' registered model and alias
CLIPS = {"frames": 8, "short_side": 40, "size": 32}  # uniformerv2_tiny's clips
VIDEO = {"size": (40, 40), "num_frames": 16}


def shipped_command(manifest: str, job: str) -> list[str]:
    """The `uniformer ...` argv a shipped manifest runs for `job`, its config file read from the working directory."""
    doc = yaml.safe_load((K8S / manifest).read_text())
    if doc["kind"] == "RayJob":
        argv = shlex.split(doc["spec"]["entrypoint"])
    else:  # the CronJob runs `uniformer --scheduled submit --wait retrain ...` as a Ray job: run what it submits
        (container,) = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
        argv = [arg for arg in container["command"] if arg not in ("submit", "--wait")]
    assert argv[0] == "uniformer" and job in argv, argv
    return [f"--config={job}.yaml" if arg.startswith("--config") else arg for arg in argv[1:] if
            arg != f"/etc/uniformer/{job}.yaml"]


def shipped_config(job: str, paths: dict, shapes: dict) -> dict:
    """infra/k8s/jobs/JOB.yaml with `paths` (the shipped value -> the test's) and `shapes` laid over it."""
    config = yaml.safe_load((K8S / "jobs" / f"{job}.yaml").read_text())

    def rewrite(values: dict) -> dict:
        out = {}
        for key, value in values.items():
            if isinstance(value, dict):
                out[key] = rewrite(value)
            else:
                out[key] = paths.get(value, value) if isinstance(value, str) else value
        return out

    config = rewrite(config)
    for key, value in shapes.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return config


def add_videos(folder: Path, per_class: int, seed: int, prefix: str) -> None:
    """New uploads into `folder`'s class folders, appended to its labels.csv as a labelling team would."""
    staging = folder.parent / f"incoming-{seed}"
    written = generate_motion_dataset(staging, per_class, seed=seed, write_labels_csv=False, **VIDEO)
    with open(folder / "labels.csv", "a", newline="") as handle:
        rows = csv.writer(handle)
        for path, label in written:
            name = f"{label}/{prefix}_{Path(path).name}"
            (folder / name).parent.mkdir(exist_ok=True)
            shutil.move(path, folder / name)
            rows.writerow([name, label])


def run(*argv: str) -> tuple[int, dict]:
    """A command as the shipped manifests run it, with --json: (exit code, the JSON summary)."""
    result = CliRunner().invoke(app, [*argv, "--json"])
    assert result.stdout.strip(), result.output
    return result.exit_code, json.loads(result.stdout)


def test_three_weeks_of_the_shipped_schedule_from_relative_paths(tmp_path, monkeypatch, ray_local):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    generate_motion_dataset("raw", 30, seed=1, **VIDEO)
    generate_motion_dataset("val-videos", 8, seed=2, **VIDEO)
    generate_motion_dataset("archive", 2, seed=3, layout="flat", write_labels_csv=False, **VIDEO)

    # the fixed validation set, ingested once with the shipped ingest job
    ingest = shipped_config("ingest", {"s3://raw-videos/": "./val-videos", "s3://raw-videos/labels.csv":
                                       "./val-videos/labels.csv", "s3://clips/k400/": "./val-clips"}, CLIPS)
    Path("ingest.yaml").write_text(yaml.safe_dump(ingest))
    code, summary = run(*shipped_command("rayjob-ingest.yaml", "ingest"))
    assert (code, summary["outcome"], summary["ingested"]) == (0, "success", 32), summary

    retrain_paths = {"s3://raw-videos/": "./raw", "s3://clips/k400/": "./clips", "s3://clips/k400-val@1":
                     "./val-clips@1", "s3://raw-videos/labels.csv": "./raw/labels.csv", "s3://runs/retrain/": "./runs",
                     "/weights/ViT-B-16.pt": None}
    # the tiny model with its local temporal blocks: without them it cannot tell motions apart in a few steps
    cpu_training = {"model": "uniformerv2_tiny", "model_overrides": {}, "workers": 2, "use_gpu": False, "batch_size": 8, "lr": 2e-3,
                    "warmup_epochs": 0.2, "hflip": False, "augment": "crop", "log_every": 1}
    score = shipped_config("score", {"s3://archive/": "./archive", "s3://scores/k400-b16/": "./scores"},
                           {"use_gpu": False, "actors": 1, "batch_size": 4, "precision": "auto"})
    assert score["model"] == f"models:/{MODEL}@champion"
    Path("score.yaml").write_text(yaml.safe_dump(score))
    retrain_argv, score_argv = shipped_command("cronjob-retrain.yaml", "retrain"), shipped_command(
        "rayjob-score.yaml", "score")
    assert retrain_argv[0] == score_argv[0] == "--scheduled"
    seconds = {}

    def retrain_week(training: dict) -> tuple[int, dict]:
        config = shipped_config("retrain", retrain_paths, {"ingest": CLIPS, "train": {**cpu_training, **training}})
        Path("retrain.yaml").write_text(yaml.safe_dump(config))
        return run(*retrain_argv)

    # week 1: a first candidate (a deliberately short training) becomes champion; the archive is scored by alias
    started = time.monotonic()
    code, first = retrain_week({"epochs": 1, "max_steps": 1})
    assert code == 0 and first["decision"]["promoted"] and first["decision"]["candidate_version"] == 1, first
    code, scored = run(*score_argv)
    assert (code, scored["outcome"], scored["scored"], scored["manifest_version"]) == (0, "success", 8, 1), scored
    assert {row["model_version"] for row in read_predictions("./scores").to_pylist()} == {1}
    seconds["week 1"] = time.monotonic() - started

    # week 2: new videos arrive in the bucket and the archive; the retrain promotes, and the same score command
    # leaves every archive video with a prediction by the new champion
    started = time.monotonic()
    add_videos(Path("raw"), 10, seed=4, prefix="week2")
    generate_motion_dataset("archive/week2", 1, seed=5, layout="flat", write_labels_csv=False, **VIDEO)
    code, second = retrain_week({"epochs": 20})
    decision = second["decision"]
    assert code == 0 and decision["promoted"] and decision["candidate_version"] == 2, json.dumps(decision)
    assert decision["champion_version"] == 1 and decision["candidate_score"] > decision["champion_score"]
    code, scored = run(*score_argv)
    assert (code, scored["outcome"], scored["scored"], scored["manifest_version"]) == (0, "success", 12, 2), scored
    rows = read_predictions("./scores").to_pylist()
    assert len(rows) == 12 and {row["model_version"] for row in rows} == {2}
    assert {row["model_version"] for row in read_predictions("./scores@1").to_pylist()} == {1}  # until gc
    seconds["week 2"] = time.monotonic() - started

    # week 3: nothing new: both exit 3 (nothing new), which the shipped --scheduled reports as a successful run
    started = time.monotonic()
    code, third = retrain_week({"epochs": 20})
    assert (code, third["outcome"], third["exit_code"]) == (0, "nothing_new", 3), third
    code, scored = run(*score_argv)
    assert (code, scored["outcome"], scored["exit_code"], scored["scored"]) == (0, "nothing_new", 3, 0), scored
    seconds["week 3"] = time.monotonic() - started

    # everything in the working directory the commands were run from, nothing in Ray's session folders
    assert {path.name for path in tmp_path.iterdir()} >= {"clips", "val-clips", "runs", "scores", "mlflow.db"}
    print("seconds per week:", {week: round(value, 1) for week, value in seconds.items()},
          f"week 2 gate: v2 {decision['candidate_score']:.3f} vs v1 {decision['champion_score']:.3f}")
