#!/usr/bin/env python
"""Scoring throughput against its two limits on the same videos; prints one JSON object.

    python benchmarks/score.py [--quick] [--cpus N] [--model NAME --crop PX] [--views 4x3] [--gpu] [--output FILE]
    python benchmarks/score.py --windows LENGTH[:STRIDE] [benchmarks/windows.py's options]

With --windows it measures windowed scoring instead (`score --windows`: one long video's windows against the
decode-only rate of the same walk, memory from 10 to 60 minutes, cost per CPU by height): benchmarks/windows.py.

- score: `jobs.score.run_score` (list, decode views in Ray tasks, model in an actor pool, Parquet shards, manifest)
  on a local Ray with N CPUs (--ray-cpus logical CPUs; more than N lets decoding tasks fill the cores the model actor
  leaves idle), after a warm-up run: videos/s after the first predictions (steady state, what a long run approaches:
  the ratios use it), of its whole Ray phase (with the seconds to start actors and load the model), and of the job;
- decode-only limit: `pipeline.views.decode_views` of the same videos in a pool of N processes and nothing else;
- model-only limit: the model on already decoded views of the same videos, batch by batch as the actor runs it,
  with the whole machine (the better of 1 and N torch threads on CPU, or the GPU);
- ratio: score (steady) / min(decode-only, model-only). On a CPU-only machine decoding and the model share the same
  cores, so the job can at best reach the harmonic combination 1 / (1/decode + 1/model): the goal is >= 0.9 of that
  bound (`ratio_to_shared_cpu_bound`); CPU ms per video of each (the job's whole process tree) are reported too,
  which load from other processes skews less than wall time;
- first prediction: seconds from `run_score`'s start (model resolved, videos listed, plan made, on the running Ray)
  to its first prediction row, goal <= 5 s;
- sizing: `decode_cpus_per_model_actor` = model-only videos/s / (decode-only videos/s per CPU), the decoding CPUs
  that keep one model actor busy; with --gpu, the CPU decode tasks a GPU actor needs.
The three are measured in interleaved rounds (--rounds) and medians compared, so they see similar machine load, all
at the niceness Ray gives its workers.
Videos (several resolutions, a key frame every 2 s) are generated once and cached in --work-dir.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# The repository's packages first and this folder not at all: benchmarks/model.py would be `model` here and in the
# Ray workers, which get the driver's script folder on their path (and its working folder: run from anywhere but
# benchmarks/).
sys.path[:] = [str(REPO_ROOT)] + [path for path in sys.path if Path(path or ".").resolve() != REPO_ROOT / "benchmarks"]

from benchmarks.bench_output import emit, spread  # noqa: E402
from benchmarks.ingest import Measured, make_videos, ray_worker_niceness  # noqa: E402
from jobs.options import ScoreConfig

FULL_CONFIGS = [(320, 240, 300, 30), (640, 360, 150, 30), (1280, 720, 90, 30)]
QUICK_CONFIGS = [(320, 240, 90, 30), (640, 360, 60, 30)]


def _decode_one(job) -> int:
    from pipeline.views import decode_views

    path, frames, crop, temporal, spatial, short_side = job
    decode_views(path, frames, crop, temporal, spatial, short_side=short_side)
    return 1


class DecodeOnly:
    """decode_views of every video in a pool of `cpus` processes, nothing else."""

    def __init__(self, paths: list[str], params, cpus: int):
        self.jobs = [(path, params.frames, params.crop, params.temporal_views, params.spatial_views,
                      params.short_side) for path in paths]
        self.pool = ProcessPoolExecutor(max_workers=cpus)
        list(self.pool.map(_decode_one, self.jobs[:cpus]))  # start and warm the workers

    def run(self) -> tuple[float, float]:
        """(videos/s, CPU ms per video)."""
        with Measured() as measured:
            count = sum(self.pool.map(_decode_one, self.jobs))
        return count / measured.wall, 1000 * measured.cpu / count


class ModelOnly:
    """The actor's path (host uint8 views -> device -> normalise -> forward -> view average -> host) on views of the
    same videos decoded beforehand, batch after batch."""

    def __init__(self, paths: list[str], package: Path, params, batch_size: int, gpu: bool, precision: str):
        import numpy as np
        import torch

        from model.package import load_package
        from pipeline.views import decode_views

        self.device = "cuda" if gpu else "cpu"
        self.precision = precision if gpu else "fp32"
        self.net, self.card = load_package(package / "model.safetensors", package / "model_config.json",
                                           device=self.device)
        views = [decode_views(path, params.frames, params.crop, params.temporal_views, params.spatial_views,
                              short_side=params.short_side)[0] for path in paths[:batch_size]]
        self.batch = torch.from_numpy(np.stack(views))
        self.run_batch()  # warm-up (kernels, allocator)

    def run_batch(self) -> None:
        from model.inference import predict_views

        predict_views(self.net, self.batch.to(self.device), self.card.crop_size, self.precision).cpu()

    def run(self, videos: int, threads: int | None) -> tuple[float, float]:
        """(videos/s, CPU ms per video) over about `videos` videos with `threads` torch threads (CPU)."""
        import torch

        if threads:
            torch.set_num_threads(threads)
        batches = max(1, videos // len(self.batch))
        with Measured() as measured:
            for _ in range(batches):
                self.run_batch()
            if self.device == "cuda":
                torch.cuda.synchronize()
        count = batches * len(self.batch)
        return count / measured.wall, 1000 * measured.cpu / count


def bench_score(src: Path, work: Path, package: Path, views: str, options) -> tuple[float, ...]:
    """(videos/s of the Ray phase, the same after the first predictions, videos/s of the whole job, CPU ms per video
    of the whole process tree, seconds from the job's start to its first prediction row)."""
    from jobs.score import run_score

    out = work / "scores"
    shutil.rmtree(out, ignore_errors=True)
    with Measured() as measured:
        summary = run_score(
            ScoreConfig(str(src), str(out), str(package), views=views, options=options), echo=lambda _: None
        )
    assert summary.errored == 0 and summary.scored == summary.listed, summary
    speed, count = summary.throughput, summary.scored
    return (speed.videos_per_s, speed.steady_videos_per_s, count / measured.wall, 1000 * measured.cpu / count,
            speed.first_prediction_seconds)


def warm_score(src: Path, work: Path, package: Path, views: str, options) -> None:
    """Start and warm Ray's workers (imports, first decode) as the decode-only pool is warmed before timing."""
    from jobs.score import run_score

    warm_src = work / "warm-src"
    shutil.rmtree(warm_src, ignore_errors=True)
    warm_src.mkdir(parents=True)
    for index, path in enumerate(sorted(src.glob("*.mp4"))[:4]):
        shutil.copyfile(path, warm_src / f"warm_{index}.mp4")
    shutil.rmtree(work / "warm-out", ignore_errors=True)
    run_score(
        ScoreConfig(str(warm_src), str(work / "warm-out"), str(package), views=views, options=options),
        echo=lambda _: None,
    )


def main() -> None:
    if any(argument == "--windows" or argument.startswith("--windows=") for argument in sys.argv[1:]):
        import windows

        return windows.main()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Fewer, shorter, smaller videos.")
    parser.add_argument("--videos", type=int, default=None, help="Videos to score (default 96 quick, 400 full).")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="Cores for decoding (and the CPU model).")
    parser.add_argument("--ray-cpus", type=int, default=None, help="Ray logical CPUs (default --cpus + 1 on CPU).")
    parser.add_argument("--model", default="uniformerv2_tiny")
    parser.add_argument("--crop", type=int, default=None, help="Model input size (default: the config's).")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--views", default="4x3")
    parser.add_argument("--batch-size", type=int, default=4, help="Videos per model call.")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--actors", type=int, default=None)
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "uniformer-bench-score"))
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved measurement rounds (medians reported).")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    import ray
    import torch

    import model
    from jobs.options import ScoreOptions
    from jobs.score import build_params
    from model.package import ModelCard, save_package
    from pipeline.views import parse_views

    work = Path(args.work_dir)
    total = args.videos or (96 if args.quick else 400)
    configs = QUICK_CONFIGS if args.quick else FULL_CONFIGS
    src = make_videos(work, configs, unique_per_config=4, total=total, name=f"videos{total}", gop=None)
    paths = sorted(str(path) for path in src.glob("*.mp4"))

    crop = args.crop or model.get_config(args.model).input_resolution
    card = ModelCard(args.model, 400, {"t_size": args.frames, "input_resolution": crop}, [], frames=args.frames,
                     crop_size=crop, short_side=crop)
    package = work / f"package-{args.model}-{crop}-{args.frames}"
    torch.manual_seed(0)
    save_package(model.create_model(args.model, 400, **card.overrides), card, package)
    params = build_params(card, parse_views(args.views), 5, False, None)

    ray_cpus = args.ray_cpus or (args.cpus if args.gpu else args.cpus + 1)
    ray.init(num_cpus=ray_cpus, num_gpus=1 if args.gpu else 0, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Ray runs its workers (decoding tasks, model actors) at niceness 15; the limits are measured at the same, so that
    # other load on a shared machine takes the same share from each (the pools below inherit it).
    niceness = ray_worker_niceness()
    os.nice(niceness - os.nice(0))
    options = ScoreOptions(args.batch_size, args.gpu, args.actors, args.cpus_per_actor, args.precision)
    decode_only = DecodeOnly(paths, params, args.cpus)
    model_only = ModelOnly(paths, package, params, args.batch_size, args.gpu, args.precision)
    warm_score(src, work, package, args.views, options)
    # On a shared machine the load changes over minutes: the three measurements are interleaved round by round and
    # the medians compared. The model's limit is its best thread count (oversubscribed cores punish extra threads).
    threads = [None] if args.gpu else sorted({1, args.cpus})
    decode, model_runs, score = [], [], []
    for _ in range(args.rounds):
        decode.append(decode_only.run())
        model_runs.append(max((model_only.run(min(total, 64), t) for t in threads), key=lambda r: r[0]))
        score.append(bench_score(src, work, package, args.views, options))
    decode_only.pool.shutdown()
    ray.shutdown()

    def median(values):
        return statistics.median(values)

    decode_limit, decode_cpu = median([r[0] for r in decode]), median([r[1] for r in decode])
    model_limit, model_cpu = median([r[0] for r in model_runs]), median([r[1] for r in model_runs])
    score_rate, steady_rate, job_rate, score_cpu = (median([r[i] for r in score]) for i in range(4))
    shared = 1 / (1 / decode_limit + 1 / model_limit)
    result = {
        "benchmark": "score",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "ray": ray.__version__, "device": torch.cuda.get_device_name() if args.gpu else "cpu",
                    "load_average_1m_at_end": round(os.getloadavg()[0], 2), "niceness_of_all_sides": niceness},
        "setting": {"videos": total, "resolutions": [f"{w}x{h} {n}f" for w, h, n, _ in configs], "model": args.model,
                    "crop": crop, "frames": args.frames, "views": args.views, "batch_size": args.batch_size,
                    "cpus": args.cpus, "ray_cpus": ray_cpus, "cpus_per_actor": args.cpus_per_actor, "gpu": args.gpu,
                    "precision": args.precision, "rounds": args.rounds},
        "score_steady_videos_per_s": round(steady_rate, 3),
        "score_videos_per_s": round(score_rate, 3),
        "score_job_videos_per_s": round(job_rate, 3),
        "decode_only_videos_per_s": round(decode_limit, 3),
        "model_only_videos_per_s": round(model_limit, 3),
        # every ratio within a round (the rounds interleave), as the median of the rounds with min and max
        "ratio_to_min_limit": spread(r[1] / min(d[0], m[0]) for r, d, m in zip(score, decode, model_runs)),
        "ratio_to_min_limit_with_startup": spread(r[0] / min(d[0], m[0]) for r, d, m in zip(score, decode, model_runs)),
        "ratio_job_to_min_limit": spread(r[2] / min(d[0], m[0]) for r, d, m in zip(score, decode, model_runs)),
        "goal_ratio_job_to_min_limit": 0.5,
        "shared_cpu_bound_videos_per_s": round(shared, 3),
        "ratio_to_shared_cpu_bound": spread(r[1] * (1 / d[0] + 1 / m[0]) for r, d, m in zip(score, decode, model_runs)),
        "goal_ratio_to_shared_cpu_bound": 0.9,
        "first_prediction_s": spread((r[4] for r in score), 2),
        "goal_first_prediction_s": 5.0,
        # decoding CPUs that keep one model actor busy (on a GPU: CPU decode tasks per GPU actor)
        "decode_cpus_per_model_actor": round(model_limit / (decode_limit / args.cpus), 2),
        "cpu_ms_per_video": {"score_job": round(score_cpu, 1), "decode_only": round(decode_cpu, 1),
                             "model_only": round(model_cpu, 1)},
        "rounds": {"score_steady": [round(r[1], 3) for r in score], "score": [round(r[0], 3) for r in score],
                   "decode_only": [round(r[0], 3) for r in decode], "model_only": [round(r[0], 3) for r in model_runs],
                   "first_prediction_s": [round(r[4], 2) for r in score]},
        "goal": ">= 0.9 of the shared-CPU bound on CPUs, >= 0.8 of min(decode-only, model-only) with a GPU",
    }
    emit(result, args.output)


if __name__ == "__main__":
    main()
