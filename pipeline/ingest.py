"""The ingest pipeline: plan which videos need decoding, decode them into shards with Ray Data, commit a manifest.

    plan_ingest      (driver)   list + labels + previous manifest -> groups of pending videos, one shard each
    ingest_groups    (any CPU)  read -> decode -> sample -> resize/crop -> one atomically written shard per group
    build_dataset    (Ray Data) ingest_groups over all groups, streaming and parallel across the cluster
    commit_ingest    (driver)   results -> copy-on-write of changed and deleted videos' old shards -> errors table ->
                                manifest

Versions, the errors table that remembers failed inputs, run tables, adoption and the commit skeleton are the
versioned-dataset core's (pipeline.dataset), which the predictions dataset shares. Killed runs: a shard's name is a
hash of its sampling parameters and its exact sources (key, fingerprint, label), and its footer says what it holds.
A re-run plans the same groups for the same pending videos, finds the shards that were already published and adopts
them without decoding; the manifest, written last, is the only thing that makes shards visible to readers. Shards
never listed by a manifest are invisible leftovers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pipeline.dataset.commit import check_accounting, commit_version
from pipeline.dataset.failures import failure_key
from pipeline.dataset.parts import ShardEntry, published_part
from pipeline.dataset.sources import SourceTable, deleted_inputs, partition_inputs
from pipeline.decode import DecodeLimits, decode_clips
from pipeline.isolation import DecoderProcess, shared_decoder
from pipeline.listing import (
    ItemsOnDemand,
    PlannedGroups,
    SourceVideo,
    VideoListing,
    extend_class_map,
    fixed_class_map,
    split_segment,
)
from pipeline.manifest import SHARDS_DIR, Manifest, SamplingParams
from pipeline.schema import ErrorRecord
from pipeline.shards import FOOTER_KEY, ShardWriter, parquet_write_options
from pipeline.storage import Location, Storage, is_input_error, parse_uri

DEFAULT_MAX_SHARD_BYTES = 256 * 1024 * 1024
# Enough groups for this many CPUs to share the work while shards stay small only where the data is small.
_MIN_GROUPS_FOR_PARALLELISM = 256


class IngestConfigError(ValueError):
    """The run's parameters conflict with the dataset already at the destination."""


@dataclass
class IngestPlan:
    root: Location
    source: Location
    sampling: SamplingParams
    labels_mode: str
    class_map: dict[str, int]
    previous: Manifest | None
    previous_sources: SourceTable  # the previous version's (pipeline.dataset.sources.read_sources), empty at first
    listed: Sequence[SourceVideo]
    already_done: Sequence[SourceVideo]
    groups: PlannedGroups  # {"shard": relative path, "videos": [source records]}, made when asked for
    label_errors: list[ErrorRecord]  # this run's, also of inputs that failed to be labelled before
    # video ids ingested before whose fingerprint or label changed, or that left SRC: their old clips leave the dataset
    superseded: set[str] = field(default_factory=set)
    # the previous version's failed inputs by key and ETag (its errors table), and those unchanged and not retried
    previous_failures: dict[tuple[str, str], ErrorRecord] = field(default_factory=dict)
    known_failures: list[ErrorRecord] = field(default_factory=list)
    deleted: set[str] = field(default_factory=set)  # video ids of the previous version no longer listed in SRC

    @property
    def num_pending(self) -> int:
        return len(self.groups.videos)


def _source_record(video: SourceVideo, class_map: dict[str, int]) -> dict:
    label = class_map[video.label_name] if video.label_name is not None else None
    return {
        "uri": video.uri,
        "video_id": video.video_id,
        "etag": video.etag,
        "size": video.size,
        "label_name": video.label_name,
        "label": label,
    }


def shard_name(sampling: SamplingParams, sources: list[dict]) -> str:
    identity = json.dumps(
        [sampling.to_dict(), [[s["video_id"], s["etag"], s["size"], s["label_name"], s["label"]] for s in sources]],
        ensure_ascii=False,
    )
    return f"part-{hashlib.sha256(identity.encode('utf-8')).hexdigest()[:24]}.parquet"


def plan_ingest(
    dst: str,
    src: str,
    listed: list[SourceVideo],
    labelled: list[SourceVideo],
    label_errors: list[ErrorRecord],
    labels_mode: str,
    sampling: SamplingParams,
    previous: Manifest | None,
    previous_sources: SourceTable | None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    class_names: list[str] | None = None,
    previous_failures: dict[tuple[str, str], ErrorRecord] | None = None,
    retry_errors: bool = False,
    keep_deleted: bool = False,
) -> IngestPlan:
    """Decide what this run decodes. `labelled` are the listed videos that got a label (all of them when unlabeled).
    With `class_names`, class ids follow that list and a video labelled outside it becomes an error row.

    A video that failed to decode before (`previous_failures`, the previous version's errors table) is decoded again
    only when its ETag changed, or with `retry_errors`; one that failed to be labelled is labelled again every run.
    Videos of the previous version no longer listed leave the dataset, unless `keep_deleted`."""
    previous_failures = previous_failures or {}
    previous_sources = previous_sources if previous_sources is not None else SourceTable.empty()
    if previous is not None:
        if previous.sampling != sampling:
            raise IngestConfigError(
                f"{dst} holds clips made with {previous.sampling.to_dict()}, this run asks for "
                f"{sampling.to_dict()}; write to a new --out"
            )
        if previous.labels != labels_mode:
            raise IngestConfigError(
                f"{dst} was ingested with labels from {previous.labels!r}, this run uses {labels_mode!r}; "
                "write to a new --out"
            )
    listed, labelled = VideoListing.of(listed), VideoListing.of(labelled)
    if class_names is not None:
        fixed = fixed_class_map(class_names, previous.class_map if previous else {})
        in_class_list, unknown = [], []
        for position, video in enumerate(labelled):
            if video.label_name in fixed:
                in_class_list.append(position)
            else:
                unknown.append(ErrorRecord(video.uri, video.etag, "labels", "UnknownClass",
                                           f"label {video.label_name!r} is not in the class list"))
        label_errors = label_errors + unknown
        labelled = labelled.take(in_class_list)
    decode_failures = {key: error for key, error in previous_failures.items() if error.stage != "labels"}
    inputs = partition_inputs(labelled, previous_sources, ("etag", "size", "label_name"), decode_failures, retry_errors)
    already_done, pending = inputs.already_done, inputs.pending
    deleted = deleted_inputs(previous_sources, listed, keep_deleted)
    superseded = previous_sources.present(pending.column("video_id")) | deleted
    if class_names is not None:
        class_map = fixed
    else:
        class_map = extend_class_map(
            previous.class_map if previous else {}, pending.column("label_name").drop_null().unique().to_pylist()
        )

    per_shard_cap = max(1, max_shard_bytes // (sampling.clip_bytes * sampling.clips_per_video))
    # Depends only on the pending set, so a re-run after a kill plans the same groups (and shard names).
    videos_per_group = min(per_shard_cap, max(1, math.ceil(len(pending) / _MIN_GROUPS_FOR_PARALLELISM)))
    groups = PlannedGroups.cut(
        pending, videos_per_group, lambda video: _source_record(video, class_map),
        lambda sources: f"{SHARDS_DIR}/{shard_name(sampling, sources)}",
    )
    return IngestPlan(
        root=parse_uri(dst),
        source=parse_uri(src),
        sampling=sampling,
        labels_mode=labels_mode,
        class_map=class_map,
        previous=previous,
        previous_sources=previous_sources,
        listed=listed,
        already_done=already_done,
        groups=groups,
        label_errors=label_errors,
        superseded=superseded,
        previous_failures=previous_failures,
        known_failures=inputs.known_failures,
        deleted=deleted,
    )


def ingest_group(
    group: dict,
    storage: Storage,
    sampling: SamplingParams,
    root_uri: str,
    limits: DecodeLimits = DecodeLimits(),
    decoder: DecoderProcess | None = None,
) -> dict:
    """Decode every video of a group into one shard (`ingest_groups` of one group)."""
    (result,) = ingest_groups([group], storage, sampling, root_uri, limits, decoder)
    return result


def ingest_groups(
    groups: list[dict],
    storage: Storage,
    sampling: SamplingParams,
    root_uri: str,
    limits: DecodeLimits = DecodeLimits(),
    decoder: DecoderProcess | None = None,
) -> Iterator[dict]:
    """Decode every video of each group into the group's shard, yielding one result per group in order. Never raises
    for a bad video: it becomes an error record. That includes a video above `limits` and, when `decoder` (a child
    process, pipeline.isolation) decodes, one that crashes it or runs past `limits.decode_timeout`; without `decoder`
    the videos are decoded in this process.

    Three stages run side by side, each a video ahead of the next (`one_ahead`), across the groups: the store's read
    of the video after next, the decoding of the next, the writing and publishing of the current one's shard. Runs
    under 256 videos have a video per group, whose decoding otherwise waited for the previous shard's compression,
    fsync or upload, and a store's time to first byte is spent beside decoding instead of before it. A worker so holds
    up to three videos' bytes at once, each at most the storage's spill threshold (larger ones wait on local disk).

    A result is JSON-able: the shard entry (None when no video gave clips), per-video clip counts, errors, and whether
    an already published shard (from a killed run) was adopted instead of decoding again.
    """
    root = parse_uri(root_uri)
    # a group's "published" says whether its shard was there when the driver listed the folder; without it, ask
    adopted = [_published(storage, root, group["shard"]) if group.get("published", True) else None for group in groups]
    to_decode = [source for group, result in zip(groups, adopted) if result is None for source in group["videos"]]

    def fetch(source: dict) -> tuple[contextlib.ExitStack, Any] | ErrorRecord:
        """The video's bytes or local path, held open by the returned stack (a spilled download's file is removed
        when `decode` closes it)."""
        held = contextlib.ExitStack()
        try:
            return held, held.enter_context(storage.fetched(parse_uri(split_segment(source["uri"])[0]), source["size"]))
        except Exception as error:  # one bad input must not lose the others
            held.close()
            if not is_input_error("read", error):
                raise
            return ErrorRecord.of(source["uri"], source["etag"], "read", error)

    def decode(source: dict, fetched: tuple[contextlib.ExitStack, Any] | ErrorRecord) -> tuple | ErrorRecord:
        if isinstance(fetched, ErrorRecord):
            return fetched
        held, video = fetched
        with held:
            try:
                return decode_clips(
                    video,
                    frames=sampling.frames,
                    short_side=sampling.short_side,
                    sampling=sampling.sampling,
                    stride=sampling.stride,
                    clips_per_video=sampling.clips_per_video,
                    frames_per_segment=sampling.frames_per_segment,
                    limits=limits,
                    decoder=decoder,
                    segment=split_segment(source["uri"])[1],
                    width=sampling.aspect_width,
                )
            except Exception as error:  # one bad input must not lose the others
                if not is_input_error("decode", error):
                    raise
                return ErrorRecord.of(source["uri"], source["etag"], "decode", error)

    fetched = one_ahead(fetch, to_decode, discard=_release)
    decoded = one_ahead(lambda pair: decode(*pair), zip(to_decode, fetched))
    with contextlib.closing(fetched), contextlib.closing(decoded):
        for group, result in zip(groups, adopted):
            yield result if result is not None else _write_shard(group, decoded, storage, sampling, root)


def _release(fetched: tuple[contextlib.ExitStack, Any] | ErrorRecord) -> None:
    """A fetched video that no stage will decode (the task stopped early): its download is removed."""
    if not isinstance(fetched, ErrorRecord):
        fetched[0].close()


def _published(storage: Storage, root: Location, shard: str) -> dict | None:
    """The result of a shard a killed run already published, None when there is none to adopt."""
    final = root.join(shard)
    return published_part(storage, final, shard, FOOTER_KEY) if storage.exists(final) else None


def _write_shard(group: dict, decoded: Iterator, storage: Storage, sampling: SamplingParams, root: Location) -> dict:
    """Write the clips of the group's videos, taken in order from `decoded`, into the group's shard and commit it."""
    writer = ShardWriter(storage, root.join(group["shard"]), sampling.stored_frames, sampling.short_side,
                         sampling.aspect_width)
    videos, errors = [], []
    try:
        for source in group["videos"]:
            result = next(decoded)
            if isinstance(result, ErrorRecord):
                errors.append(result)
                continue
            clips, info = result
            writer.add_video(
                clips,
                info.frame_indices,
                video_id=source["video_id"],
                source_uri=source["uri"],
                source_etag=source["etag"],
                label=source["label"],
                label_name=source["label_name"],
                fps=info.fps,
                padded=info.padded,
                valid_width=info.valid_width,
            )
            videos.append({**source, "clips": int(clips.shape[0]), "padded": info.padded})
        result = {"videos": videos, "errors": [error.to_dict() for error in errors], "adopted": False}
        if writer.rows == 0:
            writer.abort()
            return {**result, "shard": None}
        entry = {"path": group["shard"], "rows": writer.rows}
        size, digest = writer.commit({**result, "shard": entry})
        return {**result, "shard": {**entry, "sha256": digest, "bytes": size}}
    except BaseException:
        writer.abort()
        raise


def one_ahead(function: Callable[[Any], Any], items: Iterable, discard: Callable[[Any], None] | None = None
              ) -> Iterator[Any]:
    """`function(item)` of each item in order, the next item's computed in a thread while the caller handles the
    current one's: a video is read and decoded (in the decoding child) while the previous one's clips are written.
    An exception of `function` is raised where its result would have been. A result computed ahead that nobody takes
    (the caller stopped, or an earlier result raised) is handed to `discard`."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="one-ahead") as ahead:
        upcoming = None
        try:
            for item in items:
                current, upcoming = upcoming, ahead.submit(function, item)
                if current is not None:
                    yield current.result()
            if upcoming is not None:
                current, upcoming = upcoming, None
                yield current.result()
        finally:
            if upcoming is not None and discard is not None and upcoming.exception() is None:
                discard(upcoming.result())


# A task takes a 1 / (2 x CPUs) share of the groups not yet dealt, of at most this many videos: the first tasks are
# large, so that scheduling a task costs little next to decoding, and the last ones a group each, so that no CPU idles
# while another finishes a long task (guided self-scheduling). With tasks of equal size, the last wave of 48 videos on
# 2 CPUs left one CPU idle for 0.15-0.3 s of a 2.5 s run.
_MAX_VIDEOS_PER_TASK = 32


def task_bounds(groups: int, videos_per_group: int, cpus: int) -> list[int]:
    """Where each task's groups begin and end: task t runs groups `[bounds[t], bounds[t + 1])`. Tasks never grow
    along the list, and the last ones hold one group each."""
    bounds, dealt = [0], 0
    most = max(1, _MAX_VIDEOS_PER_TASK // max(1, videos_per_group))
    while dealt < groups:
        dealt += max(1, min(most, math.ceil((groups - dealt) / (2 * max(1, cpus)))))
        bounds.append(dealt)
    return bounds


def ray_items(plan: IngestPlan, cpus: int, published: set[str] | None = None) -> Sequence[dict]:
    """One item per Ray task (`task_bounds`): the JSON list of its groups, made as Ray Data reads it (`from_items`
    builds and stores one block at a time). With `published` (the shard paths in the destination's folder, listed
    after the run claimed its parts), each group says whether its shard was there, so that a task asks the store only
    about those (to adopt a killed run's shard): a request per shard less, of which each costs a store's latency."""
    videos_per_group = len(plan.groups[0]["videos"]) if plan.groups else 1  # groups after the first hold no more
    bounds = task_bounds(len(plan.groups), videos_per_group, cpus)

    def item(task: int) -> dict:
        groups = [plan.groups[index] for index in range(bounds[task], bounds[task + 1])]
        if published is not None:
            groups = [{**group, "published": group["shard"] in published} for group in groups]
        return {"groups": json.dumps(groups, ensure_ascii=False)}

    return ItemsOnDemand(len(bounds) - 1, item)


def build_dataset(plan: IngestPlan, storage: Storage, limits: DecodeLimits = DecodeLimits(),
                  published: set[str] | None = None):
    """A Ray Dataset with one row per group: `{"result": json}`, produced as tasks finish (streaming).

    Groups (shards) are dealt into tasks of decreasing size (`task_bounds`); how groups share tasks does not change
    what any shard holds. Each worker decodes in its own child process (`shared_decoder`), so that a video that kills
    the decoder or hangs is one error row, not a failed task that Ray retries with all its groups.
    """
    import ray
    import ray.data

    sampling, root_uri = plan.sampling, plan.root.uri

    def run_groups(batch: dict) -> dict:
        node_id = ray.get_runtime_context().get_node_id()
        decoder = shared_decoder()
        decoder.start()  # a child that cannot start fails the task, rather than every video as a decoding error
        groups = [group for text in batch["groups"] for group in json.loads(text)]
        results = ingest_groups(groups, storage, sampling, root_uri, limits, decoder)
        return {"result": [json.dumps({**result, "node_id": node_id}, ensure_ascii=False) for result in results]}

    items = ray_items(plan, int(ray.cluster_resources().get("CPU", 1)), published)
    dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
        run_groups, batch_size=None, batch_format="numpy", num_cpus=1
    )
    # One operator, nothing to reserve CPUs for: Ray Data's per-operator reservation held half of them back until the
    # first tasks had finished (six half-second tasks on 2 CPUs took 2.5 s instead of 1.6 s; ingest of 48 videos lost
    # a quarter of its wall time to it). This dataset's own context: other datasets of the process keep theirs.
    dataset.context.op_resource_reservation_enabled = False
    return dataset


@dataclass
class IngestCounts:
    """What one run did with its inputs: listed = ingested + already_done + known_failures + errored."""

    listed: int
    ingested: int
    already_done: int
    errored: int  # failed in this run
    labels_missing: int  # labels CSV rows naming no listed video
    clips_written: int
    shards_written: int
    shards_adopted: int  # published by a killed earlier run, taken over without decoding
    known_failures: int  # failed before and unchanged since: not decoded again (see retry_errors)
    deleted: int  # videos of the previous version no longer in SRC, whose clips left the dataset


@dataclass
class IngestOutcome:
    manifest: Manifest | None  # None when nothing changed since the previous version
    counts: IngestCounts
    errors: list[ErrorRecord]  # this run's new failures (the version's errors table holds the known ones too)


def commit_ingest(plan: IngestPlan, results: list[dict], storage: Storage) -> IngestOutcome:
    """Turn group results into a new manifest version (written last) plus its errors table: the run's new failures
    and the known ones of inputs still listed and unchanged (pipeline.dataset.commit.commit_version). No version when
    nothing changed."""
    label_errors = [error for error in plan.label_errors if failure_key(error) not in plan.previous_failures]
    known_label_errors = [error for error in plan.label_errors if failure_key(error) in plan.previous_failures]
    errors = list(label_errors)
    new_sources: list[dict] = []
    new_shards: list[ShardEntry] = []
    adopted = 0
    for result in results:
        errors.extend(ErrorRecord(**error) for error in result["errors"])
        if result["shard"] is None:
            continue
        shard = ShardEntry(**{key: result["shard"][key] for key in ("path", "rows", "sha256", "bytes")})
        adopted += bool(result.get("adopted"))
        new_shards.append(shard)
        new_sources += [{**{key: video[key] for key in ("video_id", "uri", "etag", "size", "label_name", "clips")},
                         "shard": shard.path} for video in result["videos"]]

    listed_uris = {video.uri for video in plan.listed}
    counts = {
        "listed": len(plan.listed),
        "ingested": len(new_sources),
        "already_done": len(plan.already_done),
        "known_failures": len(plan.known_failures) + sum(1 for e in known_label_errors if e.source_uri in listed_uris),
        "errored": len({error.source_uri for error in errors if error.source_uri in listed_uris}),
        "labels_missing": sum(1 for error in plan.label_errors if error.error_type == "MissingVideo"),
        "clips_written": sum(shard.rows for shard in new_shards),
        "deleted": len(plan.deleted),
    }
    check_accounting(counts, ("ingested", "already_done", "known_failures", "errored"), "ingest")

    manifest = commit_version(
        storage, plan.root, plan.previous, plan.previous_sources,
        new_shards=new_shards,
        upserts=SourceTable.from_rows(new_sources).table,
        superseded=plan.superseded,
        known_failures=plan.known_failures + known_label_errors,
        errors=errors,
        previous_failures=plan.previous_failures,
        folder=SHARDS_DIR,
        write_options=parquet_write_options(plan.sampling.schema()),
        job="ingest",
        manifest=lambda **version: Manifest(
            source=plan.source.uri,
            sampling=plan.sampling,
            labels=plan.labels_mode,
            class_map=plan.class_map,
            counts=counts,
            **version,
        ),
    )
    return IngestOutcome(
        manifest, IngestCounts(**counts, shards_written=len(new_shards) - adopted, shards_adopted=adopted), errors
    )
