"""CPU time and bytes per stored clip for the clip dataset's frames encodings, measured in one run.

Compares the schema-1 encoding (Arrow fixed-shape tensor stored by Parquet as a list of uint8, byte-stream-split +
zstd) with schema 2's fixed-size binary (uncompressed, and zstd level 1 for comparison), reading whole row groups of
MAX_ROW_GROUP_CLIPS clips into `[N, T, S, S, 3]` uint8 arrays, as training does. Frames are rendered by the
synthetic motion generator (smooth textures: compress better than camera footage) and as uniform noise (the worst
case for compression).

    .venv/bin/python benchmarks/read.py [--clips 64] [--frames 8] [--short-side 256] [--output FILE]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.schema import MAX_ROW_GROUP_CLIPS, frames_array, frames_to_numpy, frames_type
from pipeline.synthetic import render_motion_frames

from bench_output import emit


def list_encoded(clips: np.ndarray) -> tuple[pa.Table, dict]:
    """Schema 1's frames column and write options."""
    storage = pa.FixedSizeListArray.from_arrays(pa.array(clips.reshape(-1)), int(np.prod(clips.shape[1:])))
    column = pa.ExtensionArray.from_storage(frames_type(clips.shape[1], clips.shape[2]), storage)
    options = {"compression": "zstd", "compression_level": 1, "use_dictionary": False,
               "column_encoding": {"frames.list.element": "BYTE_STREAM_SPLIT"}, "write_statistics": False}
    return pa.table({"frames": column}), options


def binary_encoded(clips: np.ndarray, compression: str | None) -> tuple[pa.Table, dict]:
    options = {"compression": compression or "none", "use_dictionary": False, "write_statistics": False}
    if compression == "zstd":
        options["compression_level"] = 1
    return pa.table({"frames": frames_array(clips)}), options


def measure(table: pa.Table, options: dict, shape: tuple[int, ...], path: Path, repeats: int) -> dict:
    pq.write_table(table, path, row_group_size=MAX_ROW_GROUP_CLIPS, **options)
    parquet = pq.ParquetFile(path)
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        for group in range(parquet.num_row_groups):
            clips = frames_to_numpy(parquet.read_row_group(group, columns=["frames"]).column("frames"), shape)
            assert clips.shape[1:] == shape
        best = min(best, time.process_time() - started)
    return {"cpu_ms_per_clip": round(1000 * best / table.num_rows, 3),
            "bytes_per_clip": round(os.path.getsize(path) / table.num_rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--short-side", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    side = args.short_side
    shape = (args.frames, side, side, 3)
    contents = {
        "synthetic_motion": np.stack([render_motion_frames("left", side, side, args.frames, rng)
                                      for _ in range(args.clips)]),
        "noise": rng.integers(0, 256, (args.clips, *shape), dtype=np.uint8),
    }
    result = {"clip_shape": list(shape), "raw_bytes_per_clip": int(np.prod(shape)),
              "row_group_clips": MAX_ROW_GROUP_CLIPS, "threads": pa.cpu_count()}
    with tempfile.TemporaryDirectory() as scratch:
        for name, clips in contents.items():
            encodings = {
                "schema1_list_bss_zstd": list_encoded(clips),
                "schema2_binary": binary_encoded(clips, None),
                "schema2_binary_zstd1": binary_encoded(clips, "zstd"),
            }
            figures = {key: measure(table, options, shape, Path(scratch) / f"{name}-{key}.parquet", args.repeats)
                       for key, (table, options) in encodings.items()}
            old, new = figures["schema1_list_bss_zstd"], figures["schema2_binary"]
            figures["read_cpu_speedup_schema2_vs_schema1"] = round(old["cpu_ms_per_clip"] / new["cpu_ms_per_clip"], 1)
            result[name] = figures
    emit(result, args.output)


if __name__ == "__main__":
    main()
