#!/usr/bin/env python
"""Windowed scoring (`uniformer score --windows`) against the decode-only rate of the same sequential walk; prints one
JSON object.

    python benchmarks/windows.py [--minutes 10] [--windows 2:1] [--views 1x1] [--cpus 2] [--memory 10,60]
                                 [--heights 240,360,720] [--output FILE]

- score: `jobs.score.run_score` with windows on one synthetic 360p video (8 fps, a key frame every 2 s), a local Ray
  with --cpus CPUs, the tiny model (random weights: the figures are about decoding and the pipeline, not accuracy);
  windows/s over the Ray phase;
- decode-only: `pipeline.windows.iter_windows` over the same video in this process, nothing else: windows/s;
- ratio: score / decode-only (one video is one decoding task, so a single video's windowed run is bounded by one
  CPU's walk plus the model on the same cores);
- memory (--memory M1,M2,...): the peak RSS of a fresh process walking a video of each length with its frames read
  in a decoding child, as a scoring worker does (the process's and the child's), and of the driver during a run:
  flat from 10 to 60 minutes when memory is bounded by a few windows;
- cost (--heights H1,H2,...): the decode-only walk of a 2-minute 16:9 video at each height, one process (one CPU,
  decord's one thread): windows/s per CPU and the CPU hours that an hour of such video takes at --windows' stride.
Videos are generated once and cached in --work-dir.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# The repository's packages first and this folder not at all: benchmarks/model.py would be `model` here and in the
# Ray workers, which get the driver's script folder on their path (and its working folder: run from anywhere but
# benchmarks/).
sys.path[:] = [str(REPO_ROOT)] + [path for path in sys.path if Path(path or ".").resolve() != REPO_ROOT / "benchmarks"]

from benchmarks.bench_output import emit, status_mb  # noqa: E402

FPS, PIECE, SIZE = 8, 16, (640, 360)


def long_video(folder: Path, minutes: float, size: tuple[int, int] = SIZE) -> Path:
    """A video of `minutes` (360p unless `size` says otherwise), motion segments of 30 s alternating left and right
    (pieces repeated seamlessly)."""
    import numpy as np

    from pipeline.synthetic import render_motion_frames

    path = folder / (f"long-{minutes:g}min.mp4" if size == SIZE else f"long-{minutes:g}min-{size[1]}p.mp4")
    if path.exists():
        return path
    import av

    rng = np.random.default_rng(0)
    pieces = [render_motion_frames(direction, *size, PIECE, rng) for direction in ("left", "right")]
    total = int(minutes * 60 * FPS)
    partial = path.with_suffix(".partial.mp4")
    with av.open(str(partial), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        stream.options = {"crf": "23", "preset": "ultrafast", "g": str(2 * FPS)}
        for index in range(total):
            frame = pieces[(index // (30 * FPS)) % 2][index % PIECE]
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    partial.rename(path)
    return path


def decode_only(video: Path, spec: str, frames: int, crop: int, spatial: int, isolated: bool = False) -> dict:
    """The walk alone; `isolated`: its frames read in a decoding child, as a scoring worker reads them (the child's
    peak RSS reported beside this process's)."""
    import torch  # noqa: F401 - resizing imports it on first use: a one-time cost, not the walk's

    from pipeline.isolation import DecoderProcess
    from pipeline.windows import iter_windows, parse_windows

    decoder = DecoderProcess() if isolated else None
    started, windows = time.monotonic(), 0
    for chunk in iter_windows(video, parse_windows(spec), frames, crop, spatial, decoder=decoder):
        windows += len(chunk.bounds)
    seconds = time.monotonic() - started
    result = {"windows": windows, "seconds": round(seconds, 3), "windows_per_s": round(windows / seconds, 2),
              "peak_rss_mb": peak_rss_mb()}
    if decoder is not None:
        result["child_peak_rss_mb"] = peak_rss_mb(decoder.pid)
        decoder.close()
    return result


def peak_rss_mb(pid: int | str = "self") -> float:
    # VmHWM, not ru_maxrss: a walker forked from this 700 MB driver would read 700 MB whatever it held
    return round(status_mb("VmHWM", pid), 1)


def walk_in_fresh_process(video: Path, spec: str, frames: int, crop: int, spatial: int, isolated: bool = False) -> dict:
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); "
            "from benchmarks.windows import decode_only; from pathlib import Path; "
            "print(json.dumps(decode_only(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), "
            "int(sys.argv[6]), sys.argv[7] == '1')))")
    out = subprocess.run([sys.executable, "-c", code, str(REPO_ROOT), str(video), spec, str(frames), str(crop),
                          str(spatial), "1" if isolated else "0"], check=True, capture_output=True, text=True).stdout
    import json

    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--windows", default="2:1")
    parser.add_argument("--views", default="1x1")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--memory", default="", help="Video lengths in minutes for the memory check, e.g. 10,60.")
    parser.add_argument("--heights", default="", help="Frame heights for the cost per CPU, e.g. 240,360,720.")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "uniformer-bench-windows"))
    parser.add_argument("--output")
    args = parser.parse_args()

    import logging

    import ray
    import torch

    import model
    from jobs.options import ScoreConfig, ScoreOptions
    from jobs.score import run_score
    from model.package import ModelCard, save_package
    from pipeline.views import parse_views
    from pipeline.windows import parse_windows

    work = Path(args.work_dir)
    (work / "videos").mkdir(parents=True, exist_ok=True)
    card = ModelCard("uniformerv2_tiny", 2, {"t_size": 8}, ["left", "right"], 8, 32, 32)
    package = work / "package"
    if not package.exists():
        torch.manual_seed(0)
        save_package(model.create_model(card.model, 2, **card.overrides).eval(), card, package)
    source = work / "videos" / f"{args.minutes:g}"
    source.mkdir(exist_ok=True)
    video = long_video(source, args.minutes)
    _, spatial = parse_views(args.views)

    decode = walk_in_fresh_process(video, args.windows, card.frames, card.crop_size, spatial)
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    with tempfile.TemporaryDirectory() as out:
        summary = run_score(ScoreConfig(str(source), out, str(package), views=args.views, windows=args.windows,
                                        options=ScoreOptions(batch_size=8)), echo=lambda line: None)
    ray.shutdown()
    windows = decode["windows"]
    score_rate = windows / summary.throughput.seconds
    result = {
        "benchmark": "windows",
        "video": {"minutes": args.minutes, "size": list(SIZE), "fps": FPS},
        "windows": args.windows, "views": args.views, "cpus": args.cpus, "model": card.model,
        "score": {"windows": windows, "ray_seconds": round(summary.throughput.seconds, 3),
                  "startup_seconds": round(summary.throughput.startup_seconds, 3),
                  "windows_per_s": round(score_rate, 2)},
        "decode_only": decode,
        "ratio_to_decode_only": round(score_rate / decode["windows_per_s"], 3),
        "driver_peak_rss_mb": peak_rss_mb(),
    }
    if args.memory:
        # the walk as a scoring worker runs it: frames read in its decoding child
        walks = {minutes: walk_in_fresh_process(long_video(work / "videos", float(minutes)), args.windows,
                                                card.frames, card.crop_size, spatial, isolated=True)
                 for minutes in args.memory.split(",")}
        result["walk_peak_rss_mb_by_minutes"] = {minutes: walk["peak_rss_mb"] for minutes, walk in walks.items()}
        result["decoding_child_peak_rss_mb_by_minutes"] = {minutes: walk["child_peak_rss_mb"]
                                                           for minutes, walk in walks.items()}
    if args.heights:
        windows_per_hour = 3600 / parse_windows(args.windows).stride
        result["cost_per_cpu_by_height"] = {}
        for height in map(int, args.heights.split(",")):
            size = (round(height * 16 / 9 / 2) * 2, height)
            walk = walk_in_fresh_process(long_video(work / "videos", 2.0, size), args.windows, card.frames,
                                         card.crop_size, spatial)
            result["cost_per_cpu_by_height"][f"{height}p"] = {
                "windows_per_s": walk["windows_per_s"],
                "cpu_hours_per_video_hour": round(windows_per_hour / walk["windows_per_s"] / 3600, 4),
            }
    emit(result, args.output)


if __name__ == "__main__":
    main()
