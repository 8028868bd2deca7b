#!/usr/bin/env python
"""The Ray Serve endpoint against the in-process prediction path on the same videos; prints one JSON object.

    python benchmarks/serve.py [--videos 16] [--requests 48] [--concurrency 4] [--views 1x1] [--max-batch-size 4]
                               [--cpus-per-replica 1] [--output FILE]

- in-process: the registered pyfunc's `predict` (jobs.serving.pyfunc_model, what each replica runs) called once per
  video, one after another, on a body's base64 text, with as many torch threads as a replica has CPUs;
- endpoint: `uniformer serve`'s application (jobs.serve.start) on a local Ray, one replica, POSTs of one video each
  from --concurrency client threads; what it adds is HTTP, JSON, Serve's routing and the batching queue;
- both report requests/s and p50/p99 latency in ms, after a warm-up of each; `ratio_requests_per_s` is endpoint /
  in-process, measured in this one run.
The model is the tiny test configuration (uniformerv2_tiny, 8 frames of 32 px, random weights): the figures say what
serving costs around a model call, not a B/16's speed. Videos are generated once into --work-dir.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_output import emit, free_port  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", type=int, default=16, help="distinct videos, sent round-robin")
    p.add_argument("--requests", type=int, default=48, help="requests measured per path (after a warm-up)")
    p.add_argument("--concurrency", type=int, default=4, help="client threads POSTing to the endpoint")
    p.add_argument("--views", default="1x1", help="test views of every prediction")
    p.add_argument("--max-batch-size", type=int, default=4)
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "uniformer-bench-serve"))
    p.add_argument("--output", help="also write the JSON here")
    return p.parse_args(argv)


def make_inputs(work_dir: Path, count: int) -> tuple[Path, list[str]]:
    """The tiny package and `count` videos' base64 texts."""
    import torch

    import model
    from model.package import ModelCard, save_package
    from pipeline import generate_motion_dataset

    card = ModelCard("uniformerv2_tiny", 4, {"t_size": 8, "input_normalization": "slowfast"},
                     ["down", "left", "right", "up"], 8, 32, 40)
    package = work_dir / "package"
    if not (package / "model.safetensors").exists():
        torch.manual_seed(0)
        save_package(model.create_model(card.model, card.num_classes, **card.overrides), card, package)
    videos = work_dir / "videos"
    if len(list(videos.rglob("*.mp4"))) < count:
        generate_motion_dataset(videos, max(1, -(-count // 4)), size=(96, 72), num_frames=32, seed=1)
    paths = sorted(videos.rglob("*.mp4"))[:count]
    return package, [base64.b64encode(path.read_bytes()).decode() for path in paths]


def latencies(seconds: list[float], wall_s: float) -> dict:
    ordered = sorted(seconds)
    return {"requests": len(ordered), "requests_per_s": round(len(ordered) / wall_s, 2),
            "p50_ms": round(1000 * statistics.median(ordered), 1),
            "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1)}


def in_process(package: Path, bodies: list[str], requests: int, views: str, threads: int) -> dict:
    import pandas as pd
    import torch

    from jobs.serving.pyfunc_model import UniFormerV2Classifier

    torch.set_num_threads(threads)
    classifier = UniFormerV2Classifier().load(str(package / "model.safetensors"), str(package / "model_config.json"))

    def call(body: str) -> None:
        rows = classifier.predict(None, pd.DataFrame({"video": [body]}), {"views": views, "top_k": 5})
        assert rows["error"][0] is None, rows["error"][0]

    for body in bodies[:2]:  # warm-up
        call(body)
    seconds, started = [], time.monotonic()
    for i in range(requests):
        begun = time.monotonic()
        call(bodies[i % len(bodies)])
        seconds.append(time.monotonic() - begun)
    return latencies(seconds, time.monotonic() - started)


def endpoint(package: Path, bodies: list[str], args: argparse.Namespace) -> dict:
    from ray import serve

    from jobs.options import ServeConfig, ServeOptions
    from jobs.serve import start

    config = ServeConfig(model=str(package), port=free_port(), views=args.views,
                         options=ServeOptions(max_batch_size=args.max_batch_size,
                                              cpus_per_replica=args.cpus_per_replica))
    started = time.monotonic()
    summary = start(config, echo=lambda line: print(line, file=sys.stderr))
    start_s = time.monotonic() - started
    url = summary["url"]

    def post(body: str) -> float:
        data = json.dumps({"videos": [{"video": body}]}).encode()
        begun = time.monotonic()
        with urllib.request.urlopen(urllib.request.Request(url, data, {"Content-Type": "application/json"}),
                                    timeout=120) as response:
            answer = json.loads(response.read())
        assert answer["predictions"][0]["error"] is None, answer
        return time.monotonic() - begun

    try:
        for body in bodies[:2]:  # warm-up
            post(body)
        seconds, lock, counter = [], threading.Lock(), iter(range(args.requests))

        def client() -> None:
            for i in counter:  # the shared iterator deals the requests out; next() on it is atomic in CPython
                took = post(bodies[i % len(bodies)])
                with lock:
                    seconds.append(took)

        clients = [threading.Thread(target=client) for _ in range(args.concurrency)]
        begun = time.monotonic()
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        result = latencies(seconds, time.monotonic() - begun)
    finally:
        serve.shutdown()
    return {**result, "concurrency": args.concurrency, "start_s": round(start_s, 1)}


def main(argv=None) -> None:
    args = parse_args(argv)
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    package, bodies = make_inputs(work_dir, args.videos)
    local = in_process(package, bodies, args.requests, args.views, max(1, int(args.cpus_per_replica)))
    served = endpoint(package, bodies, args)
    emit({
        "benchmark": "serve",
        "model": "uniformerv2_tiny (8 x 32 px, random weights)",
        "views": args.views,
        "videos": len(bodies),
        "max_batch_size": args.max_batch_size,
        "cpus_per_replica": args.cpus_per_replica,
        "in_process": local,
        "endpoint": served,
        "ratio_requests_per_s": round(served["requests_per_s"] / local["requests_per_s"], 3),
        "ratio_p50_latency": round(served["p50_ms"] / local["p50_ms"], 3),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }, args.output)


if __name__ == "__main__":
    main()
