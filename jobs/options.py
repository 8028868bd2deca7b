"""The options of every job but training (jobs.training.config), each declared once: a field of its job's config
class, with its default and help. Config files and `--print-config` read and write these classes (jobs.config), the
CLI makes its flags from them (jobs.flags), and each job function takes one (`run_ingest(IngestConfig(...))`).

This module imports no torch, Ray or MLflow, so that `uniformer --help` answers at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from jobs.config import option, section
from jobs.training.config import TrainConfig
from pipeline.decode import KEEPS, DecodeLimits, parse_aspect
from pipeline.storage import parse_uri, uri_prefixes
from pipeline.views import parse_views
from pipeline.windows import parse_windows

MODEL_REFERENCE = "models:/NAME@ALIAS, models:/NAME/VERSION, models:/m-ID, or a local package folder."
TRACKING_URI = "MLflow tracking URI; default: MLFLOW_TRACKING_URI."
ENDPOINT_URL = "S3-compatible endpoint (also AWS_ENDPOINT_URL)."
VIDEOS = "Videos: s3://bucket/prefix or a local folder."


@dataclass
class ClipSampling:
    """How clips are cut from each video. A field left out (null) is the one the dataset's manifest records, or
    pipeline.manifest.SamplingParams' default for a new dataset; how they fit together is checked once the recorded
    sampling is known."""

    frames: int | None = option(None, help="Frames per clip.")
    size: int | None = option(None, help="Model input (crop) size recorded in the manifest; <= --short-side.")
    short_side: int | None = option(None, help="Stored frame height: short side resized to it, then centre-cropped to "
                                    "a square (or to --max-aspect with --keep aspect).")
    clips_per_video: int | None = option(None, help="Clips per video, at spread temporal offsets.")
    sampling: str | None = option(None, help="uniform (TSN segments) | dense (frames --stride apart).")
    stride: int | None = option(None, help="Frame stride for dense sampling.")
    frames_per_segment: int | None = option(
        None, help="Candidate frames stored per segment (uniform): training picks one per segment each epoch "
        "(temporal jitter); storage grows by this factor."
    )
    keep: str | None = option(
        None, printed_when_set=True, help="square: the centre square of the short side | aspect: the frame at its "
        "aspect ratio up to --max-aspect (centre-cropped beyond it; 4:3 and portrait frames padded), so training's "
        "crops reach the sides of a wide frame; storage grows by the width (16:9: x1.78)."
    )
    max_aspect: str | None = option(
        None, printed_when_set=True, help="With --keep aspect: the widest stored aspect ratio WIDTH:HEIGHT (default "
        "16:9); the stored width is --short-side times it, made even."
    )

    def __post_init__(self) -> None:
        for name, value in self.given().items():
            if name not in ("sampling", "keep", "max_aspect") and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.sampling not in (None, "uniform", "dense"):
            raise ValueError(f"sampling must be 'uniform' or 'dense', not {self.sampling!r}")
        if self.keep not in (None, *KEEPS):
            raise ValueError(f"keep must be one of {', '.join(KEEPS)}, not {self.keep!r}")
        if self.max_aspect is not None:
            parse_aspect(self.max_aspect)

    def given(self) -> dict:
        """The fields that were set, to lay over the recorded sampling."""
        given = {name: value for name, value in vars(self).items() if value is not None}
        if self.keep == "square":  # square clips have no aspect ratio: a recorded one does not carry over to them
            given["max_aspect"] = None
        return given


@dataclass
class IngestConfig:
    """The options of `uniformer ingest` (and of retrain's `ingest:` section, whose src and out are retrain's)."""

    src: str = option(help=VIDEOS, argument=True, local_path=True)
    out: str = option(help="Clip dataset: s3://bucket/prefix or a local folder.", local_path=True)
    labels: str | None = option(
        None, local_path=True,
        help="CSV 'path,label' with paths relative to SRC, or 'path,start,end,label': labelled segments (seconds) of "
        "untrimmed videos, each segment's clips cut inside it.",
    )
    labels_from_dirs: bool = option(False, help="Label = parent folder (Kinetics layout).")
    classes: str | None = option(
        None, local_path=True, help="Class names, one per line, in class id order (e.g. Kinetics-400's label map): "
        "ids match a checkpoint's head however few classes the videos show; other labels become error rows."
    )
    clip: ClipSampling = section(ClipSampling, inline=True)
    endpoint_url: str | None = option(None, help=ENDPOINT_URL)
    limits: DecodeLimits = section(DecodeLimits, inline=True)
    retry_errors: bool = option(False, help="Decode again the videos that failed before, though they did not change.")
    keep_deleted: bool = option(False, help="Keep the clips of videos gone from SRC (default: they leave the new "
                                "version).")

    def __post_init__(self) -> None:
        if self.labels and self.labels_from_dirs:
            raise ValueError("labels and labels_from_dirs: use either a labels CSV or labels from folders, not both")
        if self.classes and not (self.labels or self.labels_from_dirs):
            raise ValueError("a class list orders the labels' ids: give it with a labels CSV or labels from folders")


@dataclass
class ScoreOptions:
    """How the model runs; none of these changes a prediction beyond bf16/fp16 rounding."""

    batch_size: int = option(4, help="Videos per model call (each brings TEMPORALxSPATIAL clips).")
    use_gpu: bool = option(False, flag="--gpu", help="One GPU per model actor.")
    actors: int | None = option(
        None, help="Most model actors (the pool starts with one); default: the cluster's GPUs now with --gpu, else 1."
    )
    cpus_per_actor: float = option(1.0, help="CPUs per model actor (its torch threads on CPU).")
    precision: str = option("auto", help="auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16 (autocast).")

    def __post_init__(self) -> None:
        from model.inference import PRECISIONS  # here, not at import: the CLI's --help does not load torch

        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.actors is not None and self.actors < 1:
            raise ValueError("actors must be >= 1")


@dataclass
class ScoreConfig:
    """The options of `uniformer score`."""

    src: str = option(help=VIDEOS, argument=True, local_path=True)
    out: str = option(help="Predictions: s3://bucket/prefix or a local folder (one model each).", local_path=True)
    model: str = option(help=MODEL_REFERENCE, local_path=True)
    # evaluation and the retrain gate judge at the same views by default
    views: str = option("4x3", help="Test views TEMPORALxSPATIAL: clips at spread offsets x crops.")
    top_k: int = option(5, help="Classes kept per video, best first.")
    full_probs: bool = option(False, help="Also store every class's probability.")
    short_side: int | None = option(None, help="Scale short sides to this before cropping; default: the crop size.")
    windows: str | None = option(
        None, help="Score each video as a timeline: windows of SECONDS, STRIDE seconds apart (default: SECONDS), "
        "e.g. 2 or 2:1; one row per window, one temporal view each (--views' spatial crops); --max-seconds bounds "
        "a window, not the video."
    )
    embeddings: bool = option(
        False, help="With --windows: store each window's pre-classifier feature (float16) for similarity search."
    )
    options: ScoreOptions = section(ScoreOptions, inline=True)
    tracking_uri: str | None = option(None, local_path=True, help=TRACKING_URI)
    endpoint_url: str | None = option(None, help=ENDPOINT_URL)
    limits: DecodeLimits = section(DecodeLimits, inline=True)
    retry_errors: bool = option(False, help="Score again the videos that failed before, changed or not.")
    keep_deleted: bool = option(
        False, help="Keep the predictions of videos gone from SRC (default: they leave the new version)."
    )

    def __post_init__(self) -> None:
        parse_views(self.views)
        if self.windows is not None:
            parse_windows(self.windows)
        elif self.embeddings:
            raise ValueError("embeddings are stored per window: give --windows with --embeddings")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")


@dataclass
class ServeOptions:
    """How the served model runs: batching, replicas and their resources; none of these changes an answer."""

    max_batch_size: int = option(4, help="Most videos per model call: a replica gathers them from concurrent requests.")
    batch_wait_s: float = option(0.05, help="Longest a video waits for others to fill its batch, in seconds.")
    min_replicas: int = option(1, help="Fewest replicas the autoscaler keeps (0: none while idle).")
    max_replicas: int = option(1, help="Most replicas the autoscaler starts.")
    target_ongoing_requests: float = option(2.0, help="Requests per replica the autoscaler aims at.")
    cpus_per_replica: float = option(1.0, help="CPUs per replica (its torch threads on CPU).")
    gpus_per_replica: float | None = option(
        None, help="GPUs per replica; default: 1 when the Ray cluster has GPUs, else 0 (the replicas run on CPU)."
    )

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.batch_wait_s < 0:
            raise ValueError(f"batch_wait_s must be >= 0, got {self.batch_wait_s}")
        if self.min_replicas < 0 or self.max_replicas < max(1, self.min_replicas):
            raise ValueError(f"replicas: need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got "
                             f"{self.min_replicas} and {self.max_replicas}")
        if self.target_ongoing_requests <= 0 or self.cpus_per_replica < 0:
            raise ValueError("target_ongoing_requests must be > 0 and cpus_per_replica >= 0")
        if self.gpus_per_replica is not None and self.gpus_per_replica < 0:
            raise ValueError(f"gpus_per_replica must be >= 0, got {self.gpus_per_replica}")


@dataclass
class ServeConfig:
    """The options of `uniformer serve`."""

    model: str = option(help=MODEL_REFERENCE + " An alias is followed: when it moves, the replicas load the version "
                        "it points to and answer with it.", local_path=True)
    host: str = option("127.0.0.1", help="Address the HTTP proxy listens on; 0.0.0.0 to be reached from other hosts.")
    port: int = option(8000, help="HTTP port.")
    poll_s: float = option(30.0, help="Seconds between looks at the alias in the registry.")
    views: str = option(ScoreConfig.views, help="Test views TEMPORALxSPATIAL unless a request names others.")
    top_k: int = option(5, help="Classes per video unless a request asks for another count.")
    allow_uris: str | None = option(
        None, help="Comma-separated prefixes (s3://bucket/prefix/, /data/videos) under which a request may name a "
        "video by URI; a replica reads it with its own file and S3 access. Default: none, requests send video bytes.",
    )
    options: ServeOptions = section(ServeOptions, inline=True)
    tracking_uri: str | None = option(None, local_path=True, help=TRACKING_URI)
    endpoint_url: str | None = option(None, help=ENDPOINT_URL)

    def __post_init__(self) -> None:
        parse_views(self.views)
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.poll_s <= 0:
            raise ValueError(f"poll_s must be > 0, got {self.poll_s}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1..65535, got {self.port}")
        # a relative prefix means the folder where the command runs, not a replica's working directory
        self.allow_uris = ",".join(parse_uri(prefix).uri for prefix in self.uri_prefixes) or None

    @property
    def uri_prefixes(self) -> tuple[str, ...]:
        return uri_prefixes(self.allow_uris)


EVALUATE_EXPERIMENT = "uniformerv2-evaluations"


@dataclass
class EvaluateConfig:
    """The options of `uniformer evaluate`: the model runs as scoring runs it, with scoring's defaults."""

    data: str = option(help="Labelled clip dataset: DST or DST@VERSION (its source videos).", local_path=True)
    model: str = option(help=MODEL_REFERENCE, local_path=True)
    views: str = option(ScoreConfig.views, help="Test views TEMPORALxSPATIAL, as scoring takes them.")
    options: ScoreOptions = section(ScoreOptions, inline=True)
    experiment: str = option(EVALUATE_EXPERIMENT, help="MLflow experiment of the evaluation run.")
    tracking_uri: str | None = option(None, local_path=True, help=TRACKING_URI)
    endpoint_url: str | None = option(None, help=ENDPOINT_URL)

    def __post_init__(self) -> None:
        parse_views(self.views)


@dataclass
class RegisterConfig:
    """The options of `uniformer register`."""

    run: str = option(help="Ray Train run name (printed by `uniformer train`).")
    storage: str = option("./runs", local_path=True, help="The checkpoint storage the run used.")
    register_as: str | None = option(None, help="Model name; default: the run's --register-as.")
    tracking_uri: str | None = option(
        None, local_path=True, help="MLflow tracking URI; default: MLFLOW_TRACKING_URI or the run's."
    )
    endpoint_url: str | None = option(None, help="S3-compatible endpoint for s3:// storage.")


GATE_METRICS = ("accuracy", "top5_accuracy", "mean_class_accuracy")
RETRAIN_EXPERIMENT = "uniformerv2-retrain"  # the MLflow experiment of candidates, unless train.experiment says another



@dataclass
class RetrainConfig:
    """The options of `uniformer retrain`: its own, every training option in `train` and every ingest option in
    `ingest`, less what retrain sets itself (the dataset, the validation set, the registered name, the endpoint); the
    most used of theirs have flags too."""

    source: str = option(help="Raw videos (s3://... or a folder); what is new is ingested.", local_path=True)
    dataset: str = option(help="The clip dataset to grow (DST).", local_path=True)
    model_name: str = option(help="Registered model name; its `champion` alias is gated.")
    val: str = option(help="Fixed validation dataset DST[@VERSION] for candidate and champion.", local_path=True)
    min_gain: float = option(0.0, help="What the candidate must gain over the champion to be promoted.")
    gate_metric: str = option("accuracy", help="Gate figure: accuracy (top-1) | top5_accuracy | mean_class_accuracy.")
    gate_views: str = option(ScoreConfig.views, help="Views the gate evaluates at: the ones scoring uses.")
    init: str = option("champion", help="Candidate starts from the champion's weights or from --pretrained.")
    endpoint_url: str | None = option(None, help=ENDPOINT_URL)
    train: TrainConfig = section(
        TrainConfig,
        supplied={"data": "dataset", "val_data": "val", "register_as": "model_name", "endpoint_url": "endpoint_url"},
        defaults={"experiment": RETRAIN_EXPERIMENT},
        flags=("model", "model_overrides", "pretrained", "workers", "use_gpu", "epochs", "batch_size", "lr", "hflip",
               "storage", "experiment"),
    )
    ingest: IngestConfig = section(
        IngestConfig,
        supplied={"src": "source", "out": "dataset", "endpoint_url": "endpoint_url"},
        flags=("labels", "labels_from_dirs", "frames", "size", "short_side", "retry_errors"),
    )

    def __post_init__(self) -> None:
        if self.gate_metric not in GATE_METRICS:
            raise ValueError(f"gate_metric must be one of {', '.join(GATE_METRICS)}, not {self.gate_metric!r}")
        if self.init not in ("champion", "pretrained"):
            raise ValueError(f"init must be 'champion' or 'pretrained', not {self.init!r}")
        parse_views(self.gate_views)


@dataclass
class DemoSize:
    """How much work the demo does; `small` keeps CI fast, `default` shows learning on a laptop."""

    train_per_class: int
    new_per_class: int
    val_per_class: int
    archive_videos: int
    epochs: int

    @classmethod
    def named(cls, name: str) -> DemoSize:
        sizes = {
            "default": cls(train_per_class=150, new_per_class=50, val_per_class=30, archive_videos=40, epochs=8),
            "small": cls(train_per_class=24, new_per_class=8, val_per_class=8, archive_videos=8, epochs=1),
        }
        if name not in sizes:
            raise ValueError(f"unknown demo size {name!r}; choose from {sorted(sizes)}")
        return sizes[name]


@dataclass
class DemoConfig:
    """The options of `uniformer demo`."""

    workdir: str = option("demo-output", local_path=True, help="Where videos, clips, runs, scores and mlflow.db go.")
    size: str = option("default", help="default (shows learning) or small (a quick smoke run).")
    workers: int = option(2, help="Ray Train workers.")

    def __post_init__(self) -> None:
        DemoSize.named(self.size)  # refuses an unknown size by name
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
