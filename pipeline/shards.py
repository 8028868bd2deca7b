"""Writing one Parquet shard of clips atomically, with a self-description in its footer.

The footer's key-value metadata (`uniformer.ingest`) records the sources the shard was made from, their clip counts
and the errors met while making it. A shard left behind by a killed run is therefore a complete, verifiable unit that
a re-run can adopt instead of decoding its videos again.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.dataset.parts import file_sha256
from pipeline.schema import MAX_ROW_GROUP_CLIPS, clip_schema, frames_array
from pipeline.storage import Location, Storage

FOOTER_KEY = b"uniformer.ingest"


def parquet_write_options(schema: pa.Schema) -> dict:
    """How clip tables are written by `pq.write_table` (ShardWriter passes the same to its ParquetWriter, which takes
    the row group size per write instead). zstd level 1 over the fixed-size binary frames reads at about 1 ms of CPU per
    8x256x256 clip (0.5 ms uncompressed; schema 1's list encoding took 10) and stores smooth content at a third of its
    raw size (benchmarks/read.py). Min/max statistics of pixel bytes would serve no reader, so only small columns
    get them, and dictionaries."""
    small_columns = [name for name in schema.names if name != "frames"]
    return {
        "compression": "zstd",
        "compression_level": 1,
        "use_dictionary": small_columns,
        "write_statistics": small_columns,
        "row_group_size": MAX_ROW_GROUP_CLIPS,
    }


class ShardWriter:
    """Appends clips of one video at a time to a staged Parquet file; `commit` publishes it under its final name."""

    def __init__(self, storage: Storage, final: Location, frames: int, short_side: int, width: int | None = None):
        """`width`: the stored frame width of a keep="aspect" dataset (pipeline.schema.clip_schema); None: square."""
        self.storage = storage
        self.final = final
        self.schema = clip_schema(frames, short_side, width)
        self.staging = storage.staging_path(final)
        options = parquet_write_options(self.schema)
        del options["row_group_size"]
        self._writer = pq.ParquetWriter(self.staging, self.schema, **options)
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self.rows = 0

    def add_video(
        self,
        clips: np.ndarray,
        frame_indices: np.ndarray,
        video_id: str,
        source_uri: str,
        source_etag: str,
        label: int | None,
        label_name: str | None,
        fps: float,
        padded: bool,
        valid_width: int | None = None,
    ) -> None:
        """`valid_width`: how much of a keep="aspect" clip's width holds the video (pipeline.decode.ClipInfo)."""
        count = clips.shape[0]
        aspect = [pa.array([valid_width] * count, pa.int32())] if "valid_width" in self.schema.names else []
        batch = pa.RecordBatch.from_arrays(
            [
                pa.array([video_id] * count, pa.string()),
                pa.array([source_uri] * count, pa.string()),
                pa.array([source_etag] * count, pa.string()),
                pa.array(np.arange(count, dtype=np.int32)),
                pa.array([label] * count, pa.int32()),
                pa.array([label_name] * count, pa.string()),
                frames_array(clips),
                pa.array([row.tolist() for row in frame_indices], pa.list_(pa.int32())),
                pa.array([fps] * count, pa.float32()),
                pa.array([padded] * count, pa.bool_()),
                *aspect,
            ],
            schema=self.schema,
        )
        self._pending.append(batch)
        self._pending_rows += count
        self.rows += count
        if self._pending_rows >= MAX_ROW_GROUP_CLIPS:
            self._flush(whole_groups_only=True)

    def _flush(self, whole_groups_only: bool = False) -> None:
        """Writes the pending clips as row groups of MAX_ROW_GROUP_CLIPS; with `whole_groups_only`, a remainder
        waits for the next video, so that only a shard's last row group is short."""
        if not self._pending:
            return
        table = pa.Table.from_batches(self._pending, schema=self.schema)
        cut = table.num_rows - table.num_rows % MAX_ROW_GROUP_CLIPS if whole_groups_only else table.num_rows
        self._writer.write_table(table.slice(0, cut), row_group_size=MAX_ROW_GROUP_CLIPS)
        rest = table.slice(cut)
        self._pending, self._pending_rows = (rest.to_batches(), rest.num_rows) if rest.num_rows else ([], 0)

    def commit(self, description: dict) -> tuple[int, str]:
        """Close, publish atomically, and return (bytes, sha256) of the published file."""
        self._flush()
        self._writer.add_key_value_metadata({FOOTER_KEY: json.dumps(description, ensure_ascii=False)})
        self._writer.close()
        size, digest = os.path.getsize(self.staging), file_sha256(self.staging)
        self.storage.commit_staged(self.staging, self.final)
        return size, digest

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            if os.path.exists(self.staging):
                os.unlink(self.staging)
