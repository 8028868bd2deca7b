#!/usr/bin/env python
"""What `uniformer export --format onnx` buys on CPU: clips/s of the exported ONNX file in onnxruntime (CPU) vs the
same network in PyTorch eager and under `torch.compile`, on the same uint8 clips; prints one JSON object.

    python benchmarks/export.py                      # tiny (32 px) and B/16 (224 x 8 frames, 400 classes), batch 1, 4
    python benchmarks/export.py --models tiny --batches 1,8 --rounds 5 --output /tmp/export.json

Each model is randomly initialised and wrapped as the command exports it (`model.deploy.ClipClassifier`: uint8 clips
in, logits and probabilities out, the normalisation inside), exported through the command's own writer
(`jobs.export._write_onnx`, dynamo exporter, dynamic batch) and checked against eager like the command checks it.
Every runner is warmed up at every batch size first (torch.compile compiles there, one graph per batch size), then
timed in --rounds interleaved rounds, the runner order rotating each round, so that all see the same machine load;
the JSON gives each runner's clips/s (median, min, max, rounds) and each round's ratio onnxruntime / eager and
onnxruntime / compile (median over the rounds). All use --threads threads (default: every core).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import model  # noqa: E402
from benchmarks.bench_output import emit, spread  # noqa: E402
from jobs.export import _write_onnx, max_difference  # noqa: E402
from model.deploy import ClipClassifier  # noqa: E402

# name -> (config, classes, frames, crop, timed forwards per round and batch)
MODELS = {
    "tiny": ("uniformerv2_tiny", 4, 8, 32, 20),
    "b16": ("uniformerv2_b16", 400, 8, 224, 1),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,b16", help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--batches", default="1,4", help="comma-separated batch sizes")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds (>= 3 for a median)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for torch and onnxruntime")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    args.models = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = set(args.models) - set(MODELS)
    if unknown:
        p.error(f"unknown model(s) {', '.join(sorted(unknown))}; known: {', '.join(MODELS)}")
    args.batches = [int(b) for b in args.batches.split(",")]
    return args


def runners(name: str, args: argparse.Namespace, scratch: str) -> tuple[dict, dict]:
    import onnxruntime

    config, classes, frames, crop, _ = MODELS[name]
    torch.manual_seed(args.seed)
    wrapper = ClipClassifier(model.create_model(config, classes, t_size=frames)).eval()
    path = os.path.join(scratch, f"{name}.onnx")
    example = torch.randint(0, 256, (2, frames, crop, crop, 3), dtype=torch.uint8)
    started = time.perf_counter()
    _write_onnx(wrapper, example, {}, path)
    export_seconds = time.perf_counter() - started
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    compiled = torch.compile(wrapper, dynamic=False)

    def eager(clips: torch.Tensor):
        with torch.inference_mode():
            return [t.numpy() for t in wrapper(clips)]

    def compile_(clips: torch.Tensor):
        with torch.inference_mode():
            return [t.numpy() for t in compiled(clips)]

    def ort(clips: torch.Tensor):
        return session.run(["logits", "probs"], {"clips": clips.numpy()})

    info = {"config": config, "classes": classes, "clip": [frames, crop, crop, 3], "export_s": round(export_seconds, 2),
            "onnx_mb": round(os.path.getsize(path) / 1e6, 1)}
    return {"onnxruntime": ort, "eager": eager, "compile": compile_}, info


def measure(name: str, args: argparse.Namespace) -> dict:
    _, _, frames, crop, iters = MODELS[name]
    with tempfile.TemporaryDirectory() as scratch:
        run, info = runners(name, args, scratch)
        generator = torch.Generator().manual_seed(args.seed + 1)
        inputs = {b: torch.randint(0, 256, (b, frames, crop, crop, 3), dtype=torch.uint8, generator=generator)
                  for b in args.batches}
        warm = {}
        for batch, clips in inputs.items():  # warm-up: compiles, and checks the three agree
            outputs = {}
            for runner, forward in run.items():
                started = time.perf_counter()
                outputs[runner] = forward(clips)
                warm[f"{runner}_batch_{batch}_s"] = round(time.perf_counter() - started, 2)
            info[f"max_difference_batch_{batch}"] = {
                other: float(f"{max_difference(outputs['eager'], outputs[other]):.3g}")
                for other in ("onnxruntime", "compile")}
        info["first_call_s"] = warm
        rates = {batch: {runner: [] for runner in run} for batch in inputs}
        order = list(run)
        for round_index in range(args.rounds):
            rotated = order[round_index % len(order):] + order[: round_index % len(order)]
            for batch, clips in inputs.items():
                for runner in rotated:
                    started = time.perf_counter()
                    for _ in range(iters):
                        run[runner](clips)
                    rates[batch][runner].append(batch * iters / (time.perf_counter() - started))
        for batch, by_runner in rates.items():
            ort = by_runner["onnxruntime"]
            info[f"batch_{batch}"] = {
                **{f"{runner}_clips_per_s": spread(values) for runner, values in by_runner.items()},
                "onnxruntime_vs_eager": round(statistics.median(o / e for o, e in zip(ort, by_runner["eager"])), 3),
                "onnxruntime_vs_compile": round(
                    statistics.median(o / c for o, c in zip(ort, by_runner["compile"])), 3),
            }
    return info


def main(argv=None) -> None:
    import onnxruntime

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                    "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__},
        "rounds": args.rounds,
        "models": {name: measure(name, args) for name in args.models},
    }
    emit(result, args.output)


if __name__ == "__main__":
    main()
