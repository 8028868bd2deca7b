"""Training throughput: clips/s per worker, the share of step time spent waiting for data (per epoch, on the rank
that waited most), and 1 -> 2 worker scaling, measured with the real job (Ray Train + the epoch-plan loader: each
epoch's first window read in the trainer, the rest by Ray Data) on synthetic motion clips.

    .venv/bin/python benchmarks/train.py [--videos-per-class 100] [--epochs 4] [--model uniformerv2_tiny]

Prints one JSON object. Figures from one run on one machine; compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# The repository's packages first and this folder not at all: benchmarks/model.py would be `model` here and in the
# Ray workers, which get the driver's script folder on their path (and its working folder: run from anywhere but
# benchmarks/).
sys.path[:] = [str(REPO_ROOT)] + [path for path in sys.path if Path(path or ".").resolve() != REPO_ROOT / "benchmarks"]

from benchmarks.bench_output import emit  # noqa: E402
from jobs.config import build  # noqa: E402
from jobs.options import IngestConfig  # noqa: E402

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray on loopback only


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos-per-class", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", default="uniformerv2_tiny")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args()

    import mlflow
    import ray

    from jobs.ingest import run_ingest
    from jobs.train import run_train
    from jobs.training.config import TrainConfig
    from pipeline import generate_motion_dataset

    root = tempfile.mkdtemp(prefix="uniformer-train-bench-")
    generate_motion_dataset(os.path.join(root, "videos"), args.videos_per_class, size=(40, 40), num_frames=16)
    ray.init(num_cpus=max(os.cpu_count() or 1, 4), include_dashboard=False, log_to_driver=False)
    run_ingest(
        build(
            IngestConfig,
            dict(
                src=os.path.join(root, "videos"),
                out=os.path.join(root, "clips"),
                labels_from_dirs=True,
                frames=8,
                short_side=40,
                size=32,
            ),
        ),
        echo=lambda _: None,
    )
    tracking = f"sqlite:///{os.path.join(root, 'mlflow.db')}"

    results = {}
    for workers in (1, 2):
        cfg = TrainConfig(data=os.path.join(root, "clips"), model=args.model, workers=workers, epochs=args.epochs,
                          batch_size=args.batch_size, use_gpu=args.gpu, hflip=False, augment="crop", tracking_uri=tracking,
                          storage=os.path.join(root, f"runs-{workers}"), experiment=f"bench-{workers}")
        result = run_train(cfg)
        history = mlflow.MlflowClient(tracking).get_metric_history(result.mlflow_run_id, "clips_per_s_per_worker")
        waits = mlflow.MlflowClient(tracking).get_metric_history(result.mlflow_run_id, "data_wait_share")
        steady = [m.value for m in sorted(history, key=lambda m: m.step)][2:]  # skip start-up steps
        if not steady:
            raise SystemExit(f"the {workers}-worker run logged {len(history)} throughput figures, all of them start-up "
                             "steps: give it more steps (--videos-per-class, --epochs)")
        results[workers] = {
            "steps": int(result.metrics["global_step"]),
            "clips_per_s_per_worker_median": statistics.median(steady),
            "data_wait_share_per_epoch": [round(m.value, 4) for m in sorted(waits, key=lambda m: m.step)],
        }
    one, two = results[1], results[2]
    emit({
        "model": args.model,
        "batch_per_worker": args.batch_size,
        "device": "cuda" if args.gpu else "cpu",
        "cpus": os.cpu_count(),
        "workers_1": one,
        "workers_2": two,
        "scaling_total_clips_per_s_2_vs_1": round(
            2 * two["clips_per_s_per_worker_median"] / one["clips_per_s_per_worker_median"], 3),
        # apart, as the first epoch's start overlaps only the set-up, later ones the previous epoch's validation too
        "max_data_wait_share_first_epoch": max(run["data_wait_share_per_epoch"][0] for run in (one, two)),
        "max_data_wait_share_later_epochs": max(
            (share for run in (one, two) for share in run["data_wait_share_per_epoch"][1:]), default=None),
        "data_wait_share_goal": 0.05,
    }, args.output)


if __name__ == "__main__":
    main()
