"""Arrow schemas of the clip dataset and the errors table (the contract in DESIGN.md)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

# 2: frames stored as fixed-size binary, several candidate frames per segment (temporal jitter), row groups of at most
# MAX_ROW_GROUP_CLIPS clips, sources in Parquet tables beside the manifest instead of inside it.
SCHEMA_VERSION = 2
# A training unit (pipeline.epochs) is at most this many clips, and a row group is a unit's worth: reading one unit
# reads exactly one row group.
MAX_ROW_GROUP_CLIPS = 16


def frames_type(frames: int, short_side: int, width: int | None = None) -> pa.DataType:
    """What readers get: the Arrow-native fixed-shape tensor `[T, S, W, 3]` uint8 (no Ray extension types); W = S
    unless the dataset keeps the aspect (`width`)."""
    return pa.fixed_shape_tensor(pa.uint8(), [frames, short_side, width or short_side, 3])


def stored_frames_type(frames: int, short_side: int, width: int | None = None) -> pa.DataType:
    """How a clip is stored: its `T*S*W*3` pixels as one fixed-size binary value. Parquet stores a fixed-shape
    tensor as a list of uint8 with a repetition level per pixel (about 19 ms of CPU to read one 8x256x256 clip);
    a fixed-length byte array reads as one copy."""
    return pa.binary(frames * short_side * (width or short_side) * 3)


def clip_schema(frames: int, short_side: int, width: int | None = None) -> pa.Schema:
    """The stored schema; `frames` is the number of frames stored per clip (SamplingParams.stored_frames). With
    `width` (keep="aspect"), frames are `width` wide and a `valid_width` column says how many of the columns, centred,
    hold each clip's video (pipeline.decode.resize_keep_aspect); a square dataset's schema has no such column."""
    stored_width = short_side if width is None else width
    fields = [
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("source_etag", pa.string(), nullable=False),
        pa.field("clip_index", pa.int32(), nullable=False),
        pa.field("label", pa.int32()),
        pa.field("label_name", pa.string()),
        pa.field(
            "frames",
            stored_frames_type(frames, short_side, stored_width),
            nullable=False,
            metadata={"uniformer.shape": json.dumps([frames, short_side, stored_width, 3])},
        ),
        pa.field("frame_indices", pa.list_(pa.int32()), nullable=False),
        pa.field("fps", pa.float32(), nullable=False),
        pa.field("padded", pa.bool_(), nullable=False),
    ]
    if width is not None:
        fields.append(pa.field("valid_width", pa.int32(), nullable=False))
    return pa.schema(fields)


def frames_array(clips: np.ndarray) -> pa.FixedSizeBinaryArray:
    """`[N, T, S, W, 3]` uint8 -> the stored fixed-size binary array of N clips, without copying the pixels."""
    clips = np.ascontiguousarray(clips, dtype=np.uint8)
    typ = stored_frames_type(*clips.shape[1:4])
    return pa.Array.from_buffers(typ, clips.shape[0], [None, pa.py_buffer(clips)])


def _clip_shape(array: pa.Array, shape: tuple[int, ...] | None) -> tuple[int, ...]:
    if shape is None:
        raise ValueError("reading stored frames needs the clip shape (the manifest's SamplingParams.clip_shape)")
    width = array.type.byte_width
    if int(np.prod(shape)) != width:
        raise ValueError(f"stored clips have {width} bytes, the shape {list(shape)} needs {int(np.prod(shape))}")
    return tuple(shape)


def frames_to_numpy(column: pa.Array | pa.ChunkedArray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A frames column -> `[N, *shape]` uint8: a view of the Arrow buffer where the column is one chunk of stored
    binary (no copy), the tensor's own conversion for a fixed-shape tensor column."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column.type, pa.FixedShapeTensorType):
        return column.to_numpy_ndarray()
    shape = _clip_shape(column, shape)
    data = column.buffers()[1]
    flat = np.frombuffer(data, dtype=np.uint8, count=len(column) * column.type.byte_width,
                         offset=column.offset * column.type.byte_width)
    return flat.reshape(len(column), *shape)


def frames_as_tensor(column: pa.Array | pa.ChunkedArray, shape: tuple[int, ...]) -> pa.ExtensionArray:
    """Stored binary frames -> the fixed-shape tensor array readers see, over the same buffer (no copy)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    shape = _clip_shape(column, shape)
    width = column.type.byte_width
    data = column.buffers()[1].slice(column.offset * width, len(column) * width)
    pixels = pa.Array.from_buffers(pa.uint8(), len(column) * width, [None, data])
    storage = pa.FixedSizeListArray.from_arrays(pixels, width)
    return pa.ExtensionArray.from_storage(frames_type(*shape[:3]), storage)


def with_frames_as_tensor(table: pa.Table | pa.RecordBatch, shape: tuple[int, ...]) -> pa.Table | pa.RecordBatch:
    """A table or batch read from shards, with its `frames` column as the fixed-shape tensor type."""
    if "frames" not in table.schema.names:
        return table
    index = table.schema.get_field_index("frames")
    return table.set_column(index, pa.field("frames", frames_type(*shape[:3]), nullable=False),
                            frames_as_tensor(table.column("frames"), shape))


@dataclass(frozen=True)
class ErrorRecord:
    """Why one input produced no clips. `stage` is where it failed: labels, read, decode."""

    source_uri: str
    source_etag: str
    stage: str
    error_type: str
    message: str

    @classmethod
    def of(cls, source_uri: str, source_etag: str, stage: str, error: BaseException) -> ErrorRecord:
        """`error` as recorded: its message on one line and at most 2000 characters (a decoder's can fill pages)."""
        message = " ".join(str(error).split()) or type(error).__name__
        return cls(source_uri, source_etag, stage, type(error).__name__, message[:2000])

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
