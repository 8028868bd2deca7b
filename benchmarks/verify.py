"""What checking a shard's sha256 against its manifest costs a reader, against reading the shard.

Writes one clip dataset version of a single shard in the stored format (row groups of MAX_ROW_GROUP_CLIPS clips of
8x256x256x3, zstd-1, with the shard writer ingest uses) and times, in one process and best of `--repeats`:
reading every row group into `[N, T, S, S, 3]` arrays with `iter_clip_batches` without verification, the same with
verification on the shard's first open in the process (footer + sha256 of the whole file), and again once the
process has verified it (footer only); plus the hash alone and one row group's read (a training unit). Frames are
noise (incompressible: the most bytes to hash per clip) and synthetic motion (smooth: the most decoding per byte).
The file sits in the page cache, so the figures are CPU: on object storage verification also reads the shard's
bytes once more over the network.

    .venv/bin/python benchmarks/verify.py [--row-groups 8] [--repeats 3] [--output FILE]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq

import pipeline.reader
from pipeline.dataset.parts import ShardEntry, stream_sha256
from pipeline.manifest import Manifest, SamplingParams, write_manifest
from pipeline.reader import iter_clip_batches
from pipeline.schema import MAX_ROW_GROUP_CLIPS, frames_to_numpy
from pipeline.shards import ShardWriter
from pipeline.storage import Storage, parse_uri
from pipeline.synthetic import render_motion_frames

from bench_output import emit


def write_dataset(root: str, clips: np.ndarray, sampling: SamplingParams) -> str:
    """A one-shard dataset version holding `clips` (one video per row group); returns the shard's path."""
    storage, location = Storage(), parse_uri(root)
    final = location.join("shards", "part-0.parquet")
    writer = ShardWriter(storage, final, sampling.frames, sampling.short_side)
    for start in range(0, len(clips), MAX_ROW_GROUP_CLIPS):
        group = clips[start : start + MAX_ROW_GROUP_CLIPS]
        indices = np.tile(np.arange(sampling.frames), (len(group), 1))
        writer.add_video(group, indices, f"video-{start}", f"/videos/{start}.mp4", "etag", 0, "left", 25.0, False)
    size, digest = writer.commit({})
    write_manifest(location, Manifest(1, "/videos", sampling, "dirs", {"left": 0},
                                      [ShardEntry("shards/part-0.parquet", len(clips), digest, size)], [], 0, {}),
                   storage)
    return final.path


def timed(work, repeats: int, before=lambda: None) -> dict:
    """Best wall and process CPU seconds of `work` over `repeats` runs, each after `before`."""
    wall, cpu = float("inf"), float("inf")
    for _ in range(repeats):
        before()
        started_wall, started_cpu = time.perf_counter(), time.process_time()
        work()
        wall, cpu = min(wall, time.perf_counter() - started_wall), min(cpu, time.process_time() - started_cpu)
    return {"wall_s": round(wall, 4), "cpu_s": round(cpu, 4)}


def measure(root: str, shard: str, shape: tuple[int, ...], repeats: int) -> dict:
    def read_all(verify: bool) -> None:
        for batch in iter_clip_batches(root, batch_size=MAX_ROW_GROUP_CLIPS, columns=["frames"], verify=verify):
            frames_to_numpy(batch.column("frames"))

    def read_one_row_group() -> None:
        frames_to_numpy(pq.ParquetFile(shard).read_row_group(0, columns=["frames"]).column("frames"), shape)

    forget = pipeline.reader._verified.clear
    figures = {
        "read_unverified": timed(lambda: read_all(False), repeats),
        "read_verified_first_open": timed(lambda: read_all(True), repeats, before=forget),
        "read_verified_again": timed(lambda: read_all(True), repeats),
        "sha256_only": timed(lambda: stream_sha256(Storage().arrow_filesystem(parse_uri(shard)), shard), repeats),
        "read_one_row_group": timed(read_one_row_group, repeats),
    }
    unverified, first = figures["read_unverified"], figures["read_verified_first_open"]
    size = Storage().arrow_filesystem(parse_uri(shard)).get_file_info(shard).size
    figures["shard_bytes"] = size
    figures["first_open_cpu_overhead"] = round(first["cpu_s"] / unverified["cpu_s"] - 1, 3)
    figures["sha256_mb_per_cpu_s"] = round(size / 1e6 / figures["sha256_only"]["cpu_s"], 1)
    figures["sha256_cost_in_row_group_reads"] = round(
        figures["sha256_only"]["cpu_s"] / figures["read_one_row_group"]["cpu_s"], 1
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--row-groups", type=int, default=8)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--short-side", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    side, count = args.short_side, args.row_groups * MAX_ROW_GROUP_CLIPS
    sampling = SamplingParams(frames=args.frames, short_side=side, size=side)
    shape = (args.frames, side, side, 3)
    result = {"clip_shape": list(shape), "row_group_clips": MAX_ROW_GROUP_CLIPS, "row_groups": args.row_groups}
    contents = {
        "noise": lambda: rng.integers(0, 256, (count, *shape), dtype=np.uint8),
        "synthetic_motion": lambda: np.stack([render_motion_frames("left", side, side, args.frames, rng)
                                              for _ in range(count)]),
    }
    for name, make in contents.items():
        with tempfile.TemporaryDirectory() as root:
            shard = write_dataset(root, make(), sampling)
            result[name] = measure(root, shard, shape, args.repeats)
    emit(result, args.output)


if __name__ == "__main__":
    main()
