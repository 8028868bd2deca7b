"""Dataset metadata and driver memory at 10k, 100k and 1M videos, on synthesized datasets (no video is decoded).

For each size: a clip dataset of that many videos (one clip each, 1x2x2 pixels: the metadata is real, the pixels
are not), written as ingest writes it (16-clip row groups, shards of SHARD_VIDEOS videos, a manifest, a source
table), then, each in a fresh process so that its peak memory is its own:
  driver_plan        what the training driver does once: cut the epoch plan (the split by video, the units of
                     every shard: reads each shard's footer and video ids, and checks its sha256; with these tiny
                     pixels the hashing is cheap, with real clips it reads the whole dataset: benchmarks/verify.py)
  worker_open        what a training worker does to open the version: load the manifest, take the driver's units
  incremental_plan   the driver of an incremental ingest of 10,000 new videos: read the version's sources, plan
  listing            `list_videos` over synthesized pages of 1,000 objects (S3 ListObjectsV2's page, built in memory
                     so that what is timed is the driver's own work, not a network), the listing held by the driver
  ingest_plan        the whole driver side of an incremental ingest of 10,000 new videos: list, label from
                     folders, read the version's sources and errors, plan; ingest_first_plan: the same into an
                     empty destination (every video pending), up to the items handed to Ray Data
  score_plan         the same for scoring (a predictions version holding every video, 10,000 new);
                     score_first_plan: a first run (every video pending), up to the items handed to Ray Data
  new_version        the source side of an incremental ingest's commit (10,000 videos added, 1,000 removed): read the
                     version's sources, update them, write the delta; and the bytes the new version writes besides
                     shards: its manifest and its source table (the delta of 11,000 videos).
Peaks are the phase's peak resident memory less the resident memory just before it (after the imports); `_cpu_s`
is the phase's CPU time, which other processes on a shared machine do not inflate as they do wall time (`_s`).
Also the listing time of real paged listings at a size that fits here (`--listing-objects`, default 5,000): a local
folder of empty files walked, and a moto S3 server's ListObjectsV2 pages of 1,000 keys; both per 1,000 objects,
which a listing of N objects takes N/1,000 times (pages come one after another: each needs the previous one's
continuation token).

    .venv/bin/python benchmarks/scale.py [--sizes 10000 100000 1000000] [--listing-objects 5000] [--output FILE]

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

REPO_ROOT = Path(__file__).resolve().parents[1]
# The repository's packages first and this folder not at all: benchmarks/model.py would be `model` here and in the
# Ray workers, which get the driver's script folder on their path (and its working folder: run from anywhere but
# benchmarks/).
sys.path[:] = [str(REPO_ROOT)] + [path for path in sys.path if Path(path or ".").resolve() != REPO_ROOT / "benchmarks"]

from benchmarks.bench_output import emit, status_mb  # noqa: E402

NEW_VIDEOS = 10_000
SHARD_VIDEOS = 160  # an 8x256x256 clip is 1.57 MB: ingest's 256 MB shards hold about 160 clips
CLASSES = 400
SIZE = 1000


def rss_mb() -> float:
    """Resident memory now, after resetting the peak to it (Linux: clear_refs 5), so that `peak_mb` measures the
    phase that follows and not the imports before it."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return status_mb("VmRSS")


def peak_mb() -> float:
    return status_mb("VmHWM")


def video_id(i: int) -> str:
    return f"class_{i % CLASSES:03d}/video_{i:08d}.mp4"


def video_ids(count: int, start: int = 0) -> list[str]:
    return [video_id(i) for i in range(start, start + count)]


def etag(i: int) -> str:
    return f"{i:032x}"  # an S3 ETag's length


def synthetic_storage(count: int):
    """Storage whose listing of s3://raw/ is `count` synthesized videos, in key order, in pages of 1,000; every other
    call is the real Storage's."""
    from pipeline.storage import Location, ObjectInfo, Storage

    order = sorted(range(count), key=video_id)

    class ListedStorage(Storage):
        def list_objects(self, root):
            if root.uri.rstrip("/") != "s3://raw":
                yield from super().list_objects(root)
                return
            for first in range(0, count, 1000):
                page = [ObjectInfo(Location("s3", "raw", video_id(i)), SIZE, etag(i), 0.0)
                        for i in order[first : first + 1000]]
                yield from page

    return ListedStorage()


def synthesize(root: Path, count: int) -> None:
    """A dataset version of `count` videos at `root`, written with the pipeline's own writers."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.dataset.parts import ShardEntry, file_sha256
    from pipeline.dataset.sources import SourceTable, write_sources
    from pipeline.manifest import Manifest, SamplingParams, write_manifest
    from pipeline.schema import clip_schema, frames_array
    from pipeline.shards import parquet_write_options
    from pipeline.storage import Storage, parse_uri

    storage, location = Storage(), parse_uri(str(root))
    sampling = SamplingParams(frames=1, short_side=2, size=2)
    schema = clip_schema(1, 2)
    options = parquet_write_options(schema)
    ids = video_ids(count)
    shards, sources = [], []
    (root / "shards").mkdir(parents=True)
    for first in range(0, count, SHARD_VIDEOS):
        chunk = ids[first : first + SHARD_VIDEOS]
        rows = len(chunk)
        table = pa.table(
            {
                "video_id": chunk,
                "source_uri": [f"s3://raw/{v}" for v in chunk],
                "source_etag": [etag(first + i) for i in range(rows)],
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
        sources += [{"video_id": video, "uri": f"s3://raw/{video}", "etag": etag(i), "size": SIZE,
                     "label_name": video.split("/")[0], "clips": 1, "shard": path}
                    for i, video in enumerate(chunk, start=first)]
    added, delta = SourceTable.empty().updated((), SourceTable.from_rows(sources).table)
    chain = write_sources(location, 1, [], added, delta, storage)
    class_map = {f"class_{i:03d}": i for i in range(CLASSES)}
    manifest = Manifest(1, "s3://raw/", sampling, "dirs", class_map, shards, chain, len(added), {"listed": count})
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
    from pipeline.listing import attach_labels, list_videos
    from pipeline.storage import parse_uri

    listed = list_videos("s3://raw/", synthetic_storage(count))
    return listed, attach_labels(listed, parse_uri("s3://raw/"), labels_from_dirs=True)[0]


def measure_incremental_plan(root: str, count: int) -> dict:
    from pipeline.dataset.sources import read_sources
    from pipeline.ingest import plan_ingest
    from pipeline.manifest import latest_manifest
    from pipeline.storage import Storage, parse_uri

    listed, labelled = listing(count + NEW_VIDEOS)
    before, started, cpu = rss_mb(), time.perf_counter(), time.process_time()
    storage, location = Storage(), parse_uri(root)
    previous = latest_manifest(location, storage)
    sources = read_sources(location, previous, storage)
    plan = plan_ingest(root, "s3://raw/", listed, labelled, [], "dirs", previous.sampling, previous, sources)
    assert plan.num_pending == NEW_VIDEOS, plan.num_pending
    return {"incremental_plan_s": time.perf_counter() - started, "incremental_plan_cpu_s": time.process_time() - cpu,
            "incremental_plan_peak_mb": peak_mb() - before, "done_set_mb": sources.table.nbytes / 2**20}


def measure_listing(count: int) -> dict:
    from pipeline.listing import list_videos

    storage = synthetic_storage(count)
    before, started, cpu = rss_mb(), time.perf_counter(), time.process_time()
    held = list_videos("s3://raw/", storage)
    return {"listing_s": time.perf_counter() - started, "listing_cpu_s": time.process_time() - cpu,
            "driver_peak_mb": peak_mb() - before, "objects": len(held)}


def measure_ingest_plan(root: str, count: int, first_run: bool) -> dict:
    """The ingest driver from listing to the items Ray Data gets (jobs.ingest.run_ingest's steps, without the run
    record): incremental against the version at `root`, or into an empty destination."""
    from pipeline.dataset.failures import read_failures
    from pipeline.dataset.sources import read_sources
    from pipeline.ingest import plan_ingest, ray_items
    from pipeline.listing import attach_labels, list_videos
    from pipeline.manifest import SamplingParams, latest_manifest
    from pipeline.storage import parse_uri

    listed_count = count if first_run else count + NEW_VIDEOS
    storage, source = synthetic_storage(listed_count), parse_uri("s3://raw/")
    destination = parse_uri(os.path.join(root, "empty") if first_run else root)
    before, started, cpu = rss_mb(), time.perf_counter(), time.process_time()
    listed = list_videos(source, storage)
    labelled, label_errors = attach_labels(listed, source, labels_from_dirs=True)
    previous = latest_manifest(destination, storage)
    sources = read_sources(destination, previous, storage) if previous else None
    failures = read_failures(destination, previous.errors, storage) if previous else {}
    sampling = previous.sampling if previous else SamplingParams(frames=1, short_side=2, size=2)
    plan = plan_ingest(destination.uri, source.uri, listed, labelled, label_errors, "dirs", sampling, previous,
                       sources, previous_failures=failures)
    handed = sum(1 for _ in ray_items(plan, cpus=64))
    assert plan.num_pending == (count if first_run else NEW_VIDEOS), plan.num_pending
    prefix = "ingest_first_plan" if first_run else "ingest_plan"
    return {f"{prefix}_s": time.perf_counter() - started, f"{prefix}_cpu_s": time.process_time() - cpu,
            f"{prefix}_peak_mb": peak_mb() - before,
            f"{prefix}_ray_items": handed}


MODEL = dict(uri="models:/actions/1", name="actions", version=1, alias=None, run_id=None, model_id=None,
             package_sha256="0" * 64)
PARAMS = dict(frames=8, crop=224, short_side=256, temporal_views=1, spatial_views=1, sampling="uniform", stride=0,
              top_k=5, full_probs=False)


def synthesize_predictions(root: Path, count: int) -> None:
    """A predictions version (manifest and source table: planning reads no shard) holding `count` videos, 1,000 per
    shard."""
    from pipeline.dataset.parts import ShardEntry
    from pipeline.dataset.sources import SourceTable, write_sources
    from pipeline.predictions import ScoreManifest, write_score_manifest
    from pipeline.storage import Storage, parse_uri

    storage, location = Storage(), parse_uri(str(root))
    shards = [ShardEntry(f"predictions/part-{n:06d}.parquet", 1000, "0" * 64, 1) for n in range(-(-count // 1000))]
    rows = [{"video_id": video_id(i), "uri": f"s3://raw/{video_id(i)}", "etag": etag(i), "size": SIZE,
             "shard": shards[i // 1000].path} for i in range(count)]
    sources, delta = SourceTable.empty().updated((), SourceTable.from_rows(rows).table)
    chain = write_sources(location, 1, [], sources, delta, storage)
    manifest = ScoreManifest(1, "s3://raw/", MODEL, PARAMS, [f"class_{i:03d}" for i in range(CLASSES)], shards,
                             chain, len(sources), {"listed": count}, {})
    write_score_manifest(location, manifest, storage)


def measure_score_plan(root: str, count: int, first_run: bool) -> dict:
    """The score driver from listing to the items Ray Data gets (jobs.score.run_score's steps, without the model)."""
    from jobs.registry import ModelIdentity
    from jobs.score import ray_items
    from jobs.scoring.results import plan_score
    from pipeline.dataset.failures import read_failures
    from pipeline.listing import list_videos
    from pipeline.predictions import ScoreParams, latest_score_manifest
    from pipeline.storage import parse_uri

    listed_count = count if first_run else count + NEW_VIDEOS
    storage, source = synthetic_storage(listed_count), parse_uri("s3://raw/")
    destination = parse_uri(os.path.join(root, "empty-predictions" if first_run else "predictions-root"))
    before, started, cpu = rss_mb(), time.perf_counter(), time.process_time()
    listed = list_videos(source, storage)
    previous = latest_score_manifest(destination, storage)
    failures = read_failures(destination, previous.errors, storage) if previous else {}
    plan = plan_score(destination, source, listed, ModelIdentity(**MODEL), ScoreParams(**PARAMS), previous, storage,
                      previous_failures=failures)
    handed = sum(1 for _ in ray_items(plan.groups.videos, plan.groups.size))
    assert plan.num_pending == (count if first_run else NEW_VIDEOS), plan.num_pending
    prefix = "score_first_plan" if first_run else "score_plan"
    return {f"{prefix}_s": time.perf_counter() - started, f"{prefix}_cpu_s": time.process_time() - cpu,
            f"{prefix}_peak_mb": peak_mb() - before,
            f"{prefix}_ray_items": handed}


def measure_listing_time(objects: int) -> dict:
    """Real paged listings of `objects` objects: a local folder walked, and a moto S3 server's ListObjectsV2 pages."""
    import boto3
    from moto.server import ThreadedMotoServer

    from pipeline.listing import list_videos
    from pipeline.storage import Storage

    figures = {"listing_objects": objects}
    with tempfile.TemporaryDirectory(prefix="scale-listing-") as folder:
        for i in range(objects):
            path = Path(folder, video_id(i))
            path.parent.mkdir(exist_ok=True)
            path.touch()
        started = time.perf_counter()
        assert len(list_videos(folder, Storage())) == objects
        figures["local_walk_s_per_1000"] = (time.perf_counter() - started) / objects * 1000

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="raw")
        for i in range(objects):
            client.put_object(Bucket="raw", Key=video_id(i), Body=b"")
        started = time.perf_counter()
        assert len(list_videos("s3://raw/", Storage(endpoint))) == objects
        figures["moto_s3_s_per_1000"] = (time.perf_counter() - started) / objects * 1000
    finally:
        server.stop()
    return figures


def measure_new_version(root: str, count: int) -> dict:
    """The source side of an incremental ingest's commit (10,000 videos added, 1,000 removed: read the version's
    sources, update them, write the delta), and what the new version writes besides its shards: manifest and source
    table."""
    from pipeline.dataset.sources import SourceTable, read_sources, write_sources
    from pipeline.manifest import latest_manifest
    from pipeline.storage import Storage, parse_uri

    storage, location = Storage(), parse_uri(root)
    added = SourceTable.from_rows([{"video_id": v, "uri": f"s3://raw/{v}", "etag": "e", "size": 1000,
                                    "label_name": v.split("/")[0], "clips": 1, "shard": "shards/new.parquet"}
                                   for v in video_ids(NEW_VIDEOS, count)])
    before, started, cpu = rss_mb(), time.perf_counter(), time.process_time()
    previous = latest_manifest(location, storage)
    grown, delta = read_sources(location, previous, storage).updated(video_ids(1000), added.table)
    chain = write_sources(location, 2, previous.source_tables, grown, delta, storage)
    figures = {"incremental_commit_s": time.perf_counter() - started, "incremental_commit_cpu_s":
               time.process_time() - cpu, "incremental_commit_peak_mb": peak_mb() - before}
    table_bytes = os.path.getsize(os.path.join(root, chain[-1]["path"]))
    manifest_bytes = os.path.getsize(os.path.join(root, "manifests", "v000001.json"))
    return {**figures, "manifest_bytes_per_version": manifest_bytes + table_bytes,
            "manifest_json_bytes": manifest_bytes, "source_delta_bytes": table_bytes,
            "full_source_table_bytes": os.path.getsize(os.path.join(root, previous.source_tables[0]["path"]))}


def in_fresh_process(kind: str, root: str, count: int) -> dict:
    output = subprocess.run([sys.executable, __file__, "--measure", kind, "--root", root, "--count", str(count)],
                            check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--listing-objects", type=int, default=5000)
    parser.add_argument("--output")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measures = {"driver_plan": lambda: measure_driver_plan(args.root),
                    "worker_open": lambda: measure_worker_open(args.root),
                    "incremental_plan": lambda: measure_incremental_plan(args.root, args.count),
                    "listing": lambda: measure_listing(args.count),
                    "ingest_plan": lambda: measure_ingest_plan(args.root, args.count, first_run=False),
                    "ingest_first_plan": lambda: measure_ingest_plan(args.root, args.count, first_run=True),
                    "score_plan": lambda: measure_score_plan(args.root, args.count, first_run=False),
                    "score_first_plan": lambda: measure_score_plan(args.root, args.count, first_run=True),
                    "new_version": lambda: measure_new_version(args.root, args.count),
                    "listing_time": lambda: measure_listing_time(args.count)}
        print(json.dumps(measures[args.measure]()))
        return
    result = {"new_videos_per_version": NEW_VIDEOS, "videos_per_shard": SHARD_VIDEOS, "sizes": {}}
    goals = {"worker_open_s": 1.0, "worker_open_peak_mb": 200, "incremental_plan_s": 30}
    for count in args.sizes:
        with tempfile.TemporaryDirectory(prefix="scale-bench-") as scratch:
            root = os.path.join(scratch, "clips")
            started = time.perf_counter()
            synthesize(Path(root), count)
            synthesize_predictions(Path(root, "predictions-root"), count)
            figures = {"synthesize_s": time.perf_counter() - started}
            for kind in ("driver_plan", "worker_open", "incremental_plan", "listing", "ingest_plan",
                         "ingest_first_plan", "score_plan", "score_first_plan", "new_version"):
                figures.update(in_fresh_process(kind, root, count))
        result["sizes"][str(count)] = {k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}
    result["listing_time"] = in_fresh_process("listing_time", "", args.listing_objects)
    result["goals"] = goals
    emit(result, args.output)


if __name__ == "__main__":
    main()
