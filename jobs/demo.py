"""`uniformer demo`: the whole system on embedded defaults, end to end, in minutes on a laptop CPU.

Local Ray, a local folder as the object store, sqlite MLflow. Generates synthetic motion videos, then:
retrain #1 (ingest -> train the tiny model with 2 workers -> register -> first champion), score an unlabeled
archive with `models:/NAME@champion`, add new videos, retrain #2 (incremental ingest -> candidate from the
champion -> gate on the fixed validation set), and prints a summary.
"""

from __future__ import annotations

import os
import time

from jobs.ingest import run_ingest
from jobs.options import ClipSampling, DemoConfig, DemoSize, IngestConfig, RetrainConfig, ScoreConfig
from jobs.report import table_lines
from jobs.retrain import run_retrain
from jobs.score import run_score
from jobs.train import ensure_ray
from jobs.training.config import TrainConfig
from pipeline import generate_motion_dataset, load_manifest

# 40 px videos, 8-frame clips of 40 px squares, 32 px model crops: what uniformerv2_tiny is built for.
VIDEO = dict(size=(40, 40), num_frames=16, fps=8.0)
CLIPS = dict(frames=8, short_side=40, size=32)
MODEL_NAME = "demo-motion"
SCORE_VIEWS = "2x1"  # the demo scores at these views, and its gate judges at the same ones


def run_demo(config: DemoConfig, echo=print) -> dict:
    started = time.monotonic()
    sizes = DemoSize.named(config.size)
    workdir = os.path.abspath(config.workdir)
    bucket = os.path.join(workdir, "bucket")
    raw, archive = os.path.join(bucket, "raw-videos"), os.path.join(bucket, "archive")
    val_videos = os.path.join(bucket, "validation-videos")
    clips, val_clips = os.path.join(workdir, "clips"), os.path.join(workdir, "validation-clips")
    scores = os.path.join(workdir, "scores")
    # passed explicitly to every job below, so that the demo leaves the process environment as it found it
    tracking = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.join(workdir, 'mlflow.db')}"

    echo(f"[demo] 1/6 generating synthetic motion videos under {bucket}")
    generate_motion_dataset(raw, sizes.train_per_class, seed=1, **VIDEO)
    generate_motion_dataset(val_videos, sizes.val_per_class, seed=2, **VIDEO)
    generate_motion_dataset(archive, max(1, sizes.archive_videos // 4), seed=3, layout="flat",
                            write_labels_csv=False, **VIDEO)

    train = TrainConfig(
        data=clips, model="uniformerv2_tiny", workers=config.workers, epochs=sizes.epochs, batch_size=16, lr=2e-3,
        warmup_epochs=0.3, hflip=False, augment="crop", storage=os.path.join(workdir, "runs"), tracking_uri=tracking,
        experiment="demo", checkpoint_every=0,
    )
    ensure_ray(train)

    echo("[demo] 2/6 ingesting the fixed validation set")
    run_ingest(IngestConfig(val_videos, val_clips, labels_from_dirs=True, clip=ClipSampling(**CLIPS)), echo=echo)

    echo("[demo] 3/6 retrain #1: ingest, train with 2 workers, register, gate (the first model becomes champion)")
    new_videos = IngestConfig(raw, clips, labels_from_dirs=True, clip=ClipSampling(**CLIPS))
    first = run_retrain(RetrainConfig(raw, clips, MODEL_NAME, val_clips, init="pretrained", gate_views=SCORE_VIEWS,
                                      train=train, ingest=new_videos), echo=echo)

    echo(f"[demo] 4/6 scoring the archive with models:/{MODEL_NAME}@champion")
    scored = run_score(ScoreConfig(archive, scores, f"models:/{MODEL_NAME}@champion", views=SCORE_VIEWS, top_k=2,
                                   tracking_uri=tracking), echo=echo)

    echo("[demo] 5/6 new videos arrive")
    add_videos(raw, os.path.join(workdir, "incoming"), sizes.new_per_class, seed=4)

    echo("[demo] 6/6 retrain #2: incremental ingest, candidate from the champion, gate")
    second_train = TrainConfig(**{**train.to_dict(), "lr": 5e-4, "warmup_epochs": 0.1})
    second = run_retrain(RetrainConfig(raw, clips, MODEL_NAME, val_clips, init="champion", gate_views=SCORE_VIEWS,
                                       train=second_train, ingest=new_videos), echo=echo)

    summary = {
        "clips": load_manifest(clips).num_clips,
        "validation_clips": load_manifest(val_clips).num_clips,
        "dataset_versions": [first.dataset_version, second.dataset_version],
        "model_v1_accuracy": first.decision.candidate_score,
        "model_v2_accuracy": second.decision.candidate_score if second.decision else None,
        "gate": second.decision.reason if second.decision else "nothing new",
        "champion": _champion_version(tracking),
        "archive_videos_scored": scored.scored,
        "scoring_videos_per_s": scored.throughput.videos_per_s,
        "seconds": round(time.monotonic() - started, 1),
        "workdir": workdir,
    }
    echo(format_summary(summary, tracking, scores))
    return summary


def add_videos(raw: str, staging: str, per_class: int, seed: int) -> None:
    """New uploads into the existing class folders, under names that do not collide with the old ones."""
    for path, label in generate_motion_dataset(staging, per_class, seed=seed, write_labels_csv=False, **VIDEO):
        os.replace(path, os.path.join(raw, label, f"batch{seed}_{os.path.basename(path)}"))


def _champion_version(tracking: str) -> int:
    import mlflow

    return int(mlflow.MlflowClient(tracking).get_model_version_by_alias(MODEL_NAME, "champion").version)


def format_summary(summary: dict, tracking: str, scores: str) -> str:
    rows = [
        ("clips in the training dataset", summary["clips"]),
        ("dataset versions (retrain #1, #2)", summary["dataset_versions"]),
        ("validation clips (fixed)", summary["validation_clips"]),
        ("model v1 validation accuracy", f"{summary['model_v1_accuracy']:.3f}"),
        ("model v2 validation accuracy", "-" if summary["model_v2_accuracy"] is None
         else f"{summary['model_v2_accuracy']:.3f}"),
        ("gate decision on v2", summary["gate"]),
        (f"{MODEL_NAME}@champion", f"version {summary['champion']}"),
        ("archive videos scored", summary["archive_videos_scored"]),
        ("scoring throughput (videos/s)", f"{summary['scoring_videos_per_s']:.2f}"),
        ("predictions", scores),
        ("everything", summary["workdir"]),
        ("total time (s)", summary["seconds"]),
    ]
    lines = ["", "demo summary"] + table_lines(rows, value_width=0)
    lines.append(f"\nopen the MLflow UI on these runs:\n  mlflow ui --backend-store-uri {tracking}")
    return "\n".join(lines)
