#!/usr/bin/env python
"""Ingest from S3 into S3, with an object store's time to first byte, against the same ingest of local files; prints
one JSON object.

    python benchmarks/ingest_s3.py [--latency-ms 30] [--videos 48] [--cpus N] [--rounds 3] [--output FILE]

- S3: moto's server (`python -m moto.server`, its own process, on 127.0.0.1) behind a proxy in this process that
  holds the first bytes of every response for --latency-ms, as a store's time to first byte; loopback has none, so
  without the proxy every wait of a worker on the store would look free;
- ingest_s3: `jobs.ingest.run_ingest` of s3://BUCKET/raw/ into a fresh s3://BUCKET/outN/ through the proxy, on a
  local Ray with N CPUs; ingest_local: the same videos from and into local folders; both after a warm-up run;
- `local_vs_s3`: the local run's clips/s over the S3 run's, per round (the two alternate round by round): how much of
  ingest's speed the store's waits take. Ingest reads each video and publishes each shard while the next video
  decodes; runs under 256 videos have a video per shard, so a shard's upload per video is to be hidden.
The videos are benchmarks/ingest.py's full set (240p to 720p, a key frame every 2 s), cached in --work-dir.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# The repository's packages first and this folder not at all: benchmarks/model.py would be `model` here and in the
# Ray workers, which get the driver's script folder on their path (and its working folder: run from anywhere but
# benchmarks/).
sys.path[:] = [str(REPO_ROOT)] + [path for path in sys.path if Path(path or ".").resolve() != REPO_ROOT / "benchmarks"]

from benchmarks.bench_output import emit, free_port, spread  # noqa: E402
from benchmarks.ingest import FULL_CONFIGS, make_videos  # noqa: E402


def start_latency_proxy(listen: int, target: int, latency_s: float) -> None:
    """A TCP proxy 127.0.0.1:listen -> 127.0.0.1:target in a daemon thread: the first bytes the server sends after
    each request of the client wait `latency_s`, the rest flows as it comes."""

    async def pump(reader, writer, turn: dict, delays: bool) -> None:
        try:
            while data := await reader.read(1 << 16):
                if delays and turn["asked"]:
                    turn["asked"] = False
                    await asyncio.sleep(latency_s)
                elif not delays:
                    turn["asked"] = True
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def connection(client_reader, client_writer) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target)
        turn = {"asked": False}
        await asyncio.gather(pump(client_reader, server_writer, turn, False),
                             pump(server_reader, client_writer, turn, True), return_exceptions=True)

    ready = threading.Event()

    async def serve() -> None:
        server = await asyncio.start_server(connection, "127.0.0.1", listen)
        ready.set()
        async with server:
            await server.serve_forever()

    threading.Thread(target=lambda: asyncio.run(serve()), name="latency proxy", daemon=True).start()
    if not ready.wait(timeout=30):
        raise RuntimeError("the latency proxy did not start")


def start_moto(port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("moto's server did not start")


def ingest_rate(src: str, out: str, endpoint_url: str | None) -> float:
    from jobs.config import build
    from jobs.ingest import run_ingest
    from jobs.options import IngestConfig

    started = time.perf_counter()
    summary = run_ingest(build(IngestConfig, dict(src=src, out=out, endpoint_url=endpoint_url)), echo=lambda _: None)
    assert summary.errored == 0 and summary.ingested == summary.listed, summary
    return summary.clips_written / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-ms", type=float, default=30.0, help="time to first byte of every S3 response")
    parser.add_argument("--videos", type=int, default=48)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "uniformer-ingest-bench"))
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args()

    src = make_videos(Path(args.work_dir) / "full", FULL_CONFIGS, 2, args.videos, f"throughput_{args.videos}", None)
    # moto takes any keys; set before Ray starts, so that its workers inherit them
    os.environ.update(AWS_ACCESS_KEY_ID="benchmark", AWS_SECRET_ACCESS_KEY="benchmark", AWS_DEFAULT_REGION="us-east-1")
    moto_port, proxy_port = free_port(), free_port()
    moto = start_moto(moto_port)
    scratch = Path(tempfile.mkdtemp(prefix="ingest-s3-bench-"))
    try:
        import boto3
        import ray

        start_latency_proxy(proxy_port, moto_port, args.latency_ms / 1000)
        endpoint = f"http://127.0.0.1:{proxy_port}"
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto_port}")
        client.create_bucket(Bucket=bucket)
        for path in sorted(src.glob("*.mp4")):
            client.upload_file(str(path), bucket, f"raw/{path.name}")
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        ray.data.DataContext.get_current().enable_progress_bars = False

        ingest_rate(f"s3://{bucket}/raw/", f"s3://{bucket}/warm/", endpoint)  # workers started, imports done
        local, remote = [], []
        for index in range(args.rounds):
            shutil.rmtree(scratch / "local", ignore_errors=True)
            local.append(ingest_rate(str(src), str(scratch / "local"), None))
            remote.append(ingest_rate(f"s3://{bucket}/raw/", f"s3://{bucket}/out{index}/", endpoint))
        ray.shutdown()
    finally:
        moto.kill()
        moto.wait()
        shutil.rmtree(scratch, ignore_errors=True)
    emit({
        "benchmark": "ingest_s3",
        "machine": {"cpus": args.cpus, "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_1m_at_end": round(os.getloadavg()[0], 2)},
        "videos": args.videos,
        "latency_ms": args.latency_ms,
        "rounds": args.rounds,
        "ingest_local_clips_per_s": spread(local, 2),
        "ingest_s3_clips_per_s": spread(remote, 2),
        "local_vs_s3": spread((a / b for a, b in zip(local, remote)), 3),
    }, args.output)


if __name__ == "__main__":
    main()
