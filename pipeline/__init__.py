"""Data: storage URIs, video listing, decord decoding and frame sampling, clip shards, manifests and readers.

One-way chain: storage -> listing -> decode/sample -> clip transform -> shards/manifest; scoring decodes multi-view
test clips instead (pipeline.views). Each step is a function on one video usable without Ray; Ray Data wraps them at
the edge (pipeline.ingest, pipeline.reader). Nothing here imports from `jobs`.

`from pipeline import NAME` imports NAME's module when NAME is first asked for: importing one module of the package
(`pipeline.redaction`, `pipeline.decode`) does not load pyarrow and every other module, so that the CLI's --help
answers at once.
"""

import importlib

# the package's API: name -> the module that defines it
_EXPORTS = {
    "pipeline.dataset.parts": ["ShardEntry"],
    "pipeline.dataset.versions": ["ManifestError", "parse_dataset_ref"],
    "pipeline.decode": ["KEEPS", "SAMPLINGS", "ClipInfo", "VideoDecodeError", "decode_clips", "read_sampled_frames",
                        "resize_center_crop", "resize_keep_aspect", "sample_frame_indices", "stored_width"],
    "pipeline.listing": ["VIDEO_EXTENSIONS", "LabelsError", "ListingError", "SourceVideo", "VideoListing",
                         "attach_labels", "extend_class_map", "list_videos", "parse_labels_csv", "read_labels_csv"],
    "pipeline.manifest": ["Manifest", "SamplingParams", "load_manifest"],
    "pipeline.reader": ["iter_clip_batches", "iter_clips", "read_clips", "verify_shards"],
    "pipeline.schema": ["ERRORS_SCHEMA", "SCHEMA_VERSION", "ErrorRecord", "clip_schema", "errors_table",
                        "frames_to_numpy"],
    "pipeline.storage": ["Location", "ObjectInfo", "Storage", "StorageError", "parse_uri"],
    "pipeline.synthetic": ["MOTION_CLASSES", "generate_motion_dataset", "write_motion_video"],
    "pipeline.views": ["decode_views", "parse_views"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value  # the next access does not come back here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
