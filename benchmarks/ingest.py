#!/usr/bin/env python
"""Ingest throughput and memory; prints one JSON object.

    python benchmarks/ingest.py [--quick] [--cpus N] [--output FILE]

On one set of synthetic videos (several resolutions up to 720p and several lengths, made by pipeline.synthetic),
producing the same clips (same frame indices, same resize + centre crop):
- ingest: `jobs.ingest.run_ingest` on a local Ray with N CPUs (Ray already started; the time covers listing,
  decoding, Parquet shards and the manifest), in clips/s;
- decode-only limit: decord decoding the same frame indices of the same files at their own size in a pool of N
  processes, one decoder thread each, and nothing else (no resize, no writing): the ceiling for an ingest that decodes
  at the source's size. Ingest asks decord for frames scaled to the clips' short side (`pipeline.decode.decode_size`),
  which costs less than that: the same pool decoding at that size is reported too (`decode_only_at_clip_size`), the
  ceiling for everything ingest does besides decoding;
- both run at the niceness Ray gives its workers (15), so that other load on a shared machine takes the same share
  from each;
- read_videos: the same clips from a pipeline built on `ray.data.read_videos` (decodes every frame, keeps the
  sampled ones, resizes them, groups them into clips per video, writes Parquet);
- CPU time per clip of each side (all its processes: for ingest the driver, Ray's own processes and the workers),
  which other load on a shared machine does not skew the way it skews wall time;
- memory: the ingest job run as a fresh process (its own local Ray) on 10 and on 100 videos, sampling every 100 ms
  the whole process tree (driver, Ray's own processes, workers): peak of summed PSS (shared object-store pages
  counted once) and of summed RSS.
Videos are generated once per distinct configuration and copied to reach the counts (decoding a copy costs the same
as decoding a new video); they are cached in --work-dir between runs. Decoding cost, and so every ratio, depends on
the key frame interval (`--gop`): the default is one key frame every 2 s; x264's own default, which many re-encoded
datasets carry, is 250 frames, making decoding dearer and the fixed per-clip work of ingest relatively smaller.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# The repository's packages first and this folder not at all: benchmarks/model.py would be `model` here and in the
# Ray workers, which get the driver's script folder on their path (and its working folder: run from anywhere but
# benchmarks/).
sys.path[:] = [str(REPO_ROOT)] + [path for path in sys.path if Path(path or ".").resolve() != REPO_ROOT / "benchmarks"]

from benchmarks.bench_output import emit, spread  # noqa: E402
from jobs.config import build
from jobs.options import IngestConfig
from pipeline.synthetic import write_motion_video  # noqa: E402

# (width, height, frames, fps): a mix of resolutions and lengths
FULL_CONFIGS = [(320, 240, 300, 30), (640, 360, 150, 30), (1280, 720, 90, 30)]
QUICK_CONFIGS = [(320, 240, 60, 30), (640, 360, 45, 30), (1280, 720, 30, 30)]


def make_videos(work_dir: Path, configs, unique_per_config: int, total: int, name: str, gop: int | None) -> Path:
    """`total` videos under work_dir/name, cycling through the configurations (key frame every `gop` frames,
    default every 2 s)."""
    originals = work_dir / f"originals_gop{gop or 'default'}"
    sources = []
    for width, height, frames, fps in configs:
        for index in range(unique_per_config):
            path = originals / f"{width}x{height}_{frames}f_{index}.mp4"
            if not path.exists():
                write_motion_video(path, ("left", "right", "up", "down")[index % 4], size=(width, height),
                                   fps=fps, num_frames=frames, seed=index, gop=gop)
            sources.append(path)
    folder = work_dir / f"{name}_gop{gop or 'default'}"
    if folder.exists() and len(list(folder.glob("*.mp4"))) == total:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for index in range(total):
        shutil.copyfile(sources[index % len(sources)], folder / f"video_{index:05d}.mp4")
    return folder


def wanted_indices(path: str, frames: int) -> list[int]:
    import decord

    from pipeline.decode import sample_frame_indices

    indices, _ = sample_frame_indices(len(decord.VideoReader(path, num_threads=1)), frames)
    return sorted(set(indices.ravel().tolist()))


def clip_decode_sizes(paths: list[str], short_side: int) -> dict[str, dict[str, int]]:
    """The width and height ingest asks decord for, per video (empty: the source's own)."""
    from pipeline.decode import decode_size, probe_video

    return {path: decode_size(probe_video(path), short_side) for path in paths}


def _decode_only(job) -> int:
    import decord

    path, indices, size = job
    decord.VideoReader(path, num_threads=1, **size).get_batch(indices).asnumpy()
    return 1


def ray_worker_niceness() -> int:
    """The niceness Ray gives its worker processes (15 unless RAY_worker_niceness says otherwise; the decoding
    children inherit it). A limit measured at niceness 0 beside them gets a larger share of a machine that other
    processes load too, so the pools that measure limits run at this niceness as well."""
    import ray

    return ray.get(ray.remote(num_cpus=0)(lambda: os.nice(0)).remote())


def bench_decode_only(paths: list[str], indices: dict[str, list[int]], sizes: dict[str, dict[str, int]], cpus: int,
                      niceness: int) -> tuple[float, float]:
    """(clips/s, CPU ms per clip) decoding each video at `sizes` (empty: its own size)."""
    with ProcessPoolExecutor(max_workers=cpus, initializer=os.nice, initargs=(niceness,)) as pool:
        list(pool.map(_decode_only, [(paths[0], indices[paths[0]], sizes[paths[0]])] * cpus))  # start, warm
        with Measured() as measured:
            clips = sum(pool.map(_decode_only, [(path, indices[path], sizes[path]) for path in paths]))
    return clips / measured.wall, 1000 * measured.cpu / clips


def bench_ingest(src: Path, dst: Path, frames: int, size: int,
                 short_side: int) -> tuple[float, float, int, dict[str, float]]:
    """(clips/s, CPU ms per clip of the whole job: driver, Ray's own processes, workers, clips, that CPU time per clip
    by process role)."""
    from jobs.ingest import run_ingest

    # Start and warm the Ray workers (imports, first decode) as the decode-only pool is warmed before timing.
    warm_src = dst.parent / "warm-src"
    warm_src.mkdir(parents=True, exist_ok=True)
    first = sorted(src.glob("*.mp4"))[0]
    for index in range(4):
        shutil.copyfile(first, warm_src / f"warm_{index}.mp4")
    shutil.rmtree(dst.parent / "warm-dst", ignore_errors=True)
    run_ingest(
        build(
            IngestConfig,
            dict(src=str(warm_src), out=str(dst.parent / "warm-dst"), frames=frames, size=size, short_side=short_side),
        ),
        echo=lambda _: None,
    )
    shutil.rmtree(dst, ignore_errors=True)
    with Measured() as measured:
        summary = run_ingest(
            build(IngestConfig, dict(src=str(src), out=str(dst), frames=frames, size=size, short_side=short_side)),
            echo=lambda _: None,
        )
    assert summary.errored == 0, summary.errors
    clips = summary.clips_written
    by_role = {role: 1000 * seconds / clips for role, seconds in measured.cpu_by_role.items()}
    return clips / measured.wall, 1000 * measured.cpu / clips, clips, by_role


def bench_read_videos(paths: list[str], indices: dict[str, list[int]], dst: Path, frames: int, short_side: int):
    import numpy as np
    import ray.data

    from pipeline.decode import resize_center_crop

    shutil.rmtree(dst, ignore_errors=True)

    def keep_sampled_frames(batch: dict) -> dict:
        keep = [i for i, (path, index) in enumerate(zip(batch["path"], batch["frame_index"]))
                if index in set(indices[path])]
        # frames of differently sized videos may share a batch (a ragged object array), so resize one by one
        resized = [resize_center_crop(np.asarray(batch["frame"][i])[None], short_side)[0] for i in keep]
        empty = np.zeros((0, short_side, short_side, 3), np.uint8)
        return {"path": np.asarray(batch["path"])[keep], "frame_index": np.asarray(batch["frame_index"])[keep],
                "frame": np.stack(resized) if resized else empty}

    def to_clip(group: dict) -> dict:
        path = group["path"][0]
        position = {int(index): i for i, index in enumerate(group["frame_index"])}
        clip = np.asarray(group["frame"])[[position[index] for index in _clip_order(indices[path], frames)]]
        return {"path": [path], "frames": clip[None]}

    started = time.perf_counter()
    dataset = (
        ray.data.read_videos(paths, include_paths=True)
        .map_batches(keep_sampled_frames, batch_format="numpy")
        .groupby("path")
        .map_groups(to_clip, batch_format="numpy")
    )
    dataset.write_parquet(str(dst))
    elapsed = time.perf_counter() - started
    clips = ray.data.read_parquet(str(dst)).count()
    return clips / elapsed, clips


def _clip_order(wanted: list[int], frames: int) -> list[int]:
    """The clip's T frame indices from the sorted unique ones (the last repeats when a video is short)."""
    return [wanted[min(i, len(wanted) - 1)] for i in range(frames)] if len(wanted) < frames else wanted[:frames]


# ---- memory of a whole job ------------------------------------------------------------------------------------------
def _tree(pid: int) -> list[int]:
    pids, stack = [], [pid]
    while stack:
        current = stack.pop()
        pids.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    stack.extend(int(child) for child in handle.read().split())
        except OSError:
            continue
    return pids


def _memory_kb(pid: int) -> tuple[int, int]:
    """(PSS, RSS) in kB of one process; zeros when it has gone."""
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
    except OSError:
        pass
    return pss, rss


def _cpu_seconds_by_process(pid: int) -> dict[int, float]:
    """User + system CPU seconds of a process and each of its descendants alive now."""
    seconds = {}
    for member in _tree(pid):
        try:
            with open(f"/proc/{member}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            seconds[member] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            continue
    return seconds


class Measured:
    """Wall time and CPU time of this process tree (Ray's processes and pool workers are its descendants). A thread
    samples every process's CPU time every 200 ms, so that one that ends before the measurement does (a model actor
    when its dataset finishes) still counts up to its last sample, and one that ended before it began counts not at
    all. `cpu_by_role`: the same CPU seconds split by what each process is (`process_role`), read when it is first
    seen, since a process that has ended can no longer say."""

    _INTERVAL_S = 0.2

    def __enter__(self):
        import threading

        self._start = _cpu_seconds_by_process(os.getpid())
        self._last = dict(self._start)
        self._roles = {pid: process_role(pid) for pid in self._start}
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        self.wall = time.perf_counter()
        return self

    def _update(self) -> None:
        current = _cpu_seconds_by_process(os.getpid())
        for pid in current.keys() - self._roles.keys():
            self._roles[pid] = process_role(pid)
        self._last.update(current)

    def _sample(self) -> None:
        while not self._stop.wait(self._INTERVAL_S):
            self._update()

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self._stop.set()
        self._sampler.join()
        self._update()
        used = {pid: seconds - self._start.get(pid, 0.0) for pid, seconds in self._last.items()}
        self.cpu = sum(used.values())
        self.cpu_by_role = {}
        for pid, seconds in used.items():
            role = self._roles[pid]
            self.cpu_by_role[role] = self.cpu_by_role.get(role, 0.0) + seconds


def process_role(pid: int) -> str:
    """What a process of the measured tree is: "driver" (this process), "decoding_child" (pipeline.isolation's
    decoder), "ray_worker" (Ray names its workers' processes "ray::..."), or "other": Ray's own processes (raylet, GCS,
    agents) in a Ray job, the pool's workers in a decode-only one."""
    if pid == os.getpid():
        return "driver"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            command = handle.read().replace(b"\0", b" ")
    except OSError:
        return "other"
    if b"pipeline.isolation" in command:
        return "decoding_child"
    return "ray_worker" if command.startswith(b"ray::") or b"default_worker.py" in command else "other"


_JOB = """
import sys, logging, ray
ray.init(num_cpus=int(sys.argv[3]), include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
from jobs.ingest import run_ingest
from jobs.options import ClipSampling, IngestConfig
clip = ClipSampling(frames=int(sys.argv[4]), size=int(sys.argv[5]), short_side=int(sys.argv[6]))
s = run_ingest(IngestConfig(sys.argv[1], sys.argv[2], clip=clip), echo=lambda _: None)
assert s.errored == 0 and s.ingested == s.listed, s
"""


def job_peak_memory(src: Path, dst: Path, cpus: int, frames: int, size: int, short_side: int) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    process = subprocess.Popen(
        [sys.executable, "-c", _JOB, str(src), str(dst), str(cpus), str(frames), str(size), str(short_side)],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    peak_pss = peak_rss = 0
    peak_parts: dict[str, float] = {}
    started = time.perf_counter()
    while process.poll() is None:
        samples = {pid: _memory_kb(pid) for pid in _tree(process.pid)}
        pss = sum(sample[0] for sample in samples.values())
        peak_rss = max(peak_rss, sum(sample[1] for sample in samples.values()))
        if pss > peak_pss:
            peak_pss, peak_parts = pss, {}
            for pid, (part, _) in samples.items():
                kind = "driver" if pid == process.pid else _process_kind(pid)
                peak_parts[kind] = peak_parts.get(kind, 0) + part / 1024
        time.sleep(0.1)
    if process.returncode != 0:
        raise RuntimeError(f"ingest job failed: {process.stderr.read().decode()[-3000:]}")
    return {"peak_pss_mb": round(peak_pss / 1024, 1), "peak_rss_mb": round(peak_rss / 1024, 1),
            "peak_pss_mb_by_process": {kind: round(mb, 1) for kind, mb in sorted(peak_parts.items())},
            "seconds": round(time.perf_counter() - started, 1)}


def _process_kind(pid: int) -> str:
    """'ray workers' for Ray's worker processes (whatever task they run), else the executable's name."""
    try:
        with open(f"/proc/{pid}/cmdline") as handle:
            argv = handle.read().split("\0")
    except OSError:
        return "gone"
    if argv[0].startswith("ray::"):
        return "ray workers" if argv[0] in ("ray::IDLE",) or "MapBatches" in argv[0] or "run_groups" in argv[0] \
            else argv[0]
    return os.path.basename(argv[0]) if not argv[0].endswith("python") else os.path.basename(argv[1] or "python")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter videos and fewer of them")
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--videos", type=int, default=None, help="videos in the throughput set (default 48, quick 9)")
    parser.add_argument("--gop", type=int, default=None,
                        help="key frame interval of the generated videos in frames (default 2 s; x264's own is 250)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--short-side", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rss-counts", type=int, nargs=2, default=[10, 100])
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds of decode-only and ingest (medians reported, with min and max)")
    parser.add_argument("--skip-read-videos", action="store_true")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "uniformer-ingest-bench"))
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args()

    configs = QUICK_CONFIGS if args.quick else FULL_CONFIGS
    unique = 1 if args.quick else 2
    count = args.videos or (9 if args.quick else 48)
    work = Path(args.work_dir) / ("quick" if args.quick else "full")
    src = make_videos(work, configs, unique, count, f"throughput_{count}", args.gop)
    paths = sorted(str(path) for path in src.glob("*.mp4"))
    indices = {path: wanted_indices(path, args.frames) for path in paths}

    import ray

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    scratch = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    try:
        # The three alternate round by round, so that all see the same machine load; every ratio is taken within a
        # round, and reported as the median of the rounds with their min and max (a goal is judged by the median).
        rounds = {"decode_only": [], "scaled": [], "ingest": []}  # (clips/s, CPU ms per clip) per round
        ingest_roles = []  # ingest's CPU ms per clip by process role, per round
        niceness = ray_worker_niceness()
        own_sizes = {path: {} for path in paths}
        clip_sizes = clip_decode_sizes(paths, args.short_side)
        for _ in range(args.rounds):
            rounds["decode_only"].append(bench_decode_only(paths, indices, own_sizes, args.cpus, niceness))
            rounds["scaled"].append(bench_decode_only(paths, indices, clip_sizes, args.cpus, niceness))
            rate, cpu_ms, clips, by_role = bench_ingest(src, scratch / "ingest", args.frames, args.size,
                                                        args.short_side)
            rounds["ingest"].append((rate, cpu_ms))
            ingest_roles.append(by_role)

        def rates(side: str) -> list[float]:
            return [rate for rate, _ in rounds[side]]

        def cpu(side: str) -> list[float]:
            return [cpu_ms for _, cpu_ms in rounds[side]]

        def ratio(over: list[float], under: list[float]) -> dict:
            return spread(a / b for a, b in zip(over, under))

        ingest, decode_only, scaled = (statistics.median(rates(side)) for side in ("ingest", "decode_only", "scaled"))
        result = {
            "machine": {"cpus": args.cpus, "platform": platform.platform(), "python": platform.python_version(),
                        "niceness_of_both_sides": niceness, "load_average_1m_at_end": round(os.getloadavg()[0], 2)},
            "videos": {"count": count, "configs": [f"{w}x{h} {n} frames @{f} fps" for w, h, n, f in configs],
                       "key_frame_every": args.gop or "2 s",
                       "bytes": sum(os.path.getsize(path) for path in paths)},
            "clip": {"frames": args.frames, "short_side": args.short_side, "sampling": "uniform"},
            "rounds": args.rounds,
            "ingest_clips_per_s": spread(rates("ingest"), 2),
            "decode_only_clips_per_s": spread(rates("decode_only"), 2),
            "ingest_vs_decode_only": ratio(rates("ingest"), rates("decode_only")),
            "goal_ingest_vs_decode_only": 0.9,
            # CPU time per clip, all processes of each side: insensitive to other load on a shared machine
            "ingest_cpu_ms_per_clip": spread(cpu("ingest"), 1),
            # where ingest's CPU goes: decoding (the children), everything else a worker does (receiving, cropping,
            # writing and publishing shards, Ray's task machinery), the driver (listing, Ray Data's executor, the
            # manifest) and Ray's own processes ("other")
            "ingest_cpu_ms_per_clip_by_role": {
                role: spread([by_role.get(role, 0.0) for by_role in ingest_roles], 1)
                for role in ("decoding_child", "ray_worker", "driver", "other")
            },
            "decode_only_cpu_ms_per_clip": spread(cpu("decode_only"), 1),
            "ingest_vs_decode_only_by_cpu_time": ratio(cpu("decode_only"), cpu("ingest")),
            "decode_only_at_clip_size": {"clips_per_s": spread(rates("scaled"), 2),
                                         "cpu_ms_per_clip": spread(cpu("scaled"), 1),
                                         "ingest_vs_it": ratio(rates("ingest"), rates("scaled")),
                                         "ingest_vs_it_by_cpu_time": ratio(cpu("scaled"), cpu("ingest"))},
        }
        if not args.skip_read_videos:
            read_videos, read_clips = bench_read_videos(paths, indices, scratch / "read_videos", args.frames,
                                                        args.short_side)
            assert read_clips == clips, (read_clips, clips)
            result.update({"read_videos_clips_per_s": round(read_videos, 2),
                           "ingest_vs_read_videos": round(ingest / read_videos, 2),
                           "goal_ingest_vs_read_videos": 3.0})
        ray.shutdown()
        memory = {}
        for total in args.rss_counts:
            folder = make_videos(work, configs, unique, total, f"memory_{total}", args.gop)
            memory[f"videos_{total}"] = job_peak_memory(folder, scratch / f"memory_{total}", args.cpus,
                                                        args.frames, args.size, args.short_side)
        small, large = (memory[f"videos_{total}"] for total in args.rss_counts)
        memory["pss_ratio"] = round(large["peak_pss_mb"] / small["peak_pss_mb"], 3)
        memory["rss_ratio"] = round(large["peak_rss_mb"] / small["peak_rss_mb"], 3)
        memory["goal_ratio"] = 1.2
        result["memory"] = memory
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    emit(result, args.output)


if __name__ == "__main__":
    main()
