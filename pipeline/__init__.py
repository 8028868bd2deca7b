"""Data: storage URIs, video listing, decord decoding and frame sampling, clip shards, manifests and readers.

One-way chain: storage -> listing -> decode/sample -> clip transform -> shards/manifest; scoring decodes multi-view
test clips instead (pipeline.views). Each step is a function on one video usable without Ray; Ray Data wraps them at
the edge (pipeline.ingest, pipeline.reader). Nothing here imports from `jobs`.
"""

from pipeline.dataset.parts import ShardEntry
from pipeline.dataset.versions import ManifestError, parse_dataset_ref
from pipeline.decode import (
    SAMPLINGS,
    ClipInfo,
    VideoDecodeError,
    decode_clips,
    read_sampled_frames,
    resize_center_crop,
    sample_frame_indices,
)
from pipeline.listing import (
    VIDEO_EXTENSIONS,
    LabelsError,
    ListingError,
    SourceVideo,
    VideoListing,
    attach_labels,
    extend_class_map,
    list_videos,
    parse_labels_csv,
    read_labels_csv,
)
from pipeline.manifest import Manifest, SamplingParams, load_manifest
from pipeline.reader import iter_clip_batches, iter_clips, read_clips, verify_shards
from pipeline.schema import (
    ERRORS_SCHEMA,
    SCHEMA_VERSION,
    ErrorRecord,
    clip_schema,
    errors_table,
    frames_to_numpy,
)
from pipeline.storage import Location, ObjectInfo, Storage, StorageError, parse_uri
from pipeline.synthetic import MOTION_CLASSES, generate_motion_dataset, write_motion_video
from pipeline.views import decode_views, parse_views

__all__ = [
    "SAMPLINGS",
    "ClipInfo",
    "VideoDecodeError",
    "decode_clips",
    "read_sampled_frames",
    "resize_center_crop",
    "sample_frame_indices",
    "VIDEO_EXTENSIONS",
    "LabelsError",
    "ListingError",
    "SourceVideo",
    "VideoListing",
    "attach_labels",
    "extend_class_map",
    "list_videos",
    "parse_labels_csv",
    "read_labels_csv",
    "Manifest",
    "ManifestError",
    "SamplingParams",
    "ShardEntry",
    "load_manifest",
    "parse_dataset_ref",
    "iter_clip_batches",
    "iter_clips",
    "read_clips",
    "verify_shards",
    "ERRORS_SCHEMA",
    "SCHEMA_VERSION",
    "ErrorRecord",
    "clip_schema",
    "errors_table",
    "frames_to_numpy",
    "Location",
    "ObjectInfo",
    "Storage",
    "StorageError",
    "parse_uri",
    "MOTION_CLASSES",
    "generate_motion_dataset",
    "write_motion_video",
    "decode_views",
    "parse_views",
]
