"""Dataset metadata and driver memory at 10k, 100k and 1M videos, on synthesized datasets (no video is decoded).

For each size: a clip dataset of that many videos (one clip each, 1x2x2 pixels: the metadata is real, the pixels
are not), written as ingest writes it (16-clip row groups, shards of SHARD_VIDEOS videos, a manifest, a source
table), then, each in a fresh process so that its peak memory is its own:
  driver_plan        what the training driver does once: cut the epoch plan (the split by video, the units of
                     every shard: reads each shard's footer and video ids, and checks its sha256; with these tiny
                     pixels the hashing is cheap, with real clips it reads the whole dataset: benchmarks/verify.py)
  worker_open        what a training worker does to open the version: load the manifest, take the driver's units
  incremental_plan   the driver of an incremental ingest of 10,000 new videos: read the version's sources, plan
  listing            a listing of every object (synthesized SourceVideo rows) held by the driver
Peaks are the phase's peak resident memory less the resident memory just before it (after the imports).
Also the bytes a new version writes besides shards: its manifest and its source table (a delta of 10,000 videos).

    .venv/bin/python benchmarks/scale.py [--sizes 10000 100000 1000000] [--output FILE]

Prints one JSON object: {"sizes": {"1000000": {"worker_open_s": .., "worker_open_peak_mb": ..,
"incremental_plan_s": .., "manifest_bytes_per_version": .., "driver_peak_mb": .., ...}, ...}}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_output import emit

NEW_VIDEOS = 10_000
SHARD_VIDEOS = 160  # an 8x256x256 clip is 1.57 MB: ingest's 256 MB shards hold about 160 clips
CLASSES = 400


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def rss_mb() -> float:
    """Resident memory now, after resetting the peak to it (Linux: clear_refs 5), so that `peak_mb` measures the
    phase that follows and not the imports before it."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _status_mb("VmRSS")


def peak_mb() -> float:
    return _status_mb("VmHWM")


def video_ids(count: int, start: int = 0) -> list[str]:
    return [f"class_{i % CLASSES:03d}/video_{i:08d}.mp4" for i in range(start, start + count)]


def synthesize(root: Path, count: int) -> None:
    """A dataset version of `count` videos at `root`, written with the pipeline's own writers."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.manifest import Manifest, SamplingParams, ShardEntry, write_manifest, write_sources
    from pipeline.schema import clip_schema, frames_array
    from pipeline.shards import file_sha256, parquet_write_options
    from pipeline.storage import Storage, parse_uri

    storage, location = Storage(), parse_uri(str(root))
    sampling = SamplingParams(frames=1, short_side=2, size=2)
    schema = clip_schema(1, 2)
    options = parquet_write_options(schema)
    ids = video_ids(count)
    shards, sources = [], {}
    (root / "shards").mkdir(parents=True)
    for first in range(0, count, SHARD_VIDEOS):
        chunk = ids[first : first + SHARD_VIDEOS]
        rows = len(chunk)
        table = pa.table(
            {
                "video_id": chunk,
                "source_uri": [f"s3://raw/{v}" for v in chunk],
                "source_etag": ["e"] * rows,
                "clip_index": pa.array(np.zeros(rows, np.int32)),
                "label": pa.array([hash(v) % CLASSES for v in chunk], pa.int32()),
                "label_name": [v.split("/")[0] for v in chunk],
                "frames": frames_array(np.zeros((rows, 1, 2, 2, 3), np.uint8)),
                "frame_indices": pa.array([[0]] * rows, pa.list_(pa.int32())),
                "fps": pa.array(np.full(rows, 25.0, np.float32)),
                "padded": pa.array(np.zeros(rows, bool)),
            },
            schema=schema,
        )
        path = f"shards/part-{first // SHARD_VIDEOS:06d}.parquet"
        pq.write_table(table, root / path, **options)
        shards.append(ShardEntry(path, rows, file_sha256(str(root / path)), (root / path).stat().st_size))
        for video in chunk:
            sources[video] = {"uri": f"s3://raw/{video}", "etag": "e", "size": 1000, "label_name": video.split("/")[0],
                              "clips": 1, "shard": path}
    chain = write_sources(location, 1, None, {}, sources, storage)
    class_map = {f"class_{i:03d}": i for i in range(CLASSES)}
    manifest = Manifest(1, "s3://raw/", sampling, "dirs", class_map, shards, chain, len(sources), {"listed": count})
    write_manifest(location, manifest, storage)


def measure_driver_plan(root: str) -> dict:
    import dataclasses

    from pipeline.epochs import EpochPlan
    from pipeline.manifest import load_manifest

    before, started = rss_mb(), time.perf_counter()
    plan = EpochPlan(root, load_manifest(root), "train", 0.1, world_size=8, seed=0)
    units = [dataclasses.astuple(unit) for unit in plan.units]
    figures = {"driver_plan_s": time.perf_counter() - started, "driver_plan_peak_mb": peak_mb() - before,
               "units": len(units)}
    with open(os.path.join(root, "units.json"), "w") as handle:  # what the loop config carries to workers
        json.dump(units, handle)
    figures["units_bytes_to_workers"] = os.path.getsize(os.path.join(root, "units.json"))
    return figures


def measure_worker_open(root: str) -> dict:
    from pipeline.epochs import EpochPlan
    from pipeline.manifest import load_manifest

    before, started = rss_mb(), time.perf_counter()
    manifest = load_manifest(root)
    with open(os.path.join(root, "units.json")) as handle:
        units = json.load(handle)
    EpochPlan(root, manifest, "train", 0.1, world_size=8, seed=0, units=units)
    return {"worker_open_s": time.perf_counter() - started, "worker_open_peak_mb": peak_mb() - before}


def listing(count: int):
    from pipeline.listing import SourceVideo

    return [SourceVideo(f"s3://raw/{v}", v, 1000, "e", v.split("/")[0]) for v in video_ids(count)]


def measure_incremental_plan(root: str, count: int) -> dict:
    from pipeline.ingest import plan_ingest
    from pipeline.manifest import latest_manifest, read_sources
    from pipeline.storage import Storage, parse_uri

    listed = listing(count + NEW_VIDEOS)
    before, started = rss_mb(), time.perf_counter()
    storage, location = Storage(), parse_uri(root)
    previous = latest_manifest(location, storage)
    sources = read_sources(location, previous, storage)
    plan = plan_ingest(root, "s3://raw/", listed, listed, [], "dirs", previous.sampling, previous, sources)
    assert plan.num_pending == NEW_VIDEOS, plan.num_pending
    return {"incremental_plan_s": time.perf_counter() - started, "incremental_plan_peak_mb": peak_mb() - before}


def measure_listing(count: int) -> dict:
    import pipeline.listing  # noqa: F401 (imports are the baseline, not the listing)

    before, started = rss_mb(), time.perf_counter()
    held = listing(count)
    return {"listing_s": time.perf_counter() - started, "driver_peak_mb": peak_mb() - before, "objects": len(held)}


def new_version_bytes(root: str, count: int) -> dict:
    """What the next version (10,000 videos added) writes besides its shards: manifest and source table."""
    from pipeline.manifest import latest_manifest, read_sources, write_sources
    from pipeline.storage import Storage, parse_uri

    storage, location = Storage(), parse_uri(root)
    previous = latest_manifest(location, storage)
    sources = read_sources(location, previous, storage)
    grown = {**sources, **{v: {"uri": f"s3://raw/{v}", "etag": "e", "size": 1000, "label_name": v.split("/")[0],
                               "clips": 1, "shard": "shards/new.parquet"} for v in video_ids(NEW_VIDEOS, count)}}
    chain = write_sources(location, 2, previous, sources, grown, storage)
    table_bytes = os.path.getsize(os.path.join(root, chain[-1]["path"]))
    manifest_bytes = os.path.getsize(os.path.join(root, "manifests", "v000001.json"))
    return {"manifest_bytes_per_version": manifest_bytes + table_bytes, "manifest_json_bytes": manifest_bytes,
            "source_delta_bytes": table_bytes, "full_source_table_bytes":
            os.path.getsize(os.path.join(root, previous.source_tables[0]["path"]))}


def in_fresh_process(kind: str, root: str, count: int) -> dict:
    output = subprocess.run([sys.executable, __file__, "--measure", kind, "--root", root, "--count", str(count)],
                            check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--output")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measures = {"driver_plan": lambda: measure_driver_plan(args.root),
                    "worker_open": lambda: measure_worker_open(args.root),
                    "incremental_plan": lambda: measure_incremental_plan(args.root, args.count),
                    "listing": lambda: measure_listing(args.count)}
        print(json.dumps(measures[args.measure]()))
        return
    result = {"new_videos_per_version": NEW_VIDEOS, "videos_per_shard": SHARD_VIDEOS, "sizes": {}}
    goals = {"worker_open_s": 1.0, "worker_open_peak_mb": 200, "incremental_plan_s": 30}
    for count in args.sizes:
        with tempfile.TemporaryDirectory(prefix="scale-bench-") as scratch:
            root = os.path.join(scratch, "clips")
            started = time.perf_counter()
            synthesize(Path(root), count)
            figures = {"synthesize_s": time.perf_counter() - started}
            for kind in ("driver_plan", "worker_open", "incremental_plan", "listing"):
                figures.update(in_fresh_process(kind, root, count))
            figures.update(new_version_bytes(root, count))
        result["sizes"][str(count)] = {k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}
    result["goals"] = goals
    emit(result, args.output)


if __name__ == "__main__":
    main()
