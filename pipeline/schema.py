"""Arrow schemas of the clip dataset and the errors table (the contract in DESIGN.md)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1


def frames_type(frames: int, short_side: int) -> pa.DataType:
    """Arrow-native fixed-shape tensor `[T, S, S, 3]` uint8, readable by plain pyarrow (no Ray extension types)."""
    return pa.fixed_shape_tensor(pa.uint8(), [frames, short_side, short_side, 3])


def clip_schema(frames: int, short_side: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("video_id", pa.string(), nullable=False),
            pa.field("source_uri", pa.string(), nullable=False),
            pa.field("source_etag", pa.string(), nullable=False),
            pa.field("clip_index", pa.int32(), nullable=False),
            pa.field("label", pa.int32()),
            pa.field("label_name", pa.string()),
            pa.field("frames", frames_type(frames, short_side), nullable=False),
            pa.field("frame_indices", pa.list_(pa.int32()), nullable=False),
            pa.field("fps", pa.float32(), nullable=False),
            pa.field("padded", pa.bool_(), nullable=False),
        ]
    )


def frames_array(clips: np.ndarray) -> pa.ExtensionArray:
    """`[N, T, S, S, 3]` uint8 -> fixed-shape tensor array of N clips, without copying the pixels."""
    clips = np.ascontiguousarray(clips, dtype=np.uint8)
    typ = frames_type(clips.shape[1], clips.shape[2])
    storage = pa.FixedSizeListArray.from_arrays(pa.array(clips.reshape(-1)), int(np.prod(clips.shape[1:])))
    return pa.ExtensionArray.from_storage(typ, storage)


def frames_to_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A fixed-shape tensor column -> `[N, T, S, S, 3]` uint8."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.to_numpy_ndarray()


@dataclass(frozen=True)
class ErrorRecord:
    """Why one input produced no clips. `stage` is where it failed: labels, read, decode."""

    source_uri: str
    source_etag: str
    stage: str
    error_type: str
    message: str

    def to_dict(self) -> dict:
        return asdict(self)


ERRORS_SCHEMA = pa.schema(
    [
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("source_etag", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("error_type", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
    ]
)


def errors_table(errors: list[ErrorRecord]) -> pa.Table:
    return pa.Table.from_pylist([error.to_dict() for error in errors], schema=ERRORS_SCHEMA)
