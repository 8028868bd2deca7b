"""A video's timeline from a windowed predictions dataset (`uniformer score --windows`): consecutive windows with the
same top-1 class merged into segments, and each window's embedding (`--embeddings`) for similarity search."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.predictions import ScoreConfigError, ScoreManifest, predictions_manifest
from pipeline.storage import Location, Storage


@dataclass(frozen=True)
class Segment:
    start: float  # seconds: the first window's start
    end: float  # the last window's end
    label: int
    name: str | None
    mean_prob: float  # the label's probability, averaged over the segment's windows (0 where not in a window's top-k)
    windows: int

    def to_dict(self) -> dict:
        return asdict(self)


def _manifest(dst: str, storage: Storage) -> tuple[ScoreManifest, Location]:
    manifest, root = predictions_manifest(dst, storage)
    if manifest.unit != "window":
        raise ScoreConfigError(f"{root.uri} holds whole-video predictions; a timeline needs a run with --windows")
    return manifest, root


def read_windows(dst: str, video_id: str, columns: list[str] | None = None, storage: Storage | None = None
                 ) -> pa.Table:
    """The window rows of one video of a windowed predictions dataset (`DST` or `DST@VERSION`), by window index."""
    storage = storage or Storage()
    manifest, root = _manifest(dst, storage)
    tables = []
    for shard in manifest.shards:
        location = root.join(shard.path)
        table = pq.read_table(storage.arrow_path(location), filesystem=storage.arrow_filesystem(location),
                              columns=columns, filters=[("video_id", "=", video_id)])
        if table.num_rows:
            tables.append(table)
    if not tables:
        raise KeyError(f"no windows of video {video_id!r} in {root.uri}")
    return pa.concat_tables(tables).sort_by("window_index").replace_schema_metadata(None)


def window_probabilities(rows: pa.Table, num_classes: int) -> np.ndarray:
    """`[W, C]` probabilities from the stored top-k (classes outside a window's top-k count 0)."""
    ids = np.asarray(rows.column("top_k_ids").to_pylist(), np.int64)
    probs = np.asarray(rows.column("top_k_probs").to_pylist(), np.float64)
    dense = np.zeros((rows.num_rows, num_classes))
    np.put_along_axis(dense, ids, probs, axis=1)
    return dense


def median_filter(values: np.ndarray, size: int) -> np.ndarray:
    """Median over `size` consecutive rows centred on each (shorter at the ends), column by column."""
    if size <= 1:
        return values
    half = size // 2
    return np.stack([np.median(values[max(0, i - half) : i + half + 1], axis=0) for i in range(len(values))])


def timeline(dst: str, video_id: str, smooth: int = 1, storage: Storage | None = None) -> list[Segment]:
    """The segments of one video: consecutive windows with the same top-1 class merged. With `smooth` N > 1, each
    class's probability is first median-filtered over N windows and the top-1 taken from the filtered ones."""
    if smooth < 1:
        raise ValueError(f"smooth must be >= 1, got {smooth}")
    storage = storage or Storage()
    manifest, _ = _manifest(dst, storage)
    names = manifest.class_names
    rows = read_windows(dst, video_id, ["window_index", "window_start", "window_end", "top_k_ids", "top_k_probs"],
                        storage)
    num_classes = max(len(names), int(pc.max(pc.list_flatten(rows.column("top_k_ids"))).as_py()) + 1)
    probs = window_probabilities(rows, num_classes)
    top1 = median_filter(probs, smooth).argmax(axis=1)
    starts, ends = rows.column("window_start").to_numpy(), rows.column("window_end").to_numpy()
    segments, first = [], 0
    for at in range(1, len(top1) + 1):
        if at == len(top1) or top1[at] != top1[first]:
            label = int(top1[first])
            segments.append(Segment(
                start=float(starts[first]), end=float(ends[at - 1]), label=label,
                name=names[label] if label < len(names) else None,
                mean_prob=float(probs[first:at, label].mean()), windows=at - first,
            ))
            first = at
    return segments


def format_timeline(video_id: str, segments: list[Segment], smooth: int = 1) -> str:
    how = f"top-1 median-filtered over {smooth} windows" if smooth > 1 else "top-1 per window, unsmoothed"
    lines = [f"timeline of {video_id}  ({how})"]
    for segment in segments:
        label = segment.name if segment.name is not None else str(segment.label)
        lines.append(f"  {segment.start:9.2f} - {segment.end:9.2f} s  {label:<20} p={segment.mean_prob:.3f}  "
                     f"({segment.windows} windows)")
    return "\n".join(lines)


def window_embeddings(dst: str, video_id: str, storage: Storage | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`(window indices [W] int32, embeddings [W, D] float16)` of one video of a run with `--embeddings`."""
    storage = storage or Storage()
    manifest, root = _manifest(dst, storage)
    if not manifest.params.get("embeddings"):
        raise ScoreConfigError(f"{root.uri} holds no embeddings: score with --windows ... --embeddings")
    rows = read_windows(dst, video_id, ["window_index", "embedding"], storage)
    column = rows.column("embedding").combine_chunks()
    dim = column.type.list_size
    matrix = column.flatten().to_numpy(zero_copy_only=False).astype(np.float16).reshape(-1, dim)
    return rows.column("window_index").to_numpy().astype(np.int32), matrix


@dataclass(frozen=True)
class Neighbour:
    window_index: int
    start: float
    end: float
    similarity: float  # cosine

    def to_dict(self) -> dict:
        return asdict(self)


def neighbours(dst: str, video_id: str, window: int, k: int = 5, storage: Storage | None = None) -> list[Neighbour]:
    """The `k` windows of the same video whose embeddings are nearest (cosine) to window `window`'s, nearest first."""
    storage = storage or Storage()
    indices, matrix = window_embeddings(dst, video_id, storage)
    if window not in set(indices.tolist()):
        raise KeyError(f"video {video_id!r} has no window {window} (windows 0..{int(indices.max())})")
    vectors = matrix.astype(np.float32)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    query = vectors[int(np.flatnonzero(indices == window)[0])]
    similarity = vectors @ query
    order = [at for at in np.argsort(-similarity, kind="stable") if indices[at] != window][:k]
    bounds = read_windows(dst, video_id, ["window_index", "window_start", "window_end"], storage)
    starts, ends = bounds.column("window_start").to_numpy(), bounds.column("window_end").to_numpy()
    return [Neighbour(int(indices[at]), float(starts[at]), float(ends[at]), float(similarity[at])) for at in order]
