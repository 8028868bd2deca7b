"""`uniformer score`: batch inference over a video archive with a registered model -> sharded Parquet predictions.

    resolve   (driver)        models:/NAME@ALIAS | models:/NAME/VERSION | models:/m-ID | PATH -> one pinned package
    plan      (driver)        list (same fingerprints as ingest) minus videos already scored, minus adopted shards
    decode    (CPU tasks)     fetch -> decode_views: T frames x temporal clips x spatial crops per video
    predict   (actor pool)    the model, loaded once per actor (one GPU each with --gpu), averages the views' softmax;
                              the pool starts with one actor and grows while videos queue, see `actor_pool_bounds`
    publish   (driver)        prediction rows (a few hundred bytes per video) grouped into shards as they stream out,
                              each published atomically; then the errors table and the manifest, written last

Ray Data streams the stages, so CPUs decode while the actors (GPUs) infer. `score_dataset` is the same Dataset
without the publishing, for users composing their own pipelines.
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.console import Pace, init_ray, rate
from jobs.options import ScoreConfig, ScoreOptions
from jobs.registry import ModelIdentity, ResolvedModel, resolve_model
from jobs.report import error_lines, first_of_lines, table_lines
from jobs.scoring.predict import ViewPredictor, WindowPredictor
from jobs.scoring.results import (
    DEFAULT_VIDEOS_PER_SHARD,
    ScoreCounts,
    ScorePlan,
    commit_score,
    identity_columns,
    plan_score,
    publish_shard,
)
from pipeline.dataset.commit import nothing_new_line
from pipeline.dataset.failures import read_failures
from pipeline.dataset.runs import RunRecord
from pipeline.decode import DecodeLimits
from pipeline.isolation import shared_decoder
from pipeline.listing import ItemsOnDemand, SourceVideo, VideoListing, list_videos, split_segment
from pipeline.predictions import PREDICTIONS_DIR, ScoreParams, latest_score_manifest, write_score_manifest
from pipeline.schema import ErrorRecord
from pipeline.storage import Storage, is_input_error, parse_uri
from pipeline.views import decode_views, parse_views
from pipeline.windows import WINDOWS_PER_CHUNK, WindowSpec, iter_windows, parse_windows

# Videos per decoding task call: enough to amortise a task, few enough that a task's output (V views of T frames
# per video, ~15 MB at 4x3 views of 8 x 224 x 224) stays a modest block.
_VIDEOS_PER_DECODE_BATCH = 4
# A decoding worker's memory besides its output: the process with torch and decord loaded, frames at source
# resolution, demuxer buffers (Ray Data measured ~550 MB per worker on 640x360 sources).
_DECODER_MEMORY_BYTES = 512 * 1024 * 1024
# Windows per model call for each video of --batch-size: a window brings one temporal view, a video the default four.
_WINDOWS_PER_VIDEO_OF_BATCH = 4
T = TypeVar("T")


def actor_pool_bounds(actors: int | None, use_gpu: bool, cluster_gpus: float) -> tuple[int, int]:
    """(min, max) model actors. The pool starts with one actor and Ray Data adds actors while videos queue and
    resources free up (on an autoscaling cluster its autoscaler asks for their GPUs), up to max: `actors` when given;
    else with use_gpu one per GPU the cluster has now, at least one (an autoscaled GPU group may have none yet, and
    grows past one only with `actors`); else one. A fixed-size pool would score nothing until all its GPUs were free."""
    if actors:
        return 1, actors
    return 1, (max(1, int(cluster_gpus)) if use_gpu else 1)


def build_params(
    card, views: str | tuple[int, int], top_k: int, full_probs: bool, short_side: int | None,
    windows: str | None = None, embeddings: bool = False,
) -> ScoreParams:
    """The run's parameters; with `windows` ("SECONDS[:STRIDE]"), one temporal view per window and `views`' spatial
    crops."""
    temporal, spatial = parse_views(views) if isinstance(views, str) else views
    spec = parse_windows(windows) if windows is not None else None
    if spec is not None:
        temporal = 1
    elif embeddings:
        raise ValueError("embeddings are stored per window: give --windows with --embeddings")
    if top_k < 1:
        raise ValueError("top_k must be >= 1")
    short = card.crop_size if short_side is None else short_side
    if short < card.crop_size:
        raise ValueError(f"short_side ({short}) must be >= the model's crop size ({card.crop_size})")
    return ScoreParams(
        frames=card.frames,
        crop=card.crop_size,
        short_side=short,
        temporal_views=temporal,
        spatial_views=spatial,
        sampling="uniform",
        stride=16,
        top_k=min(top_k, card.num_classes),
        full_probs=full_probs,
        window_seconds=spec.length if spec else None,
        window_stride=spec.stride if spec else None,
        embeddings=bool(embeddings and spec),
    )


def decode_batch(
    batch: dict[str, np.ndarray], storage: Storage, params: ScoreParams, limits: DecodeLimits = DecodeLimits()
) -> dict[str, np.ndarray]:
    """Fetch and decode the views of each video of a batch, decoding in this worker's child process
    (pipeline.isolation) within `limits`. A video that cannot be read or decoded keeps its row, with zero views and
    its error, so that every input reaches the end of the pipeline. A segment's URI (`video.mp4#t=1,4`, a segments
    dataset's inputs, which evaluation and the gate score) is decoded inside the segment."""
    decoder = shared_decoder()
    decoder.start()  # a child that cannot start fails the task, rather than every video as a decoding error
    count = len(batch["source_uri"])
    views = blank_views(count, params)
    stages, types, messages = [""] * count, [""] * count, [""] * count
    for row, (uri, size) in enumerate(zip(batch["source_uri"], batch["source_size"])):
        stage = "read"
        video_uri, segment = split_segment(str(uri))
        try:
            with storage.fetched(parse_uri(video_uri), int(size)) as video:
                stage = "decode"
                views[row], _ = decode_views(
                    video,
                    params.frames,
                    params.crop,
                    params.temporal_views,
                    params.spatial_views,
                    short_side=params.short_side,
                    sampling=params.sampling,
                    stride=params.stride,
                    limits=limits,
                    decoder=decoder,
                    segment=segment,
                )
        except Exception as error:  # one bad input must not lose the others
            if not is_input_error(stage, error):
                raise
            record = ErrorRecord.of(str(uri), "", stage, error)
            stages[row], types[row], messages[row] = record.stage, record.error_type, record.message
    return decoded(batch, views, stages, types, messages)


def blank_views(count: int, params: ScoreParams) -> np.ndarray:
    """Room for the views of `count` videos; a video that cannot be decoded keeps its zeros."""
    return np.zeros(
        (count, params.temporal_views * params.spatial_views, params.frames, params.crop, params.crop, 3), np.uint8
    )


def decoded(
    batch: dict[str, np.ndarray], views: np.ndarray, stages: list[str], types: list[str], messages: list[str]
) -> dict[str, np.ndarray]:
    """`batch`'s videos as `ViewPredictor` takes them: their views, and the error of each that has one ("" if not)."""
    return {
        **{key: batch[key] for key in ("video_id", "source_uri", "source_etag", "source_size", "shard")},
        "views": views,
        "error_stage": np.array(stages, dtype=object),
        "error_type": np.array(types, dtype=object),
        "error_message": np.array(messages, dtype=object),
    }


def decode_window_batch(
    batch: dict[str, np.ndarray], storage: Storage, params: ScoreParams, limits: DecodeLimits = DecodeLimits(),
    windows_per_chunk: int = WINDOWS_PER_CHUNK,
):
    """Fetch each video of a batch and yield its windows' views (pipeline.windows.iter_windows, its frames read in this
    worker's decoding child within `limits`) a chunk at a time, one row per window with `windows_in_video`, so that
    memory holds a few windows whatever the video's length. A video that cannot be read or decoded yields one error
    row; its `windows_in_video` counts the rows it yielded with it (the windows before the failure, which the driver
    drops, and the error row)."""
    spec = WindowSpec(params.window_seconds, params.window_stride)
    decoder = shared_decoder()
    decoder.start()  # a child that cannot start fails the task, rather than every video as a decoding error
    keys = ("video_id", "source_uri", "source_etag", "source_size", "shard")
    for row, (uri, size) in enumerate(zip(batch["source_uri"], batch["source_size"])):
        video = {key: batch[key][row : row + 1] for key in keys}
        stage, emitted = "read", 0
        try:
            with storage.fetched(parse_uri(str(uri)), int(size)) as path:
                stage = "decode"
                for chunk in iter_windows(path, spec, params.frames, params.crop, params.spatial_views,
                                          params.short_side, limits, windows_per_chunk, decoder=decoder):
                    count = len(chunk.bounds)
                    emitted += count
                    yield {
                        **{key: np.repeat(value, count) for key, value in video.items()},
                        "window_index": np.arange(chunk.first, chunk.first + count, dtype=np.int32),
                        "window_start": chunk.bounds[:, 0].astype(np.float64),
                        "window_end": chunk.bounds[:, 1].astype(np.float64),
                        "windows_in_video": np.full(count, chunk.total, np.int64),
                        "views": chunk.views,
                        "error_stage": np.array([""] * count, dtype=object),
                        "error_type": np.array([""] * count, dtype=object),
                        "error_message": np.array([""] * count, dtype=object),
                    }
        except Exception as error:  # one bad input must not lose the others
            if not is_input_error(stage, error):
                raise
            record = ErrorRecord.of(str(uri), "", stage, error)
            yield {
                **video,
                "window_index": np.array([-1], np.int32),
                "window_start": np.zeros(1), "window_end": np.zeros(1),
                "windows_in_video": np.array([emitted + 1], np.int64),
                "views": np.zeros((1, params.spatial_views, params.frames, params.crop, params.crop, 3), np.uint8),
                "error_stage": np.array([record.stage], dtype=object),
                "error_type": np.array([record.error_type], dtype=object),
                "error_message": np.array([record.message], dtype=object),
            }


def ray_items(videos: VideoListing, videos_per_shard: int) -> Sequence[dict]:
    """One item per video (`shard`: the index of its group of `videos_per_shard`), made as Ray Data reads it:
    `from_items` builds and stores one block at a time, so the driver never holds every video as a Python dict."""

    def item(position: int) -> dict:
        video = videos[position]
        return {"video_id": video.video_id, "source_uri": video.uri, "source_etag": video.etag,
                "source_size": int(video.size), "shard": position // videos_per_shard}

    return ItemsOnDemand(len(videos), item)


def _build(
    items: Sequence[dict], resolved: ResolvedModel, params: ScoreParams, storage: Storage, options: ScoreOptions,
    limits: DecodeLimits,
):
    """The Ray Dataset of prediction rows (plus `shard` and `error_*` columns) for the given videos."""
    import ray
    import ray.data

    with open(resolved.weights_path, "rb") as handle:
        weights = ray.put(handle.read())  # every actor fetches it from the object store, once
    with open(resolved.config_path, encoding="utf-8") as handle:
        config = handle.read()

    # The decoding group is sized by the cluster, not here: decoding tasks (one CPU each, no concurrency cap) take
    # every CPU the model actors leave free, so each actor is fed at the rate of the CPUs beside it. Keeping a GPU
    # busy takes model videos/s / decoding videos/s per CPU of them (`decode_cpus_per_model_actor` of
    # benchmarks/score.py --gpu; the README's Score section): decord's PyPI wheel decodes on CPUs only.
    cpus = int(ray.cluster_resources().get("CPU", 1))
    blocks = max(1, min(len(items), max(2 * cpus, -(-len(items) // _VIDEOS_PER_DECODE_BATCH))))
    # Decoding tasks reserve the memory their output and the decoder need. The reservation also keeps Ray Data
    # from fusing decoding into the model actors, which it does for stages asking identical resources
    # (ray-project/ray#54433) and which would serialise decoding behind inference in each actor.
    view_bytes = params.temporal_views * params.spatial_views * params.frames * params.crop * params.crop * 3
    if params.windowed:
        # a video per task call, its windows streamed out a chunk at a time: a long video is many small blocks
        blocks = max(1, min(len(items), max(2 * cpus, len(items))))
        dataset = ray.data.from_items(items, override_num_blocks=blocks)
        # Ray Data buffers a task's output until a block reaches the target size (128 MiB by default): an hour of
        # windows would be decoded, and held, before its first row moved on. Blocks of two chunks (this dataset's
        # own context, not the process's) keep a walk's memory at the few windows its reservation says, and rows
        # flowing to the model while the walk goes on.
        dataset.context.target_max_block_size = max(1 << 20, 2 * WINDOWS_PER_CHUNK * view_bytes)
        decoded = dataset.map_batches(
            decode_window_batch,
            fn_kwargs={"storage": storage, "params": params, "limits": limits},
            batch_size=1,
            batch_format="numpy",
            num_cpus=1,
            memory=4 * WINDOWS_PER_CHUNK * view_bytes + _DECODER_MEMORY_BYTES,
        )
    else:
        decoded = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
            decode_batch,
            fn_kwargs={"storage": storage, "params": params, "limits": limits},
            batch_size=_VIDEOS_PER_DECODE_BATCH,
            batch_format="numpy",
            num_cpus=1,
            memory=2 * _VIDEOS_PER_DECODE_BATCH * view_bytes + _DECODER_MEMORY_BYTES,
        )
    smallest, largest = actor_pool_bounds(options.actors, options.use_gpu, ray.cluster_resources().get("GPU", 0))
    predictor = WindowPredictor if params.windowed else ViewPredictor
    extra = {"embeddings": params.embeddings} if params.windowed else {}
    return decoded.map_batches(
        predictor,
        fn_constructor_kwargs={
            **extra,
            "package": {"weights": weights, "config": config},
            "top_k": params.top_k,
            "full_probs": params.full_probs,
            "identity_columns": identity_columns(resolved.identity),
            "use_gpu": options.use_gpu,
            "precision": options.precision,
            "torch_threads": None if options.use_gpu else max(1, int(options.cpus_per_actor)),
        },
        # a window is one temporal view where a video is several: --batch-size videos' worth of windows
        batch_size=options.batch_size * (_WINDOWS_PER_VIDEO_OF_BATCH if params.windowed else 1),
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=smallest, max_size=largest),
        num_gpus=1 if options.use_gpu else 0,
        num_cpus=options.cpus_per_actor,
    )


def score_dataset(
    src: str | list[SourceVideo],
    model: str | ResolvedModel,
    views: str | tuple[int, int] = ScoreConfig.views,
    top_k: int = ScoreConfig.top_k,
    full_probs: bool = False,
    short_side: int | None = None,
    options: ScoreOptions | None = None,
    limits: DecodeLimits = DecodeLimits(),
    tracking_uri: str | None = None,
    endpoint_url: str | None = None,
    windows: str | None = None,
    embeddings: bool = False,
):
    """A `ray.data.Dataset` of one prediction row per video under `src` (a URI, or videos from
    `pipeline.list_videos`) for users composing their own pipelines; nothing is written and nothing is skipped.

    Rows have the columns of the predictions dataset; a video that could not be read or decoded has null
    predictions and its `error_stage`, `error_type`, `error_message` (null otherwise). The model is resolved now,
    once, so the rows say which version made them even if an alias moves while the dataset executes.
    With `windows` ("SECONDS[:STRIDE]", as `score --windows`), one row per window instead, in any order, with
    `window_index`, `window_start`, `window_end`, `windows_in_video` (and `embedding` with `embeddings`); a video
    that failed part-way has its error row beside the windows it gave before (`score` drops those).
    """
    init_ray()
    storage = Storage(endpoint_url)
    videos = list_videos(src, storage) if isinstance(src, str) else VideoListing.of(src)
    items = ray_items(videos, max(1, len(videos)))  # one group: nothing is written
    with tempfile.TemporaryDirectory() as directory:
        resolved = resolve_model(model, directory, tracking_uri) if isinstance(model, str) else model
        params = build_params(resolved.card, views, top_k, full_probs, short_side, windows, embeddings)
        dataset = _build(items, resolved, params, storage, options or ScoreOptions(), limits)  # reads the package now
    return dataset.drop_columns(["shard"])


# ---- the job -----------------------------------------------------------------------------------------------------
@dataclass
class Throughput:
    """Of this run's Ray phase: every video it decoded and scored (failures included)."""

    videos: int = 0
    seconds: float = 0.0
    startup_seconds: float = 0.0  # until the first predictions: actors started, model loaded, first views decoded
    first_prediction_seconds: float = 0.0  # from the job's start (resolving, listing, planning too) to its first row
    videos_per_s: float = 0.0  # over the whole phase
    steady_videos_per_s: float = 0.0  # after the first predictions: what a long run approaches

    def finish(self, seconds: float, first_rows: int) -> None:
        self.seconds = seconds
        self.videos_per_s = self.videos / seconds if self.videos and seconds > 0 else 0.0
        after = seconds - self.startup_seconds
        self.steady_videos_per_s = (self.videos - first_rows) / after if self.videos > first_rows and after > 0 else 0.0


def throughput_line(speed: Throughput) -> str:
    # a run whose predictions all came in its first batch has no rate after them
    steady = (f"{speed.steady_videos_per_s:.2f} after the first predictions, " if speed.steady_videos_per_s
              else "all in the first predictions, ")
    return f"  {speed.videos_per_s:.2f} videos/s ({steady}which took {speed.startup_seconds:.1f} s)"


@dataclass
class ScorePreview:
    """What a run would do (`dry_run`): the model resolved, the listing and the predictions read, nothing written."""

    source: str
    destination: str
    model: ModelIdentity
    views: str
    listed: int
    already_done: int
    known_failures: int  # failed before, unchanged: not scored again
    in_adopted_shards: int  # scored by a killed run, whose shards this run would take over
    to_score: int
    shards: int
    first_to_score: list[str]
    dry_run: bool = True


PREVIEW_NAMES = 5  # videos a preview names


def format_preview(preview: ScorePreview) -> str:
    lines = [f"score dry run  {preview.source} -> {preview.destination}  (nothing written)",
             f"  model {preview.model.describe()}  views {preview.views}"]
    lines += table_lines([
        ("listed", preview.listed),
        ("already scored", preview.already_done),
        ("known failures", preview.known_failures),
        ("in adopted shards", preview.in_adopted_shards),
        ("would score", preview.to_score),
        ("in shards", preview.shards),
    ])
    lines += first_of_lines(preview.first_to_score, preview.to_score)
    return "\n".join(lines)


@dataclass
class ScoreSummary(ScoreCounts):
    source: str
    destination: str
    model: ModelIdentity
    views: str
    manifest_version: int | None
    manifest_written: bool  # False when nothing changed and the previous version still holds
    seconds: float  # the whole job
    throughput: Throughput
    errors_uri: str | None = None
    errors: list[ErrorRecord] = field(default_factory=list)


def run_score(
    config: ScoreConfig,
    *,
    videos_per_shard: int = DEFAULT_VIDEOS_PER_SHARD,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
) -> ScoreSummary | ScorePreview:
    """Score every video under `config.src` not yet scored into `config.out` by the same model; see the module
    docstring. Videos that failed before are tried again only when they changed, or with `retry_errors`; predictions
    of videos gone from `src` leave the new version unless `keep_deleted`; a run with nothing new writes no version.
    With `dry_run`, returns what the run would do and writes nothing."""
    started = time.monotonic()
    views = parse_views(config.views)
    storage = Storage(config.endpoint_url)
    source, root = parse_uri(config.src), parse_uri(config.out)
    storage.check_access(source)
    storage.check_access(root, must_exist=False)
    with tempfile.TemporaryDirectory() as download_dir:
        # The registry's answer and the package's download (seconds: MLflow's import, the artifact store) and the
        # listing (seconds to minutes on a large bucket) wait on different services: each runs while the other does.
        listing = in_background(list_videos, source, storage)
        # before anything is written: a model that cannot be resolved leaves nothing behind in the destination
        resolved = resolve_model(config.model, download_dir, config.tracking_uri)
        params = build_params(resolved.card, views, config.top_k, config.full_probs, config.short_side,
                              config.windows, config.embeddings)
        if not dry_run:
            storage.check_conditional_writes(root)  # manifests are published if-absent
        echo(f"score with {resolved.identity.describe()}, views {params.views}, {params.frames} frames"
             + (f", {params.describe_unit()}" if params.windowed else ""))
        # the run record comes before any part is looked at: `uniformer gc` leaves the run's parts alone
        listed = listing.result()
        with contextlib.nullcontext() if dry_run else RunRecord(storage, root, "score") as run:
            previous = latest_score_manifest(root, storage)
            previous_failures = read_failures(root, previous.errors, storage) if previous else {}
            plan = plan_score(root, source, listed, resolved.identity, params, previous, storage, videos_per_shard,
                              previous_failures, config.retry_errors, config.keep_deleted)
            if plan.replaces_model:
                held = ModelIdentity(**previous.model).describe()
                echo(f"{root.uri} holds the predictions of {held} up to version {previous.version}; "
                     f"{resolved.identity.describe()} succeeds it: every listed video is scored again into the next "
                     f"version (version {previous.version} keeps the old predictions until gc)")
            if dry_run:
                return _preview(plan, echo)
            run.claim(plan.groups.names + [result["shard"]["path"] for result in plan.adopted])
            storage.remove_stale_staging(root.join(PREDICTIONS_DIR))
            echo(
                f"score {source.uri} -> {root.uri}: {len(listed)} videos listed, {len(plan.already_done)} already "
                f"scored, {len(plan.known_failures)} known failures, "
                f"{sum(len(r['videos']) + len(r['errors']) for r in plan.adopted)} in adopted shards, "
                f"{plan.num_pending} to score in {len(plan.groups)} shards"
            )
            throughput = Throughput()
            results = (_run_groups(plan, resolved, storage, config.options, config.limits, echo, throughput, started)
                       if plan.groups else [])

            manifest, counts, errors = commit_score(
                plan, results, resolved.card.class_names, time.monotonic() - started, asdict(throughput), storage
            )
            if manifest is not None:
                write_score_manifest(root, manifest, storage)
            else:
                echo(nothing_new_line(asdict(counts), "scored"))
    version = manifest.version if manifest else (previous.version if previous else None)
    summary = ScoreSummary(
        **asdict(counts),
        source=source.uri,
        destination=root.uri,
        model=resolved.identity,
        views=params.views,
        manifest_version=version,
        manifest_written=manifest is not None,
        seconds=time.monotonic() - started,
        throughput=throughput,
        errors_uri=root.join(manifest.errors).uri if manifest and manifest.errors else None,
        errors=errors,
    )
    echo(format_summary(summary))
    return summary


def in_background(function: Callable[..., T], *args) -> Future[T]:
    """`function(*args)` in a daemon thread: a caller that fails on something else meanwhile exits without waiting
    for it (an executor's threads are joined at exit, which would hold a failed job for the rest of a long listing)."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(function(*args))
        except BaseException as error:  # handed to whoever asks for the result
            future.set_exception(error)

    threading.Thread(target=run, name=f"background {function.__name__}", daemon=True).start()
    return future


def _preview(plan: ScorePlan, echo: Callable[[str], None]) -> ScorePreview:
    preview = ScorePreview(
        source=plan.source.uri, destination=plan.root.uri, model=plan.identity, views=plan.params.views,
        listed=len(plan.listed), already_done=len(plan.already_done), known_failures=len(plan.known_failures),
        in_adopted_shards=sum(len(r["videos"]) + len(r["errors"]) for r in plan.adopted), to_score=plan.num_pending,
        shards=len(plan.groups), first_to_score=[video.uri for video in plan.groups.videos[:PREVIEW_NAMES]],
    )
    echo(format_preview(preview))
    return preview


def _run_groups(
    plan: ScorePlan,
    resolved: ResolvedModel,
    storage: Storage,
    options: ScoreOptions,
    limits: DecodeLimits,
    echo: Callable[[str], None],
    throughput: Throughput,
    job_started: float,
) -> list[dict]:
    """Stream prediction rows out of Ray Data and publish each group's shard as soon as all its videos are in.

    A whole-video run gives a row per video; a windowed run a row per window, in any order, each with its video's
    `windows_in_video`. A video is in when all its rows are (a failed one: its error row, whose count includes the
    windows it yielded before failing, which are dropped), so a shard, the unit a killed run leaves behind, never
    holds part of a video. Only the videos still coming in are remembered, whatever the archive's size."""
    started = time.monotonic()
    init_ray()  # joins RAY_ADDRESS when set, else starts a local Ray
    dataset = _build(ray_items(plan.groups.videos, plan.groups.size), resolved, plan.params, storage, options, limits)
    windowed = plan.params.windowed
    waiting = {index: len(group["videos"]) for index, group in enumerate(plan.groups)}
    received: dict[str, int] = defaultdict(int)
    expected: dict[str, int] = {}  # an error row's count overrides the windows' own
    failed_ids: set[str] = set()
    buffered: dict[int, list[pa.Table]] = defaultdict(list)
    results, done, failed, windows, last_report, pace = [], 0, 0, 0, 0.0, Pace()
    total, done_by_first_batch = plan.num_pending, None
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        ids, shards, errors = (batch.column(name).to_pylist() for name in ("video_id", "shard", "error_type"))
        counts = batch.column("windows_in_video").to_pylist() if windowed else [1] * batch.num_rows
        finished: dict[int, int] = defaultdict(int)
        for video_id, shard, count, error in zip(ids, shards, counts, errors):
            received[video_id] += 1
            if error:
                expected[video_id] = count
                failed_ids.add(video_id)
            else:
                windows += 1
                if video_id not in failed_ids:
                    expected.setdefault(video_id, count)
            if received[video_id] == expected.get(video_id):
                del received[video_id], expected[video_id]
                finished[shard] += 1
                done += 1
                failed += video_id in failed_ids
        if done_by_first_batch is None:
            throughput.startup_seconds = time.monotonic() - started
            throughput.first_prediction_seconds = time.monotonic() - job_started
            done_by_first_batch = done
        for index in set(shards):
            buffered[index].append(batch.filter(pc.equal(batch.column("shard"), index)))
        for index, count in finished.items():
            waiting[index] -= count
            if waiting[index] == 0:
                rows = pa.concat_tables(buffered.pop(index))
                gone = failed_ids.intersection(rows.column("video_id").to_pylist())
                if gone:
                    failed_ids -= gone
                    rows = rows.filter(pc.or_(pc.invert(pc.is_in(rows.column("video_id"), pa.array(sorted(gone)))),
                                              rows.column("error_type").is_valid()))
                good, errors = _split_errors(rows)
                dim = good.schema.field("embedding").type.list_size if "embedding" in good.column_names else None
                results.append(publish_shard(storage, plan, plan.groups[index], good, errors,
                                             resolved.card.num_classes, dim))
        if time.monotonic() - last_report >= 2.0 or done == total:
            counted = f"windows {windows}  " if windowed else ""
            echo(f"  videos {done}/{total}  {counted}shards {len(results)}/{len(plan.groups)}  errors {failed}  "
                 f"{rate(windows if windowed else done, started, 'windows' if windowed else 'videos')}  "
                 f"{pace.eta(done, total)}")
            last_report = time.monotonic()
    if any(waiting.values()):
        raise RuntimeError(f"scoring lost rows of shards {[i for i, n in waiting.items() if n]}")  # a bug
    throughput.videos = done
    throughput.finish(time.monotonic() - started, done_by_first_batch or 0)
    return results


def _split_errors(rows: pa.Table) -> tuple[pa.Table, list[ErrorRecord]]:
    """Prediction rows, and error records for the rows of videos that could not be read or decoded."""
    failed = rows.filter(rows.column("error_type").is_valid())
    columns = ["source_uri", "source_etag", "error_stage", "error_type", "error_message"]
    errors = [ErrorRecord(*row.values()) for row in failed.select(columns).to_pylist()]
    return rows.filter(rows.column("error_type").is_null()), errors


def format_summary(summary: ScoreSummary, max_errors: int = 10) -> str:
    state = "written" if summary.manifest_written else "unchanged"
    version = f"v{summary.manifest_version:06d}" if summary.manifest_version else "none"
    rows = [
        ("listed", summary.listed),
        ("scored", summary.scored),
        ("already scored", summary.already_done),
        ("known failures", summary.known_failures),
        ("errored", summary.errored),
        ("shards written", summary.shards_written),
    ]
    if summary.shards_adopted:
        rows.append(("shards adopted", summary.shards_adopted))
    if summary.deleted:
        rows.append(("deleted from source", summary.deleted))
    lines = [
        f"score summary  {summary.destination}  manifest {version} ({state})  {summary.seconds:.1f} s",
        f"  model {summary.model.describe()}  views {summary.views}",
    ]
    lines += table_lines(rows)
    if summary.throughput.videos:
        lines.append(throughput_line(summary.throughput))
    lines += error_lines(summary.errors, summary.errors_uri, max_errors)
    return "\n".join(lines)

