"""Reading a clip dataset version: as a Ray Dataset (training, scoring) or a plain pyarrow iterator (no Ray).

Both check first that every shard the manifest lists exists with the recorded row count and sha256, so a reader
never silently trains on part of a version or on shards changed since it was published.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.dataset.parts import stream_sha256
from pipeline.dataset.versions import ManifestError, parse_dataset_ref
from pipeline.manifest import Manifest, load_manifest
from pipeline.schema import frames_to_numpy, frames_type, with_frames_as_tensor
from pipeline.storage import Storage, parse_uri

# (endpoint, path, sha256) of the shards this process has hashed and found as their manifest records them
_verified: set[tuple[str | None, str, str]] = set()


def shard_paths(dst: str, manifest: Manifest, storage: Storage) -> list[str]:
    """Arrow paths of the manifest's shards, unchecked (`verify_shards` checks them)."""
    root = parse_uri(dst)
    return [storage.arrow_path(root.join(shard.path)) for shard in manifest.shards]


def verify_shards(dst: str, manifest: Manifest, storage: Storage) -> list[str]:
    """Arrow paths of the manifest's shards, each checked to exist with the recorded row count and sha256; raises
    ManifestError naming every shard that does not match, before anything is read from them.

    A shard's sha256 is computed on its first check in a process and remembered (hashing a shard costs 0.4-2x the CPU
    of reading it whole, 2-14 row-group reads: benchmarks/verify.py), so a training run hashes its dataset once, on
    its driver, while it cuts the epoch plan, and its workers trust that cut."""
    root = parse_uri(dst)
    filesystem = storage.arrow_filesystem(root)
    paths = shard_paths(dst, manifest, storage)

    def check(item) -> str | None:
        shard, path = item
        try:
            rows = pq.read_metadata(path, filesystem=filesystem).num_rows
            if rows != shard.rows:
                return f"{shard.path}: {rows} rows, manifest says {shard.rows}"
            identity = (storage.endpoint_url, path, shard.sha256)
            if identity not in _verified:
                _, digest = stream_sha256(filesystem, path)
                if digest != shard.sha256:
                    return f"{shard.path}: sha256 {digest}, manifest says {shard.sha256} (altered or damaged)"
                _verified.add(identity)
        except FileNotFoundError:
            return f"{shard.path}: missing"
        except pa.ArrowInvalid as error:  # not Parquet; a store that cannot be read (OSError) stops the job instead
            return f"{shard.path}: unreadable ({' '.join(str(error).split())[:200]})"
        return None

    with ThreadPoolExecutor(max_workers=16) as pool:
        problems = [problem for problem in pool.map(check, zip(manifest.shards, paths)) if problem]
    if problems:
        listing = "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
        raise ManifestError(
            f"dataset {dst} version {manifest.version} is incomplete or altered: {len(problems)} of {len(paths)} "
            f"shards do not match the manifest:\n  {listing}\nNothing was read from it. Re-ingesting into the same "
            "destination does not repair a version (its videos count as done): restore these shards from a copy "
            "(the manifest records each one's sha256 and size), or ingest the videos again into a new destination "
            "(`uniformer ingest SRC --out NEW_DST ...`) and read that."
        )
    return paths


def _open(dst: str, version: int | None, endpoint_url: str | None, verify: bool):
    dst, ref_version = parse_dataset_ref(dst)
    version = version if version is not None else ref_version
    manifest = load_manifest(dst, version, endpoint_url=endpoint_url)
    storage = Storage(endpoint_url)
    paths = verify_shards(dst, manifest, storage) if verify else shard_paths(dst, manifest, storage)
    return dst, manifest, storage, paths


def read_clips(
    dst: str,
    version: int | None = None,
    columns: list[str] | None = None,
    endpoint_url: str | None = None,
    verify: bool = True,
    **read_parquet_args,
):
    """A `ray.data.Dataset` of one dataset version (`dst` may be `DST@version`), one row per clip.

    `frames` is a fixed-shape tensor column: it comes out of `iter_batches`/`iter_torch_batches` as uint8
    `[B, T * M, S, W, 3]` (M = `frames_per_segment`, `SamplingParams.pick_frames` selects T of them; W = S unless
    the dataset keeps the aspect, whose `valid_width` column says which columns hold the video).
    """
    import ray.data

    dst, manifest, storage, paths = _open(dst, version, endpoint_url, verify)
    shape = manifest.sampling.clip_shape
    if not paths:
        empty = read_schema(manifest).empty_table()
        return ray.data.from_arrow(empty.select(columns) if columns else empty)
    filesystem = storage.arrow_filesystem(parse_uri(dst))
    dataset = ray.data.read_parquet(paths, filesystem=filesystem, **read_parquet_args)
    if columns:
        dataset = dataset.select_columns(columns)
    if columns and "frames" not in columns:
        return dataset
    return dataset.map_batches(
        with_frames_as_tensor, fn_args=(shape,), batch_format="pyarrow", batch_size=None, zero_copy_batch=True
    )


def read_schema(manifest: Manifest) -> pa.Schema:
    """The schema readers see: the stored one with `frames` as its fixed-shape tensor type."""
    stored = manifest.sampling.schema()
    return stored.set(stored.get_field_index("frames"),
                      pa.field("frames", frames_type(*manifest.sampling.clip_shape[:3]), False))


def iter_clip_batches(
    dst: str,
    version: int | None = None,
    columns: list[str] | None = None,
    batch_size: int = 32,
    endpoint_url: str | None = None,
    verify: bool = True,
) -> Iterator[pa.RecordBatch]:
    """Record batches of one dataset version with plain pyarrow, shard by shard, in manifest order; `frames` as the
    fixed-shape tensor `[T * M, S, W, 3]`."""
    dst, manifest, storage, paths = _open(dst, version, endpoint_url, verify)
    filesystem = storage.arrow_filesystem(parse_uri(dst))
    for path in paths:
        with filesystem.open_input_file(path) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=batch_size, columns=columns):
                yield with_frames_as_tensor(batch, manifest.sampling.clip_shape)


def iter_clips(
    dst: str,
    version: int | None = None,
    columns: list[str] | None = None,
    endpoint_url: str | None = None,
    verify: bool = True,
) -> Iterator[dict]:
    """Rows of one dataset version as dicts; `frames` as a uint8 numpy array `[T, S, W, 3]`."""
    for batch in iter_clip_batches(dst, version, columns, endpoint_url=endpoint_url, verify=verify):
        names = batch.schema.names
        frames = frames_to_numpy(batch.column("frames")) if "frames" in names else None
        plain = {name: batch.column(name).to_pylist() for name in names if name != "frames"}
        for index in range(batch.num_rows):
            row = {name: values[index] for name, values in plain.items()}
            if frames is not None:
                row["frames"] = np.asarray(frames[index])
            yield row
