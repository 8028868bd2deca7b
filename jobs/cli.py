"""The `uniformer` command line: parses options and calls the job modules, nothing more."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys

import typer

if not os.environ.get("RAY_ADDRESS"):
    # A Ray started here for a local run listens on loopback only (on Linux Ray would otherwise bind the machine's
    # address). Ray reads this at import, so it is set before any job imports Ray.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# The jobs' config classes hold the options' defaults, which the flags show in --help.
from jobs.demo import DemoConfig  # noqa: E402
from jobs.evaluate import EvaluateConfig  # noqa: E402
from jobs.credentials import redact  # noqa: E402
from jobs.exitcodes import ExitCode, OptionError  # noqa: E402
from jobs.ingest import IngestConfig  # noqa: E402
from jobs.retrain import RETRAIN_EXPERIMENT, RetrainConfig  # noqa: E402
from jobs.score import ScoreConfig  # noqa: E402
from jobs.train import RegisterConfig  # noqa: E402
from jobs.training.config import TrainConfig  # noqa: E402

app = typer.Typer(
    help="Distributed video training pipeline for UniFormerV2: ingest videos, train, score archives, retrain.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"uniformer {version('uniformer-pipeline')}")
        raise typer.Exit()


@app.callback()
def main_options(
    show_version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
    verbose: int = typer.Option(
        0, "--verbose", "-v", count=True,
        help="Also show Ray's and MLflow's own lines (Ray Train's controller, workers' output, Ray Data's execution "
        "lines and progress bars); -vv adds debug lines.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings, errors and the final summary."),
    scheduled: bool = typer.Option(
        False, "--scheduled",
        help="Exit 0 on the outcomes a schedule expects: 3 (nothing new), 4 (candidate rejected), 5 (finished with "
        "per-video errors), which are still printed; for schedulers that tell only success from failure (KubeRay "
        "RayJobs, CronJobs). Any other failure keeps its code.",
    ),
) -> None:
    """Each sub-command is one job; `uniformer COMMAND --help` explains its options. Options of `uniformer` itself
    (-v, -q, --scheduled) go before COMMAND."""
    from jobs.console import QUIET, configure_logging

    if verbose and quiet:
        raise typer.BadParameter("-v and -q contradict each other", param_hint="-v/-q")
    configure_logging(QUIET if quiet else verbose)
    _invocation["scheduled"] = scheduled


# Set by the main callback for the command being run: how its outcome becomes the exit code.
_invocation = {"scheduled": False}
SCHEDULED_OUTCOMES = (ExitCode.NOTHING_NEW, ExitCode.REJECTED, ExitCode.PARTIAL)


def _exit(code: int) -> None:
    """Exit with `code`; under --scheduled an outcome a schedule expects exits 0."""
    if _invocation["scheduled"] and code in SCHEDULED_OUTCOMES:
        typer.echo(f"exit code {code} ({ExitCode(code).name.lower()}) reported as 0: --scheduled", err=True)
        code = ExitCode.SUCCESS
    raise typer.Exit(code=int(code))


@app.command("models")
def models_command() -> None:
    """List the named model configurations with their parameter counts."""
    import model

    rows = [(name, model.count_parameters(name)) for name in model.list_models()]
    width = max(len(name) for name, _ in rows)
    typer.echo(f"{'name':<{width}}  {'params (400 classes)':>22}")
    for name, params in rows:
        typer.echo(f"{name:<{width}}  {params / 1e6:>20.1f} M")


weights_app = typer.Typer(
    help="Checkpoint files as users have them: OpenAI CLIP (TorchScript archives too), open_clip, Hugging Face, "
    "timm, official UniFormerV2, MMAction2.",
    no_args_is_help=True,
)
app.add_typer(weights_app, name="weights")


@weights_app.command("inspect")
def weights_inspect_command(
    path: str = typer.Argument(..., help="Checkpoint file (.pt, .pth, .pyth, .bin, .safetensors)."),
    model_name: str = typer.Option("uniformerv2_b16", "--model", help="Named configuration it would load into."),
    overrides: list[str] = typer.Option([], "--set", help="Model option override KEY=VALUE, as for `train`."),
    classes: int = typer.Option(400, min=1,
                                help="Classes of that model: a classifier head of another count is skipped."),
) -> None:
    """Print the file's layout, the architecture its tensors imply, and what loading it into --model would load,
    inflate, interpolate, keep or ignore. Nothing in the file is run."""
    import torch

    import model

    options = _parse_overrides(overrides)
    try:  # the model's name and options before the file is read
        model.get_config(model_name, **options)
    except KeyError as error:
        raise typer.BadParameter(error.args[0], param_hint="--model") from None
    except (TypeError, ValueError) as error:
        raise typer.BadParameter(str(error), param_hint="--set") from None
    try:
        checkpoint = model.read_checkpoint(path)
    except (OSError, ValueError) as error:
        typer.echo(f"cannot read {path}: {error}", err=True)
        raise typer.Exit(code=ExitCode.FAILURE) from None
    typer.echo(f"layout        {checkpoint.layout}: {model.LAYOUTS[checkpoint.layout]}")
    typer.echo("architecture  " + ", ".join(f"{key}={value}" for key, value in checkpoint.architecture().items()))
    with torch.device("meta"):  # the check reads shapes only: no memory for a B/16 or L/14
        net = model.create_model(model_name, classes, **options)
    try:
        report = model.check_pretrained(net, checkpoint)
    except ValueError as error:
        typer.echo(f"does not load into {model_name}: {error}", err=True)
        raise typer.Exit(code=ExitCode.FAILURE) from None
    typer.echo(f"into {model_name} ({classes} classes):")
    typer.echo(report.summary())


@weights_app.command("convert")
def weights_convert_command(
    src: str = typer.Argument(..., help="Checkpoint file in any layout `weights inspect` reads."),
    out: str = typer.Argument(..., help="The .safetensors file to write."),
) -> None:
    """Write SRC's usable tensors as safetensors: an image checkpoint as a bare CLIP visual tower, a video checkpoint
    under UniFormerV2's own names; dtypes as stored. `--pretrained OUT` then loads it like SRC."""
    import model

    if not out.endswith(".safetensors"):  # the loader picks the reader by this suffix
        raise typer.BadParameter("must end with .safetensors", param_hint="OUT")
    try:
        checkpoint = model.convert_checkpoint(src, out)
    except (OSError, ValueError) as error:
        typer.echo(f"cannot convert {src}: {error}", err=True)
        raise typer.Exit(code=ExitCode.FAILURE) from None
    typer.echo(f"wrote {len(checkpoint.state)} tensors of a {checkpoint.layout} checkpoint to {out} "
               f"({len(checkpoint.ignored)} of the file ignored; `uniformer weights inspect` lists them)")


# Shared by ingest and score: what one video may cost before it is refused as an error row.
_MAX_FRAME_SIDE = "Refuse videos with a longer frame side (pixels)."
_MAX_FRAMES = "Refuse videos that declare more frames."
_MAX_SECONDS = "Refuse videos that declare a longer duration (seconds)."
_DECODE_TIMEOUT = "Seconds one video's decoding may take before it is stopped."


# ---- job options: config files, --print-config, --json, exit codes ------------------------------------------------
_CONFIG_FILE = typer.Option(
    None, "--config", help="YAML file of this job's options (`--print-config` writes one); the flags given override it."
)
_PRINT_CONFIG = typer.Option(False, "--print-config", help="Print the resolved configuration as YAML and exit.")
_JSON = typer.Option(False, "--json", help="Print one JSON summary on stdout; the text goes to stderr.")
_DRY_RUN = typer.Option(False, "--dry-run", help="Print what the job would do, and write nothing.")
# the parameters above: how the job is invoked, not its configuration
_INVOCATION = {"config_file", "print_config", "json_output", "dry_run"}
# errors in the JSON summary: the whole table is at its errors_uri
_JSON_ERRORS = 100


def _option(config_class: type, field: str, *names: str, help: str):
    """A flag of a config class field: no default of its own (the class has it, and --help shows it), so that only a
    flag given on the command line overrides the config file."""
    default = {item.name: item for item in dataclasses.fields(config_class)}[field].default
    shown = default not in (None, dataclasses.MISSING)
    return typer.Option(None, *names, help=help, show_default=str(default) if shown else False)


def _given(ctx: typer.Context, renamed: dict[str, str] | None = None) -> dict:
    """The options given on the command line, under their config field names (`renamed`: parameter -> field)."""
    renamed = renamed or {}
    return {  # by the source's name: typer vendors its own click, whose ParameterSource is not click's
        renamed.get(name, name): value
        for name, value in ctx.params.items()
        if name not in _INVOCATION and ctx.get_parameter_source(name).name in ("COMMANDLINE", "ENVIRONMENT")
    }


def _resolve(ctx: typer.Context, config_class: type, config_file: str | None, given: dict, print_config: bool):
    """The job's configuration: the class's defaults, the file over them, the given flags over both."""
    from jobs.config import ConfigError, absolute_paths, build, merge, read_file, to_yaml

    try:
        config = build(config_class, merge(read_file(config_file) if config_file else {}, given))
    except ConfigError as error:
        ctx.fail(str(error))  # a usage error: exit code 2
    if print_config:  # as given: a printed configuration stays portable
        typer.echo(to_yaml(config), nl=False)
        raise typer.Exit()
    return absolute_paths(config)


@contextlib.contextmanager
def _job(name: str, json_output: bool, *handled: type[Exception]):
    """Runs a job's body with the `echo` it prints its text with: stdout, or with --json stderr, where whatever its
    libraries print goes too, so that stdout carries the JSON summary alone. A `handled` error ends the command with
    its message and exit code 1 (a JSON summary saying so with --json)."""
    from jobs.serving.registry import TrackingUnreachable

    try:
        with contextlib.redirect_stdout(sys.stderr) if json_output else contextlib.nullcontext():
            yield lambda line: typer.echo(line, err=json_output)
    # whatever raised them, the messages pass one redaction: an address's password never reaches the console
    except TrackingUnreachable as error:  # any job that talks to MLflow
        typer.echo(f"{name} failed: {redact(str(error))}", err=True)
        _finish(json_output, {"error": redact(str(error))}, ExitCode.FAILURE)
    except OptionError as error:  # before handled: an OptionError is a ValueError too
        typer.echo(f"{name}: {redact(str(error))}", err=True)
        _finish(json_output, {"error": redact(str(error)), "option": error.option}, ExitCode.USAGE)
    except handled as error:
        typer.echo(f"{name} failed: {redact(str(error))}", err=True)
        _finish(json_output, {"error": redact(str(error))}, ExitCode.FAILURE)


def _finish(json_output: bool, summary: dict, code: ExitCode = ExitCode.SUCCESS) -> None:
    """Exit with `code`; with --json, print the summary first, with its outcome."""
    if json_output:
        typer.echo(json.dumps({"outcome": code.name.lower(), "exit_code": int(code), **summary}, indent=1, default=str))
    _exit(code)


def _dataset_outcome(written: bool, errored: int) -> ExitCode:
    """Of ingest and score: per-video errors over nothing new over success."""
    if errored:
        return ExitCode.PARTIAL
    return ExitCode.SUCCESS if written else ExitCode.NOTHING_NEW


def _summary_dict(summary) -> dict:
    values = dataclasses.asdict(summary)
    if "errors" in values:
        values["errors"] = values["errors"][:_JSON_ERRORS]
    return values


@app.command("ingest")
def ingest_command(
    ctx: typer.Context,
    src: str = typer.Argument(None, help="Videos: s3://bucket/prefix or a local folder.", show_default=False),
    out: str = _option(IngestConfig, "out", "--out", help="Clip dataset: s3://bucket/prefix or a local folder."),
    labels: str = _option(IngestConfig, "labels", "--labels", help="CSV 'path,label' with paths relative to SRC."),
    labels_from_dirs: bool = _option(
        IngestConfig, "labels_from_dirs", "--labels-from-dirs", help="Label = parent folder (Kinetics layout)."
    ),
    classes: str = _option(
        IngestConfig, "classes", "--classes", help="Class names, one per line, in class id order (e.g. Kinetics-400's "
        "label map): ids match a checkpoint's head however few classes the videos show; other labels become error rows."
    ),
    frames: int = _option(IngestConfig, "frames", "--frames", help="Frames per clip."),
    size: int = _option(IngestConfig, "size", "--size", help="Model input (crop) size recorded in the manifest; "
                        "<= --short-side."),
    short_side: int = _option(IngestConfig, "short_side", "--short-side",
                              help="Stored square side: short side resized to it, then centre-cropped."),
    clips_per_video: int = _option(IngestConfig, "clips_per_video", "--clips-per-video",
                                   help="Clips per video, at spread temporal offsets."),
    sampling: str = _option(IngestConfig, "sampling", "--sampling",
                            help="uniform (TSN segments) | dense (frames --stride apart)."),
    stride: int = _option(IngestConfig, "stride", "--stride", help="Frame stride for dense sampling."),
    frames_per_segment: int = _option(
        IngestConfig, "frames_per_segment", "--frames-per-segment", help="Candidate frames stored per segment "
        "(uniform): training picks one per segment each epoch (temporal jitter); storage grows by this factor."
    ),
    retry_errors: bool = _option(IngestConfig, "retry_errors", "--retry-errors",
                                 help="Decode again the videos that failed before, though they did not change."),
    keep_deleted: bool = _option(IngestConfig, "keep_deleted", "--keep-deleted",
                                 help="Keep the clips of videos gone from SRC (default: they leave the new version)."),
    endpoint_url: str = _option(IngestConfig, "endpoint_url", "--endpoint-url",
                                help="S3-compatible endpoint (also AWS_ENDPOINT_URL)."),
    max_frame_side: int = _option(IngestConfig, "max_frame_side", "--max-frame-side", help=_MAX_FRAME_SIDE),
    max_frames: int = _option(IngestConfig, "max_frames", "--max-frames", help=_MAX_FRAMES),
    max_seconds: float = _option(IngestConfig, "max_seconds", "--max-seconds", help=_MAX_SECONDS),
    decode_timeout: float = _option(IngestConfig, "decode_timeout", "--decode-timeout", help=_DECODE_TIMEOUT),
    config_file: str = _CONFIG_FILE,
    print_config: bool = _PRINT_CONFIG,
    json_output: bool = _JSON,
    dry_run: bool = _DRY_RUN,
) -> None:
    """Decode sampled clips of every new video under SRC into a sharded Parquet clip dataset with a manifest."""
    from jobs.ingest import run_ingest
    from pipeline import LabelsError, ManifestError, StorageError

    config = _resolve(ctx, IngestConfig, config_file, _given(ctx), print_config)
    with _job("ingest", json_output, StorageError, LabelsError, ManifestError, ValueError) as echo:
        summary = run_ingest(config.src, config.out, endpoint_url=config.endpoint_url, dry_run=dry_run, echo=echo,
                             **config.run_options())
    if dry_run:
        _finish(json_output, _summary_dict(summary))
    _finish(json_output, _summary_dict(summary), _dataset_outcome(summary.manifest_written, summary.errored))


@app.command("score")
def score_command(
    ctx: typer.Context,
    src: str = typer.Argument(None, help="Videos: s3://bucket/prefix or a local folder.", show_default=False),
    model_ref: str = _option(ScoreConfig, "model", "--model", help="models:/NAME@ALIAS, models:/NAME/VERSION, "
                             "models:/m-ID, or a local package folder."),
    out: str = _option(ScoreConfig, "out", "--out",
                       help="Predictions: s3://bucket/prefix or a local folder (one model each)."),
    views: str = _option(ScoreConfig, "views", "--views",
                         help="Test views TEMPORALxSPATIAL: clips at spread offsets x crops."),
    top_k: int = _option(ScoreConfig, "top_k", "--top-k", help="Classes kept per video, best first."),
    full_probs: bool = _option(ScoreConfig, "full_probs", "--full-probs", help="Also store every class's probability."),
    short_side: int = _option(ScoreConfig, "short_side", "--short-side",
                              help="Scale short sides to this before cropping; default: the crop size."),
    batch_size: int = _option(ScoreConfig, "batch_size", "--batch-size",
                              help="Videos per model call (each brings TEMPORALxSPATIAL clips)."),
    gpu: bool = _option(ScoreConfig, "use_gpu", "--gpu", help="One GPU per model actor."),
    actors: int = _option(ScoreConfig, "actors", "--actors", help="Most model actors (the pool starts with one); "
                          "default: the cluster's GPUs now with --gpu, else 1."),
    cpus_per_actor: float = _option(ScoreConfig, "cpus_per_actor", "--cpus-per-actor",
                                    help="CPUs per model actor (its torch threads on CPU)."),
    precision: str = _option(ScoreConfig, "precision", "--precision",
                             help="auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16 (autocast)."),
    tracking_uri: str = _option(ScoreConfig, "tracking_uri", "--tracking-uri",
                                help="MLflow tracking URI; default: MLFLOW_TRACKING_URI."),
    endpoint_url: str = _option(ScoreConfig, "endpoint_url", "--endpoint-url",
                                help="S3-compatible endpoint (also AWS_ENDPOINT_URL)."),
    max_frame_side: int = _option(ScoreConfig, "max_frame_side", "--max-frame-side", help=_MAX_FRAME_SIDE),
    max_frames: int = _option(ScoreConfig, "max_frames", "--max-frames", help=_MAX_FRAMES),
    max_seconds: float = _option(ScoreConfig, "max_seconds", "--max-seconds", help=_MAX_SECONDS),
    decode_timeout: float = _option(ScoreConfig, "decode_timeout", "--decode-timeout", help=_DECODE_TIMEOUT),
    retry_errors: bool = _option(ScoreConfig, "retry_errors", "--retry-errors",
                                 help="Score again the videos that failed before, changed or not."),
    keep_deleted: bool = _option(ScoreConfig, "keep_deleted", "--keep-deleted",
                                 help="Keep the predictions of videos gone from SRC (default: they leave the new "
                                 "version)."),
    config_file: str = _CONFIG_FILE,
    print_config: bool = _PRINT_CONFIG,
    json_output: bool = _JSON,
    dry_run: bool = _DRY_RUN,
) -> None:
    """Score every video under SRC not yet scored into --out by the same model: multi-view predictions as Parquet."""
    from jobs.score import run_score
    from jobs.scoring.model_ref import ModelReferenceError
    from pipeline import StorageError

    given = _given(ctx, {"model_ref": "model", "gpu": "use_gpu"})
    config = _resolve(ctx, ScoreConfig, config_file, given, print_config)
    with _job("score", json_output, StorageError, ModelReferenceError, ValueError) as echo:
        summary = run_score(
            config.src, config.out, config.model, views=config.views, top_k=config.top_k,
            full_probs=config.full_probs, short_side=config.short_side, options=config.options(),
            tracking_uri=config.tracking_uri, endpoint_url=config.endpoint_url, retry_errors=config.retry_errors,
            keep_deleted=config.keep_deleted, dry_run=dry_run, echo=echo,
        )
    if dry_run:
        _finish(json_output, _summary_dict(summary))
    _finish(json_output, _summary_dict(summary), _dataset_outcome(summary.manifest_written, summary.errored))


@app.command("evaluate")
def evaluate_command(
    ctx: typer.Context,
    data: str = _option(EvaluateConfig, "data", "--data",
                        help="Labelled clip dataset: DST or DST@VERSION (its source videos)."),
    model_ref: str = _option(EvaluateConfig, "model", "--model", help="models:/NAME@ALIAS, models:/NAME/VERSION, "
                             "models:/m-ID, or a local package folder."),
    views: str = _option(EvaluateConfig, "views", "--views", help="Test views TEMPORALxSPATIAL, as scoring takes them."),
    batch_size: int = _option(EvaluateConfig, "batch_size", "--batch-size", help="Videos per model call."),
    gpu: bool = _option(EvaluateConfig, "use_gpu", "--gpu", help="One GPU per model actor."),
    actors: int = _option(EvaluateConfig, "actors", "--actors",
                          help="Most model actors; default: the cluster's GPUs with --gpu, else 1."),
    cpus_per_actor: float = _option(EvaluateConfig, "cpus_per_actor", "--cpus-per-actor",
                                    help="CPUs per model actor (its torch threads on CPU)."),
    precision: str = _option(EvaluateConfig, "precision", "--precision",
                             help="auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16 (autocast)."),
    experiment: str = _option(EvaluateConfig, "experiment", "--experiment",
                              help="MLflow experiment of the evaluation run."),
    tracking_uri: str = _option(EvaluateConfig, "tracking_uri", "--tracking-uri",
                                help="MLflow tracking URI; default: MLFLOW_TRACKING_URI."),
    endpoint_url: str = _option(EvaluateConfig, "endpoint_url", "--endpoint-url",
                                help="S3-compatible endpoint (also AWS_ENDPOINT_URL)."),
    config_file: str = _CONFIG_FILE,
    print_config: bool = _PRINT_CONFIG,
    json_output: bool = _JSON,
) -> None:
    """Top-1, top-5 and mean-class accuracy, loss and a per-class table of a model on a labelled dataset version,
    scored at multi-view like production; logged to MLflow."""
    from jobs.evaluate import EvaluationError, evaluate_model, summary_lines
    from jobs.scoring.model_ref import ModelReferenceError
    from pipeline import ManifestError, StorageError

    config = _resolve(ctx, EvaluateConfig, config_file, _given(ctx, {"model_ref": "model", "gpu": "use_gpu"}),
                      print_config)
    with _job("evaluate", json_output, StorageError, ManifestError, ModelReferenceError, EvaluationError,
              ValueError) as echo:
        evaluation = evaluate_model(
            config.data, config.model, views=config.views, options=config.options(),
            tracking_uri=config.tracking_uri, endpoint_url=config.endpoint_url, experiment=config.experiment,
        )
        for line in summary_lines(evaluation):
            echo(line)
    _finish(json_output, evaluation.to_dict())


@app.command("predict")
def predict_command(
    videos: list[str] = typer.Argument(..., help="Videos: local files or s3://bucket/key.", show_default=False),
    model_ref: str = typer.Option(..., "--model", help="models:/NAME@ALIAS, models:/NAME/VERSION, models:/m-ID, or "
                                  "a local package folder."),
    views: str = typer.Option(ScoreConfig.views, "--views", help="Test views TEMPORALxSPATIAL, as for `score`."),
    top_k: int = typer.Option(5, "--top-k", min=1, help="Classes shown per video, best first."),
    tracking_uri: str = typer.Option(None, "--tracking-uri", help="MLflow tracking URI; default: MLFLOW_TRACKING_URI."),
    endpoint_url: str = typer.Option(None, "--endpoint-url", help="S3-compatible endpoint (also AWS_ENDPOINT_URL)."),
    json_output: bool = typer.Option(False, "--json", help="One JSON object per video on stdout (JSON Lines)."),
) -> None:
    """What is in these videos: top-k class names and probabilities per video, by the same decoding and multi-view
    inference as `score`, in this process (no Ray, nothing written). Exit 5 when a video could not be read."""
    from jobs.config import absolute_location
    from jobs.predict import predict_videos
    from jobs.scoring.model_ref import ModelReferenceError
    from pipeline import StorageError

    failed = 0
    with _job("predict", False, StorageError, ModelReferenceError, ValueError):
        identity, predictions = predict_videos(
            videos, model_ref, views=views, top_k=top_k,
            tracking_uri=absolute_location(tracking_uri) if tracking_uri else None, endpoint_url=endpoint_url,
        )
        typer.echo(f"predict with {identity.describe()}, views {views}", err=True)
        for prediction in predictions:
            failed += prediction.error is not None
            if json_output:
                typer.echo(json.dumps({"video": prediction.video, "uri": prediction.uri, "top_k": prediction.top_k,
                                       "error": prediction.error, "seconds": round(prediction.seconds, 3),
                                       "model": identity.to_dict()}))
            else:
                typer.echo(prediction.line())
    _exit(ExitCode.PARTIAL if failed else ExitCode.SUCCESS)


@app.command("gc")
def gc_command(
    dst: str = typer.Argument(..., help="A clip or predictions dataset: s3://bucket/prefix or a local folder."),
    keep_versions: int = typer.Option(..., "--keep-versions", min=1, help="Newest versions to keep, with all they use."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be removed; remove nothing."),
    min_age: float = typer.Option(3600.0, help="Seconds an unreferenced file must be old before it is removed."),
    endpoint_url: str = typer.Option(None, help="S3-compatible endpoint (also AWS_ENDPOINT_URL)."),
) -> None:
    """Remove older versions' manifests and every shard, table and staging file no kept version refers to; never
    what a running job writes or reads (ingest, score, train, evaluate). Prints what it removed and the bytes freed."""
    from pipeline import ManifestError, StorageError
    from pipeline.storage import Storage, parse_uri
    from pipeline.versioned import collect_garbage

    storage, root = Storage(endpoint_url), parse_uri(dst)
    try:
        storage.check_access(root)
        report = collect_garbage(root, storage, keep_versions, dry_run=dry_run, min_age_s=min_age)
    except (StorageError, ManifestError) as error:
        typer.echo(f"gc failed: {redact(str(error))}", err=True)
        raise typer.Exit(code=ExitCode.FAILURE) from None
    for line in report.lines():
        typer.echo(line)


def _parse_overrides(pairs: list[str]) -> dict:
    import ast

    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--set")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    return overrides


# train's parameters whose TrainConfig fields have other names
_TRAIN_RENAMED = {"model_name": "model", "overrides": "model_overrides", "val": "val_data", "gpu": "use_gpu",
                  "compile_blocks": "compile"}


def _train_given(ctx: typer.Context, renamed: dict[str, str]) -> dict:
    given = _given(ctx, renamed)
    if "model_overrides" in given:
        given["model_overrides"] = _parse_overrides(given["model_overrides"])
    return given


@app.command("train")
def train_command(
    ctx: typer.Context,
    data: str = _option(TrainConfig, "data", "--data",
                        help="Clip dataset: DST or DST@VERSION (s3://... or a local folder)."),
    recipe: str = _option(TrainConfig, "recipe", "--recipe",
                          help="A published recipe under the other options: k400_b16_clip, k700_b16_clip, "
                          "k710_to_k400_b16 (jobs/recipes/, each value's source beside it); its lr scales with the "
                          "total batch."),
    model_name: str = _option(TrainConfig, "model", "--model", help="Named configuration (see `uniformer models`)."),
    overrides: list[str] = typer.Option(
        None, "--set", help="Model option override KEY=VALUE, e.g. --set no_lmhra=True (merged into the file's)."
    ),
    pretrained: str = _option(TrainConfig, "pretrained", "--pretrained",
                              help="Initial weights: CLIP / timm / official / MMAction2 checkpoint file."),
    pretrained_class_map: str = _option(
        TrainConfig, "pretrained_class_map", "--pretrained-class-map",
        help="JSON or CSV: dataset class -> the pretrained head's row or class name (e.g. K710 -> K400); mapped rows "
        "are kept, the others start fresh. Without it a registered model's head is matched by class name.",
    ),
    val: str = _option(TrainConfig, "val_data", "--val",
                       help="Validation dataset DST[@VERSION]; default: a held-out split."),
    val_fraction: float = _option(TrainConfig, "val_fraction", "--val-fraction",
                                  help="Share of videos held out for validation when --val is not given."),
    workers: int = _option(TrainConfig, "workers", "--workers", help="Ray Train workers (one per GPU with --gpu)."),
    gpu: bool = _option(TrainConfig, "use_gpu", "--gpu",
                        help="One GPU per worker, NCCL; otherwise CPU workers with gloo."),
    cpus_per_worker: float = _option(TrainConfig, "cpus_per_worker", "--cpus-per-worker",
                                     help="CPUs reserved per training worker."),
    placement_strategy: str = _option(
        TrainConfig, "placement_strategy", "--placement-strategy",
        help="Where workers go: PACK fills nodes, SPREAD puts them on different nodes when it can.",
    ),
    epochs: int = _option(TrainConfig, "epochs", "--epochs", help="Passes over the training set."),
    batch_size: int = _option(TrainConfig, "batch_size", "--batch-size", help="Clips per worker per micro-step."),
    grad_accum: int = _option(TrainConfig, "grad_accum", "--grad-accum", help="Micro-steps per optimizer step."),
    lr: float = _option(TrainConfig, "lr", "--lr", help="Peak learning rate."),
    min_lr: float = _option(TrainConfig, "min_lr", "--min-lr", help="Learning rate at the end of the cosine."),
    weight_decay: float = _option(TrainConfig, "weight_decay", "--weight-decay",
                                  help="AdamW weight decay (not on 1-D parameters)."),
    warmup_epochs: float = _option(TrainConfig, "warmup_epochs", "--warmup-epochs", help="Linear warmup length."),
    label_smoothing: float = _option(TrainConfig, "label_smoothing", "--label-smoothing", help="Label smoothing."),
    hflip: bool = _option(TrainConfig, "hflip", "--hflip/--no-hflip",
                          help="Random horizontal flips (off for left/right classes, or give --flip-pairs)."),
    flip_pairs: str = _option(TrainConfig, "flip_pairs", "--flip-pairs",
                              help="CSV of class-name pairs a flip turns into each other (Something-Something's "
                              "left/right classes): flipped clips get the mirror label."),
    augment: str = _option(
        TrainConfig, "augment", "--augment",
        help="recipe: RandAugment m7 n4 + RandomResizedCrop + flip (the paper's); crop: random crop + flip.",
    ),
    input_normalization: str = _option(
        TrainConfig, "input_normalization", "--input-normalization",
        help="Pixel normalisation, kept in the model: slowfast (0.45/0.225, the official code's) | clip (CLIP's).",
    ),
    grad_clip: float = _option(TrainConfig, "grad_clip", "--grad-clip", help="Max gradient norm; 0 disables clipping."),
    precision: str = _option(TrainConfig, "precision", "--precision", help="bf16 | fp16 | fp32 (autocast on CUDA)."),
    activation_checkpointing: bool = _option(TrainConfig, "activation_checkpointing", "--activation-checkpointing",
                                             help="Recompute block activations in the backward pass."),
    compile_blocks: str = _option(TrainConfig, "compile", "--compile",
                                  help="torch.compile each block: on | off | auto (on with CUDA)."),
    log_every: int = _option(TrainConfig, "log_every", "--log-every",
                             help="Optimizer steps between reading step metrics back from the device."),
    seed: int = _option(TrainConfig, "seed", "--seed", help="Seed of weights, data order and augmentation."),
    checkpoint_every: int = _option(TrainConfig, "checkpoint_every", "--checkpoint-every",
                                    help="Optimizer steps between checkpoints; 0 = each epoch end."),
    keep_checkpoints: int = _option(TrainConfig, "keep_checkpoints", "--keep-checkpoints",
                                    help="Checkpoints kept (the best ones with --select best, and the latest)."),
    max_failures: int = _option(TrainConfig, "max_failures", "--max-failures",
                                help="Automatic restarts after worker or node loss (-1: forever)."),
    max_steps: int = _option(TrainConfig, "max_steps", "--max-steps", help="Stop after this many optimizer steps."),
    select: str = _option(TrainConfig, "select", "--select",
                          help="Checkpoint to register: best (validation top-1 at an epoch end) | last."),
    storage: str = _option(TrainConfig, "storage", "--storage",
                           help="Checkpoint storage: local folder or s3://bucket/prefix."),
    run_name: str = _option(TrainConfig, "run_name", "--run-name",
                            help="Ray Train run name; default derived from the options (same command = same run)."),
    experiment: str = _option(TrainConfig, "experiment", "--experiment",
                              help="MLflow experiment; default: MLFLOW_EXPERIMENT_NAME, else uniformerv2."),
    register_as: str = _option(TrainConfig, "register_as", "--register-as",
                               help="Register the final model under this MLflow model name."),
    endpoint_url: str = _option(TrainConfig, "endpoint_url", "--endpoint-url",
                                help="S3-compatible endpoint (also AWS_ENDPOINT_URL)."),
    config_file: str = _CONFIG_FILE,
    print_config: bool = _PRINT_CONFIG,
    json_output: bool = _JSON,
) -> None:
    """Train UniFormerV2 with Ray Train; resumes automatically from the last checkpoint in --storage."""
    from jobs.train import run_train
    from pipeline import ManifestError, StorageError

    config = _resolve(ctx, TrainConfig, config_file, _train_given(ctx, _TRAIN_RENAMED), print_config)
    with _job("train", json_output, StorageError, ManifestError, ValueError, RuntimeError) as echo:
        result = run_train(config)
        echo(f"run {result.run_name} (mlflow {result.mlflow_run_id}) checkpoint {result.checkpoint}")
        if result.registered_version is not None:
            echo(f"registered {config.register_as} version {result.registered_version}")
    _finish(json_output, {**dataclasses.asdict(result), "registered_as": config.register_as})


@app.command("register")
def register_command(
    ctx: typer.Context,
    run: str = _option(RegisterConfig, "run", "--run", help="Ray Train run name (printed by `uniformer train`)."),
    storage: str = _option(RegisterConfig, "storage", "--storage", help="The checkpoint storage the run used."),
    register_as: str = _option(RegisterConfig, "register_as", "--register-as",
                               help="Model name; default: the run's --register-as."),
    tracking_uri: str = _option(RegisterConfig, "tracking_uri", "--tracking-uri",
                                help="MLflow tracking URI; default: MLFLOW_TRACKING_URI or the run's."),
    endpoint_url: str = _option(RegisterConfig, "endpoint_url", "--endpoint-url",
                                help="S3-compatible endpoint for s3:// storage."),
    config_file: str = _CONFIG_FILE,
    print_config: bool = _PRINT_CONFIG,
    json_output: bool = _JSON,
) -> None:
    """Log and register the final model of a finished training run (after MLflow was unreachable at its end)."""
    from jobs.train import register_run
    from pipeline import ManifestError, StorageError

    config = _resolve(ctx, RegisterConfig, config_file, _given(ctx), print_config)
    with _job("register", json_output, FileNotFoundError, StorageError, ManifestError, ValueError,
              RuntimeError) as echo:
        model_uri, version = register_run(config.run, config.storage, config.register_as, config.tracking_uri,
                                          config.endpoint_url)
        echo(f"logged {model_uri}" + (f", registered version {version}" if version is not None else ""))
    _finish(json_output, {"run_name": config.run, "model_uri": model_uri, "registered_version": version})


# retrain's flags: its own fields, and the most used of its sections' (the files take all of them)
_RETRAIN_TRAIN_FLAGS = {"model_config": "model", "overrides": "model_overrides", "pretrained": "pretrained",
                        "workers": "workers", "gpu": "use_gpu", "epochs": "epochs", "batch_size": "batch_size",
                        "lr": "lr", "hflip": "hflip", "storage": "storage", "experiment": "experiment"}
_RETRAIN_INGEST_FLAGS = {"labels": "labels", "labels_from_dirs": "labels_from_dirs", "frames": "frames",
                         "size": "size", "short_side": "short_side", "retry_errors": "retry_errors"}


@app.command("retrain")
def retrain_command(
    ctx: typer.Context,
    source: str = _option(RetrainConfig, "source", "--source",
                          help="Raw videos (s3://... or a folder); what is new is ingested."),
    dataset: str = _option(RetrainConfig, "dataset", "--dataset", help="The clip dataset to grow (DST)."),
    model_name: str = _option(RetrainConfig, "model_name", "--model-name",
                              help="Registered model name; its `champion` alias is gated."),
    val: str = _option(RetrainConfig, "val", "--val",
                       help="Fixed validation dataset DST[@VERSION] for candidate and champion."),
    min_gain: float = _option(RetrainConfig, "min_gain", "--min-gain",
                              help="What the candidate must gain over the champion to be promoted."),
    gate_metric: str = _option(RetrainConfig, "gate_metric", "--gate-metric",
                               help="Gate figure: accuracy (top-1) | top5_accuracy | mean_class_accuracy."),
    gate_views: str = _option(RetrainConfig, "gate_views", "--gate-views",
                              help="Views the gate evaluates at: the ones scoring uses."),
    init: str = _option(RetrainConfig, "init", "--init",
                        help="Candidate starts from the champion's weights or from --pretrained."),
    labels: str = _option(IngestConfig, "labels", "--labels", help="Labels CSV for the new videos (ingest.labels)."),
    labels_from_dirs: bool = _option(IngestConfig, "labels_from_dirs", "--labels-from-dirs",
                                     help="Labels from parent folder names (ingest.labels_from_dirs)."),
    frames: int = _option(IngestConfig, "frames", "--frames", help="Frames per clip (ingest.frames)."),
    size: int = _option(IngestConfig, "size", "--size", help="Crop size (ingest.size)."),
    short_side: int = _option(IngestConfig, "short_side", "--short-side", help="Stored side (ingest.short_side)."),
    retry_errors: bool = _option(IngestConfig, "retry_errors", "--retry-errors",
                                 help="Decode again videos that failed before, though unchanged (ingest.retry_errors)."),
    model_config: str = _option(TrainConfig, "model", "--model",
                                help="Named configuration of the candidate (train.model)."),
    overrides: list[str] = typer.Option(None, "--set", help="Model option override KEY=VALUE (train.model_overrides)."),
    pretrained: str = _option(TrainConfig, "pretrained", "--pretrained",
                              help="Initial weights when --init pretrained, or no champion yet (train.pretrained)."),
    workers: int = _option(TrainConfig, "workers", "--workers", help="Ray Train workers (train.workers)."),
    gpu: bool = _option(TrainConfig, "use_gpu", "--gpu", help="Train and evaluate on GPUs (train.use_gpu)."),
    epochs: int = _option(TrainConfig, "epochs", "--epochs", help="train.epochs"),
    batch_size: int = _option(TrainConfig, "batch_size", "--batch-size", help="train.batch_size"),
    lr: float = _option(TrainConfig, "lr", "--lr", help="train.lr"),
    hflip: bool = _option(TrainConfig, "hflip", "--hflip/--no-hflip", help="train.hflip"),
    storage: str = _option(TrainConfig, "storage", "--storage",
                           help="Checkpoints and the promotion lock, local folder or s3:// (train.storage)."),
    experiment: str = typer.Option(None, "--experiment", help="MLflow experiment (train.experiment).",
                                   show_default=RETRAIN_EXPERIMENT),
    endpoint_url: str = _option(RetrainConfig, "endpoint_url", "--endpoint-url",
                                help="S3-compatible endpoint (also AWS_ENDPOINT_URL)."),
    config_file: str = _CONFIG_FILE,
    print_config: bool = _PRINT_CONFIG,
    json_output: bool = _JSON,
    dry_run: bool = _DRY_RUN,
) -> None:
    """Ingest new videos, train a candidate, promote it to `champion` only if it beats the champion. Every training
    option goes in the config file's `train:` section, every ingest option in `ingest:`."""
    from jobs.retrain import run_retrain
    from pipeline import LabelsError, ManifestError, StorageError

    given = _train_given(ctx, {**_RETRAIN_TRAIN_FLAGS, **_RETRAIN_INGEST_FLAGS})
    sections = {"train": _RETRAIN_TRAIN_FLAGS.values(), "ingest": _RETRAIN_INGEST_FLAGS.values()}
    for section, keys in sections.items():
        flags = {key: given.pop(key) for key in keys if key in given}
        if flags:
            given[section] = flags
    config = _resolve(ctx, RetrainConfig, config_file, given, print_config)
    with _job("retrain", json_output, StorageError, LabelsError, ManifestError, ValueError, RuntimeError,
              TimeoutError) as echo:
        result = run_retrain(
            config.source, config.dataset, config.model_name, config.val, min_gain=config.min_gain,
            init=config.init, train=config.train, ingest_options=config.ingest.run_options(),
            endpoint_url=config.endpoint_url, gate_views=config.gate_views, gate_metric=config.gate_metric,
            dry_run=dry_run, echo=echo,
        )
        if not dry_run and result.decision is None:
            echo("nothing new to train on")
    if dry_run or result.decision is not None and result.decision.promoted:
        code = ExitCode.SUCCESS
    else:
        code = ExitCode.NOTHING_NEW if result.decision is None else ExitCode.REJECTED
    _finish(json_output, dataclasses.asdict(result), code)


@app.command("demo")
def demo_command(
    ctx: typer.Context,
    workdir: str = _option(DemoConfig, "workdir", "--workdir",
                           help="Where videos, clips, runs, scores and mlflow.db go."),
    size: str = _option(DemoConfig, "size", "--size", help="default (shows learning) or small (a quick smoke run)."),
    workers: int = _option(DemoConfig, "workers", "--workers", help="Ray Train workers."),
    config_file: str = _CONFIG_FILE,
    print_config: bool = _PRINT_CONFIG,
    json_output: bool = _JSON,
) -> None:
    """Run ingest, train, register, score and a gated retrain end to end on embedded defaults."""
    from jobs.demo import run_demo

    config = _resolve(ctx, DemoConfig, config_file, _given(ctx), print_config)
    with _job("demo", json_output, ValueError) as echo:
        summary = run_demo(config.workdir, config.size, config.workers, echo=echo)
    _finish(json_output, summary)


@app.command("submit", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
def submit_command(
    job: str = typer.Argument(..., help="The uniformer command to run on the cluster (ingest, train, score, ...)."),
    args: list[str] = typer.Argument(None, help="Its options and arguments, as for a local run."),
    address: str = typer.Option(None, help="Ray dashboard http://HEAD:8265; default: RAY_ADDRESS."),
    wait: bool = typer.Option(False, "--wait", help="Follow the job's logs and exit with its exit code."),
    working_dir: str = typer.Option(
        "auto", help="Code shipped with the job: 'auto' (this checkout; nothing when installed), a folder, or 'none'."
    ),
    pip: list[str] = typer.Option([], "--pip", help="Extra pip requirement for the job's runtime env (repeatable)."),
    env: list[str] = typer.Option(
        [], "--env", help="Also forward this variable's local value (repeatable); credentials are refused."
    ),
    job_id: str = typer.Option(None, "--job-id", help="Submission id; default: Ray's generated one."),
) -> None:
    """Run `uniformer JOB ARGS` on a Ray cluster through the Ray Jobs API; options go before JOB.

    MLFLOW_TRACKING_URI and AWS_ENDPOINT_URL are forwarded when set. Ray's token (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) authenticates the request."""
    from jobs.submit import SubmitError, connect, exit_code_of, follow, submit

    shipped = {"auto": True, "none": None}.get(working_dir, working_dir)
    try:
        client = connect(address)
        submission = submit(job, args or [], client=client, working_dir=shipped, pip=pip, env=env,
                            submission_id=job_id)
    except SubmitError as error:
        typer.echo(f"submit failed: {redact(str(error))}", err=True)
        raise typer.Exit(code=ExitCode.FAILURE) from None
    typer.echo(f"submitted {submission.job_id} to {submission.address}: {submission.entrypoint}")
    if not wait:
        typer.echo(f"follow it with: ray job logs --follow {submission.job_id} --address {submission.address}")
        return
    status = follow(client, submission.job_id)
    typer.echo(f"job {submission.job_id} {status.value}")
    _exit(exit_code_of(client, submission.job_id))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
