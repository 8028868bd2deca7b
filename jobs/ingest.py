"""`uniformer ingest`: videos in object storage -> sharded Parquet clip dataset + versioned manifest.

Wires the pipeline steps: fail-fast storage checks, labels, listing, the incremental plan, the Ray Data run,
the manifest commit and the end summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from jobs.console import Pace, init_ray, rate
from jobs.options import IngestConfig
from jobs.report import error_lines, first_of_lines, table_lines
from pipeline.dataset.commit import nothing_new_line
from pipeline.dataset.failures import read_failures
from pipeline.dataset.parts import present_parts
from pipeline.dataset.runs import RunRecord
from pipeline.dataset.sources import read_sources
from pipeline.ingest import (
    DEFAULT_MAX_SHARD_BYTES,
    IngestCounts,
    build_dataset,
    commit_ingest,
    plan_ingest,
)
from pipeline.listing import (
    attach_labels,
    labels_by_segment,
    list_videos,
    read_class_names,
    read_labels_csv,
    segment_inputs,
)
from pipeline.manifest import SHARDS_DIR, SamplingParams, latest_manifest, write_manifest
from pipeline.schema import ErrorRecord
from pipeline.storage import DEFAULT_SPILL_THRESHOLD_BYTES, Storage, parse_uri


@dataclass
class IngestPreview:
    """What a run would do (`dry_run`): read from the listing and the dataset, nothing written."""

    source: str
    destination: str
    listed: int
    already_done: int
    known_failures: int  # failed before, unchanged: not decoded again
    label_errors: int
    to_decode: int
    shards: int
    replaced_or_removed: int  # videos whose clips would leave the dataset: changed (then decoded again), or gone
    first_to_decode: list[str]
    dry_run: bool = True


PREVIEW_NAMES = 5  # videos a preview names


def format_preview(preview: IngestPreview) -> str:
    lines = [f"ingest dry run  {preview.source} -> {preview.destination}  (nothing written)"]
    lines += table_lines([
        ("listed", preview.listed),
        ("already done", preview.already_done),
        ("known failures", preview.known_failures),
        ("label errors", preview.label_errors),
        ("would decode", preview.to_decode),
        ("in shards", preview.shards),
        ("clips replaced or removed", preview.replaced_or_removed),
    ])
    lines += first_of_lines(preview.first_to_decode, preview.to_decode)
    return "\n".join(lines)


@dataclass
class IngestSummary(IngestCounts):
    source: str
    destination: str
    manifest_version: int | None  # the version that describes the dataset after this run
    manifest_written: bool  # False when nothing changed and the previous version still holds
    nodes_used: int  # Ray nodes that decoded groups in this run
    seconds: float
    errors_uri: str | None = None
    errors: list[ErrorRecord] = field(default_factory=list)


def run_ingest(
    config: IngestConfig,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    spill_threshold_bytes: int = DEFAULT_SPILL_THRESHOLD_BYTES,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
) -> IngestSummary | IngestPreview:
    """Ingest every video under `config.src` not yet in the dataset at `config.out`; see the module docstring of
    pipeline.ingest. A video above `config.limits` (pipeline.decode.DecodeLimits) becomes an error row, as does one
    whose decoding crashes or runs past its time limit. Videos that failed before are decoded again only when they
    changed, or with `retry_errors`; videos gone from `src` leave the new version unless `keep_deleted`. A run with
    nothing new writes no version. With `dry_run`, returns what the run would do and writes nothing. A sampling option
    left None is the one the dataset records (SamplingParams' default for a new dataset); one that contradicts it is
    refused."""
    started = time.monotonic()
    src, out, labels_csv, labels_from_dirs = config.src, config.out, config.labels, config.labels_from_dirs
    storage = Storage(config.endpoint_url, spill_threshold_bytes=spill_threshold_bytes)
    source, root = parse_uri(src), parse_uri(out)
    storage.check_access(source)
    storage.check_access(root, must_exist=False)
    if not dry_run:
        storage.check_conditional_writes(root)  # manifests are published if-absent

    labels = read_labels_csv(labels_csv, storage) if labels_csv else None  # refuses unsafe paths before any work
    class_names = read_class_names(config.classes, storage) if config.classes else None
    listed = list_videos(source, storage)
    labelled, label_errors = attach_labels(listed, source, labels_csv=labels, labels_from_dirs=labels_from_dirs)
    labels_mode = "dirs" if labels_from_dirs else "none"
    if labels_csv:
        labels_mode = "segments" if labels_by_segment(labels) else "csv"
    if labels_mode == "segments":
        listed = segment_inputs(listed, labelled)
    # the run record comes before any part is looked at: `uniformer gc` leaves them
    with contextlib.nullcontext() if dry_run else RunRecord(storage, root, "ingest") as run:
        previous = latest_manifest(root, storage)
        params = dataclasses.replace(previous.sampling if previous else SamplingParams(), **config.clip.given())
        previous_sources = read_sources(root, previous, storage) if previous else None
        previous_failures = read_failures(root, previous.errors, storage) if previous else {}
        plan = plan_ingest(out, src, listed, labelled, label_errors, labels_mode, params, previous, previous_sources,
                           max_shard_bytes, class_names, previous_failures, config.retry_errors, config.keep_deleted)
        if dry_run:
            return _preview(plan, echo)
        run.claim(plan.groups.names)
        storage.remove_stale_staging(root.join(SHARDS_DIR))
        published = present_parts(storage, root, SHARDS_DIR) if plan.groups else set()  # after the claim: gc leaves them
        inputs = "segments and videos without one" if labels_mode == "segments" else "videos"
        echo(
            f"ingest {source.uri} -> {root.uri}: {len(listed)} {inputs} listed, {len(plan.already_done)} already done, "
            f"{len(plan.known_failures)} known failures, {plan.num_pending} to decode in {len(plan.groups)} shards"
        )

        results = []
        if plan.groups:
            init_ray()  # joins RAY_ADDRESS when set, else starts a local Ray
            decoding_started, last_report, pace = time.monotonic(), 0.0, Pace()
            for row in build_dataset(plan, storage, config.limits, published).iter_rows():
                results.append(_decoded(row))
                if time.monotonic() - last_report >= 2.0 or len(results) == len(plan.groups):
                    echo(_progress_line(results, len(plan.groups), decoding_started, pace))
                    last_report = time.monotonic()

        outcome = commit_ingest(plan, results, storage)
        if outcome.manifest is not None:
            write_manifest(root, outcome.manifest, storage)
        else:
            echo(nothing_new_line(asdict(outcome.counts), "ingested"))
    version = outcome.manifest.version if outcome.manifest else (previous.version if previous else None)
    errors_path = outcome.manifest.errors if outcome.manifest else None
    summary = IngestSummary(
        source=source.uri,
        destination=root.uri,
        manifest_version=version,
        manifest_written=outcome.manifest is not None,
        **asdict(outcome.counts),
        nodes_used=len({result["node_id"] for result in results}),
        seconds=time.monotonic() - started,
        errors_uri=root.join(errors_path).uri if errors_path else None,
        errors=outcome.errors,
    )
    echo(format_summary(summary))
    return summary


def _preview(plan, echo: Callable[[str], None]) -> IngestPreview:
    preview = IngestPreview(
        source=plan.source.uri, destination=plan.root.uri, listed=len(plan.listed),
        already_done=len(plan.already_done), known_failures=len(plan.known_failures),
        label_errors=len(plan.label_errors), to_decode=plan.num_pending, shards=len(plan.groups),
        replaced_or_removed=len(plan.superseded),
        first_to_decode=[video.uri for video in plan.groups.videos[:PREVIEW_NAMES]],
    )
    echo(format_preview(preview))
    return preview


def _decoded(row: dict) -> dict:
    return json.loads(row["result"])


def _progress_line(results: list[dict], total: int, started: float, pace: Pace) -> str:
    clips = sum(result["shard"]["rows"] for result in results if result["shard"])
    errors = sum(len(result["errors"]) for result in results)
    return (f"  shards {len(results)}/{total}  clips {clips}  errors {errors}  {rate(clips, started, 'clips')}  "
            f"{pace.eta(len(results), total)}")


def format_summary(summary: IngestSummary, max_errors: int = 10) -> str:
    state = "written" if summary.manifest_written else "unchanged"
    version = f"v{summary.manifest_version:06d}" if summary.manifest_version else "none"
    rows = [
        ("listed", summary.listed),
        ("ingested", summary.ingested),
        ("already done", summary.already_done),
        ("known failures", summary.known_failures),
        ("errored", summary.errored),
        ("clips written", summary.clips_written),
        ("shards written", summary.shards_written),
        ("Ray nodes used", summary.nodes_used),
    ]
    if summary.shards_adopted:
        rows.append(("shards adopted", summary.shards_adopted))
    if summary.labels_missing:
        rows.append(("CSV rows without video", summary.labels_missing))
    if summary.deleted:
        rows.append(("deleted from source", summary.deleted))
    lines = [f"ingest summary  {summary.destination}  manifest {version} ({state})  {summary.seconds:.1f} s"]
    lines += table_lines(rows)
    lines += error_lines(summary.errors, summary.errors_uri, max_errors)
    return "\n".join(lines)
