"""Planning and committing a scoring run into a predictions dataset (pipeline.predictions holds its format): which
listed videos need scoring, which shards of a killed run to adopt, each group's shard, and the next version.

Versions, the source tables, the errors table that remembers failed videos, run tables, adoption and the commit
skeleton are the versioned-dataset core's (pipeline.dataset), shared with the clip dataset. A shard's name is a hash of
the model package, the parameters and its exact sources, and its footer says what it holds (sources and errors). A
killed run leaves complete shards that no manifest lists; a re-run adopts those whose sources are still pending and
unchanged instead of scoring them again, so it finishes without duplicates.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from jobs.registry import ModelIdentity
from pipeline.dataset.commit import check_accounting, commit_version
from pipeline.dataset.parts import ShardEntry, publish_table, published_part
from pipeline.dataset.sources import SourceTable, deleted_inputs, partition_inputs, read_sources
from pipeline.listing import PlannedGroups, SourceVideo, VideoListing
from pipeline.predictions import (
    FOOTER_KEY,
    IDENTITY_FIELDS,
    PREDICTIONS_DIR,
    ScoreConfigError,
    ScoreManifest,
    ScoreParams,
    describe_params_unit,
    predictions_schema,
    unit_of,
)
from pipeline.schema import ErrorRecord
from pipeline.storage import Location, Storage

DEFAULT_VIDEOS_PER_SHARD = 1000
# Shards are the unit of resumption, not of parallelism (decoding blocks are): a large run gets at least this many,
# so that a killed run keeps most of its work, but no shard holds fewer videos than the floor below unless asked to,
# since the driver publishes shards one by one.
_MIN_SHARDS = 64
_MIN_VIDEOS_PER_SHARD = 16


def identity_columns(identity: ModelIdentity) -> dict:
    """Constant columns naming the model, as {name: (value, Arrow type)}."""
    values = [identity.name, identity.version, identity.alias, identity.run_id, identity.model_id]
    return {f.name: (value, f.type) for f, value in zip(IDENTITY_FIELDS, values)}


# ---- plan --------------------------------------------------------------------------------------------------------
@dataclass
class ScorePlan:
    root: Location
    source: Location
    identity: ModelIdentity
    params: ScoreParams
    previous: ScoreManifest | None
    previous_sources: SourceTable  # the previous version's (empty for a first run)
    listed: Sequence[SourceVideo]
    already_done: Sequence[SourceVideo]
    adopted: list[dict]  # results of shards a killed run published (pipeline.dataset.parts.published_part)
    groups: PlannedGroups  # {"shard": relative path, "videos": [source records]}, made when asked for
    # the previous version's failed videos by key and ETag (its errors table), and those unchanged and not retried
    previous_failures: dict[tuple[str, str], ErrorRecord] = field(default_factory=dict)
    known_failures: list[ErrorRecord] = field(default_factory=list)
    # video ids of the previous version that changed or left the source: their old predictions leave the dataset
    superseded: set[str] = field(default_factory=set)
    deleted: set[str] = field(default_factory=set)  # of those, the ones no longer listed
    # the model is a new version of the previous version's (`succeeds`): every listed video is scored again, and the
    # next version holds none of the previous version's predictions
    replaces_model: bool = False

    @property
    def num_pending(self) -> int:
        return len(self.groups.videos)


def source_record(video: SourceVideo) -> dict:
    return {"uri": video.uri, "video_id": video.video_id, "etag": video.etag, "size": video.size}


def shard_name(identity: ModelIdentity, params: ScoreParams, sources: list[dict]) -> str:
    body = [identity.package_sha256, params.to_dict(), [[s["video_id"], s["etag"], s["size"]] for s in sources]]
    digest = hashlib.sha256(json.dumps(body, ensure_ascii=False).encode("utf-8")).hexdigest()
    return f"{PREDICTIONS_DIR}/part-{digest[:24]}.parquet"


def succeeds(previous: ScoreManifest | None, identity: ModelIdentity) -> bool:
    """Whether `identity` is another version of the registered model whose predictions `previous` holds: the champion
    alias moved since the last run. A destination follows one registered model; its next version holds the new
    version's predictions of every listed video, and the versions before keep the old ones until gc."""
    if previous is None or previous.model["package_sha256"] == identity.package_sha256:
        return False
    held = previous.model
    return held.get("version") is not None and identity.version is not None and held["name"] == identity.name


def check_compatible(previous: ScoreManifest | None, identity: ModelIdentity, params: ScoreParams, dst: str) -> None:
    if previous is None:
        return
    if unit_of(previous.params) != params.unit or _windows(previous.params) != _windows(params.to_dict()):
        raise ScoreConfigError(
            f"{dst} holds {describe_params_unit(previous.params)}; this run asks for {params.describe_unit()}. A "
            "destination holds one kind of rows: write them to a new --out"
        )
    if previous.model["package_sha256"] != identity.package_sha256 and not succeeds(previous, identity):
        held = ModelIdentity(**previous.model).describe()
        raise ScoreConfigError(
            f"{dst} holds predictions of {held}; this run resolved {identity.uri} to {identity.describe()}. One "
            "destination follows one registered model (a new version of it re-scores the destination): write "
            "another model's predictions to a new --out"
        )
    if previous.params != params.to_dict():
        raise ScoreConfigError(
            f"{dst} holds predictions made with {previous.params}, this run asks for {params.to_dict()}; write to a "
            "new --out"
        )


def _windows(params: dict) -> tuple:
    return params.get("window_seconds"), params.get("window_stride")


def plan_score(
    root: Location,
    source: Location,
    listed: Sequence[SourceVideo],
    identity: ModelIdentity,
    params: ScoreParams,
    previous: ScoreManifest | None,
    storage: Storage,
    videos_per_shard: int = DEFAULT_VIDEOS_PER_SHARD,
    previous_failures: dict[tuple[str, str], ErrorRecord] | None = None,
    retry_errors: bool = False,
    keep_deleted: bool = False,
) -> ScorePlan:
    """Decide what this run scores: listed videos not in the previous version with the same fingerprint, nor failed
    before with the same key and ETag (`previous_failures`, unless `retry_errors`), minus those held by shards a killed
    run published (adopted whole when every source of theirs is still pending). Predictions of videos no longer
    listed leave the next version, unless `keep_deleted`."""
    check_compatible(previous, identity, params, root.uri)
    replaces_model = succeeds(previous, identity)
    # a new model version owes nothing to the old one's results: its failures are tried again too
    previous_failures = {} if replaces_model else previous_failures or {}
    listed = VideoListing.of(listed)
    done = read_sources(root, previous, storage) if previous and not replaces_model else SourceTable.empty()
    inputs = partition_inputs(listed, done, ("etag", "size"), previous_failures, retry_errors)
    pending = _one_per_video_id(inputs.pending)
    deleted = deleted_inputs(done, listed, keep_deleted)
    superseded = done.present(pending.column("video_id")) | deleted

    adopted, adopted_positions, position_of = [], set(), None
    listed_shards = {shard.path for shard in previous.shards} if previous else set()
    for info in storage.list_objects(root.join(PREDICTIONS_DIR)):
        relative = info.location.relative_to(root)
        if not (relative.startswith(f"{PREDICTIONS_DIR}/part-") and relative.endswith(".parquet")):
            continue  # staging files of a writer (maybe still running)
        if relative in listed_shards:
            continue
        result = published_part(storage, info.location, relative, FOOTER_KEY)
        if result is None or result["model_sha256"] != identity.package_sha256 or result["params"] != params.to_dict():
            continue
        if position_of is None:  # only a killed run's leftovers need pending videos by id
            position_of = {video_id: at for at, video_id in enumerate(pending.column("video_id").to_pylist())}
        held = [position_of.get(record["video_id"]) for record in result["videos"]]
        held += [position_of.get(error["source"]["video_id"]) for error in result["errors"]]
        records = result["videos"] + [error["source"] for error in result["errors"]]
        if records and all(
            position is not None and position not in adopted_positions and _unchanged(pending[position], record)
            for position, record in zip(held, records)
        ):
            adopted.append(result)
            adopted_positions.update(held)
    if adopted_positions:
        pending = pending.take([position for position in range(len(pending)) if position not in adopted_positions])

    # Depends only on the pending set, so a re-run after a kill plans the same groups and shard names.
    per_shard = min(videos_per_shard, max(_MIN_VIDEOS_PER_SHARD, math.ceil(len(pending) / _MIN_SHARDS)))
    groups = PlannedGroups.cut(pending, per_shard, source_record, lambda sources: shard_name(identity, params, sources))
    return ScorePlan(
        root=root, source=source, identity=identity, params=params, previous=previous, previous_sources=done,
        listed=listed, already_done=inputs.already_done, adopted=adopted, groups=groups,
        previous_failures=previous_failures, known_failures=inputs.known_failures, superseded=superseded,
        deleted=deleted, replaces_model=replaces_model,
    )


def _unchanged(video: SourceVideo, source: dict) -> bool:
    return (video.etag, video.size) == (source["etag"], source["size"])


def _one_per_video_id(videos: VideoListing) -> VideoListing:
    """The last video of each video id, in the order ids first appear: two keys may share an id (the same name in
    two Unicode normal forms), and a predictions version holds one row per id."""
    ids = videos.column("video_id")
    if len(ids) < 2:
        return videos
    if pc.all(pc.less_equal(ids[:-1], ids[1:])).as_py():  # a listing's order: equal ids are neighbours
        unique = not pc.any(pc.equal(ids[:-1], ids[1:])).as_py()
    else:
        unique = pc.count_distinct(ids).as_py() == len(ids)  # its hash table costs ~200 MB at a million ids
    if unique:
        return videos
    last: dict[str, int] = {}
    for position, video_id in enumerate(ids.to_pylist()):
        last[video_id] = position
    return videos.take(list(last.values()))


# ---- shards ------------------------------------------------------------------------------------------------------
def publish_shard(
    storage: Storage, plan: ScorePlan, group: dict, rows: pa.Table, errors: list[ErrorRecord], num_classes: int,
    embedding_dim: int | None = None,
) -> dict:
    """Publish one group's predictions atomically (no file when every video of the group failed); returns the
    group's result: the shard entry, the scored videos and the errors."""
    by_uri = {source["uri"]: source for source in group["videos"]}
    scored_uris = set(rows.column("source_uri").to_pylist())
    result = {
        "model_sha256": plan.identity.package_sha256,
        "params": plan.params.to_dict(),
        "videos": [source for source in group["videos"] if source["uri"] in scored_uris],
        "errors": [
            {"video_id": by_uri[error.source_uri]["video_id"], "source": by_uri[error.source_uri], **error.to_dict()}
            for error in errors
        ],
        "shard": None,
        "adopted": False,
    }
    if rows.num_rows == 0:
        return result
    schema = predictions_schema(plan.params, num_classes, embedding_dim)
    order = [("video_id", "ascending")] + ([("window_index", "ascending")] if plan.params.windowed else [])
    table = rows.select(schema.names).cast(schema).sort_by(order)
    footer = {k: v for k, v in result.items() if k not in ("shard", "adopted")}
    table = table.replace_schema_metadata(
        {**(schema.metadata or {}), FOOTER_KEY: json.dumps(footer, ensure_ascii=False)}
    )
    size, digest = publish_table(storage, plan.root.join(group["shard"]), table, compression="zstd")
    result["shard"] = asdict(ShardEntry(group["shard"], table.num_rows, digest, size))
    return result


# ---- commit ------------------------------------------------------------------------------------------------------
@dataclass
class ScoreCounts:
    """What one run did with its inputs: listed = scored + already_done + known_failures + errored."""

    listed: int
    scored: int  # including videos of adopted shards
    already_done: int
    known_failures: int  # failed before and unchanged since: not scored again (see retry_errors)
    errored: int  # failed in this run
    shards_written: int
    shards_adopted: int
    deleted: int  # videos of the previous version no longer listed, whose predictions left the dataset


def commit_score(
    plan: ScorePlan, results: list[dict], class_names: list[str], seconds: float, throughput: dict, storage: Storage
) -> tuple[ScoreManifest | None, ScoreCounts, list[ErrorRecord]]:
    """Results -> the version's errors table (this run's new failures and the known ones still listed) and a new
    manifest version (returned, not yet written; None when nothing changed: pipeline.dataset.commit.commit_version)."""
    results = plan.adopted + results
    errors = [ErrorRecord(**{k: e[k] for k in ErrorRecord.__dataclass_fields__}) for r in results for e in r["errors"]]
    new_shards = [ShardEntry(**result["shard"]) for result in results if result["shard"]]
    upserts = SourceTable.from_rows([
        {**{key: video[key] for key in ("video_id", "uri", "etag", "size")}, "shard": r["shard"]["path"]}
        for r in results
        if r["shard"]
        for video in r["videos"]
    ]).table
    counts = ScoreCounts(
        listed=len(plan.listed),
        scored=upserts.num_rows,
        already_done=len(plan.already_done),
        known_failures=len(plan.known_failures),
        errored=len({error.source_uri for error in errors}),
        shards_written=sum(1 for r in results if r["shard"] and not r["adopted"]),
        shards_adopted=sum(1 for r in results if r["shard"] and r["adopted"]),
        deleted=len(plan.deleted),
    )
    check_accounting(asdict(counts), ("scored", "already_done", "known_failures", "errored"), "scoring")
    manifest = commit_version(
        storage, plan.root, plan.previous, plan.previous_sources,
        new_shards=new_shards,
        upserts=upserts,
        # the plan's, and videos of adopted shards that the previous version held
        superseded=plan.superseded | plan.previous_sources.present(upserts.column("video_id")),
        known_failures=plan.known_failures,
        errors=errors,
        previous_failures=plan.previous_failures,
        folder=PREDICTIONS_DIR,
        write_options={"compression": "zstd"},
        job="score run",
        manifest=lambda **version: ScoreManifest(
            source=plan.source.uri,
            model=plan.identity.to_dict(),
            params=plan.params.to_dict(),
            class_names=class_names,
            unit=plan.params.unit,
            counts=asdict(counts),
            throughput={"job_seconds": round(seconds, 3), **{k: round(v, 3) for k, v in throughput.items()}},
            **version,
        ),
        keep_footer=False,
        restart=plan.replaces_model,
    )
    return manifest, counts, errors
