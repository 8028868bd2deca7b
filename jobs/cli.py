"""The `uniformer` command line: parses options and calls the job modules, nothing more."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import sys

import typer

if not os.environ.get("RAY_ADDRESS"):
    # A Ray started here for a local run listens on loopback only (on Linux Ray would otherwise bind the machine's
    # address). Ray reads this at import, so it is set before any job imports Ray.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# Only what --help needs is imported here (the config classes, no torch, Ray or MLflow); each command imports its job.
from jobs.credentials import redact  # noqa: E402
from jobs.exitcodes import ExitCode, OptionError  # noqa: E402
from jobs.flags import flags_of, given_options, parse_key_values, with_flags  # noqa: E402
from jobs.options import (  # noqa: E402
    ENDPOINT_URL,
    MODEL_REFERENCE,
    TRACKING_URI,
    DemoConfig,
    EvaluateConfig,
    IngestConfig,
    RegisterConfig,
    RetrainConfig,
    ScoreConfig,
    ServeConfig,
)
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

    options = parse_key_values(overrides, "--set")
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


# ---- job options: config files, --print-config, --json, exit codes ------------------------------------------------
def _invocation_parameter(name: str, declaration) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=declaration,
                             annotation=bool if name != "config_file" else str)


# how a job is invoked, not its configuration
_CONFIG_FILE = _invocation_parameter("config_file", typer.Option(
    None, "--config", help="YAML file of this job's options (`--print-config` writes one); the flags given override it."
))
_PRINT_CONFIG = _invocation_parameter(
    "print_config", typer.Option(False, "--print-config", help="Print the resolved configuration as YAML and exit.")
)
_JSON = _invocation_parameter(
    "json_output", typer.Option(False, "--json", help="Print one JSON summary on stdout; the text goes to stderr.")
)
_DRY_RUN = _invocation_parameter(
    "dry_run", typer.Option(False, "--dry-run", help="Print what the job would do, and write nothing.")
)
# errors in the JSON summary: the whole table is at its errors_uri
_JSON_ERRORS = 100


def _job_command(name: str, config_class: type, *, dry_run: bool = False):
    """Registers `run(config, json_output, dry_run)` as the command `name`, whose flags are `config_class`'s options
    and whose help is `run`'s docstring."""
    flags = flags_of(config_class)
    invocation = [_CONFIG_FILE, _PRINT_CONFIG, _JSON] + ([_DRY_RUN] if dry_run else [])

    def register(run):
        def command(ctx: typer.Context, **values):
            given = given_options(ctx, flags, values)
            config = _resolve(ctx, config_class, values["config_file"], given, values["print_config"])
            run(config, json_output=values["json_output"], dry_run=values.get("dry_run", False))

        command.__doc__ = run.__doc__
        app.command(name)(with_flags(command, flags, invocation))
        return run

    return register


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
    from jobs.registry import TrackingUnreachable

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


@_job_command("ingest", IngestConfig, dry_run=True)
def ingest_command(config: IngestConfig, json_output: bool, dry_run: bool) -> None:
    """Decode sampled clips of every new video under SRC into a sharded Parquet clip dataset with a manifest."""
    from jobs.ingest import run_ingest
    from pipeline import LabelsError, ManifestError, StorageError

    with _job("ingest", json_output, StorageError, LabelsError, ManifestError, ValueError) as echo:
        summary = run_ingest(config, dry_run=dry_run, echo=echo)
    if dry_run:
        _finish(json_output, _summary_dict(summary))
    _finish(json_output, _summary_dict(summary), _dataset_outcome(summary.manifest_written, summary.errored))


@_job_command("score", ScoreConfig, dry_run=True)
def score_command(config: ScoreConfig, json_output: bool, dry_run: bool) -> None:
    """Score every video under SRC not yet scored into --out by the same model: multi-view predictions as Parquet."""
    from jobs.registry import ModelReferenceError
    from jobs.score import run_score
    from pipeline import StorageError

    with _job("score", json_output, StorageError, ModelReferenceError, ValueError) as echo:
        summary = run_score(config, dry_run=dry_run, echo=echo)
    if dry_run:
        _finish(json_output, _summary_dict(summary))
    _finish(json_output, _summary_dict(summary), _dataset_outcome(summary.manifest_written, summary.errored))


@_job_command("evaluate", EvaluateConfig)
def evaluate_command(config: EvaluateConfig, json_output: bool, dry_run: bool) -> None:
    """Top-1, top-5 and mean-class accuracy, loss and a per-class table of a model on a labelled dataset version,
    scored at multi-view like production; logged to MLflow."""
    from jobs.evaluate import EvaluationError, evaluate_model, summary_lines
    from jobs.registry import ModelReferenceError
    from pipeline import ManifestError, StorageError

    with _job("evaluate", json_output, StorageError, ManifestError, ModelReferenceError, EvaluationError,
              ValueError) as echo:
        evaluation = evaluate_model(config)
        for line in summary_lines(evaluation):
            echo(line)
    _finish(json_output, evaluation.to_dict())


@_job_command("serve", ServeConfig)
def serve_command(config: ServeConfig, json_output: bool, dry_run: bool) -> None:
    """Serve the model over HTTP with Ray Serve until interrupted: POST {"videos": [{"video": BASE64} or {"uri": URI}]}
    to http://HOST:PORT/ for each video's top-k (as `predict` gives it) and the version that answered. Videos of
    concurrent requests are batched; with models:/NAME@ALIAS the replicas follow the alias to each new version
    without dropping a request. Needs the `serve` extra."""
    from jobs.registry import ModelReferenceError
    from jobs.serve import run_serve

    with _job("serve", json_output, ModelReferenceError, ValueError, RuntimeError) as echo:
        summary = run_serve(config, echo=echo)
    _finish(json_output, summary)


@app.command("predict")
def predict_command(
    videos: list[str] = typer.Argument(..., help="Videos: local files or s3://bucket/key.", show_default=False),
    model_ref: str = typer.Option(..., "--model", help=MODEL_REFERENCE),
    views: str = typer.Option(ScoreConfig.views, "--views", help="Test views TEMPORALxSPATIAL, as for `score`."),
    top_k: int = typer.Option(5, "--top-k", min=1, help="Classes shown per video, best first."),
    tracking_uri: str = typer.Option(None, "--tracking-uri", help=TRACKING_URI),
    endpoint_url: str = typer.Option(None, "--endpoint-url", help=ENDPOINT_URL),
    json_output: bool = typer.Option(False, "--json", help="One JSON object per video on stdout (JSON Lines)."),
) -> None:
    """What is in these videos: top-k class names and probabilities per video, by the same decoding and multi-view
    inference as `score`, in this process (no Ray, nothing written). Exit 5 when a video could not be read."""
    from jobs.config import absolute_location
    from jobs.predict import predict_videos
    from jobs.registry import ModelReferenceError
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


@app.command("export")
def export_command(
    model_ref: str = typer.Option(..., "--model", help=MODEL_REFERENCE),
    export_format: str = typer.Option(..., "--format", help="onnx (onnxruntime; needs the `export` extra) or "
                                      "torchscript (libtorch)."),
    out: str = typer.Option(..., "--out", help="The file to write (.onnx, .pt); replaced only by a checked export."),
    tracking_uri: str = typer.Option(None, "--tracking-uri", help=TRACKING_URI),
    log_artifact: bool = typer.Option(
        False, "--log-artifact", help="Also log the file under export/ of the MLflow run that logged the model."
    ),
) -> None:
    """Write the model as one file that takes uint8 clips (batch x T x S x S x 3, RGB, centre-cropped; the
    normalisation inside) and gives logits and probabilities, with the class names, clip format and model identity
    in its metadata. Written only after the file, run on random clips, agrees with PyTorch within 1e-4; exit 1
    otherwise, --out left as it was."""
    from jobs.config import absolute_location
    from jobs.export import ExportError, export_model
    from jobs.registry import ModelReferenceError

    with _job("export", False, ModelReferenceError, ExportError, ValueError, OSError) as echo:
        result = export_model(
            model_ref, export_format, out, tracking_uri=absolute_location(tracking_uri) if tracking_uri else None,
            log_artifact=log_artifact, echo=echo,
        )
        echo(f"exported {result.format} to {result.path} in {result.seconds:.1f} s, max difference to PyTorch "
             f"{result.max_difference:.2g}" + (f", logged as {result.artifact_uri}" if result.artifact_uri else ""))
    _exit(ExitCode.SUCCESS)


@app.command("timeline")
def timeline_command(
    dst: str = typer.Argument(..., help="Windowed predictions (`score --windows`): DST or DST@VERSION."),
    video_id: str = typer.Argument(..., help="The video's id (its key relative to the scored source)."),
    smooth: int = typer.Option(1, "--smooth", min=1, help="Median-filter each class's probability over N windows."),
    endpoint_url: str = typer.Option(None, "--endpoint-url", help=ENDPOINT_URL),
    json_output: bool = typer.Option(False, "--json", help="The segments as one JSON object on stdout."),
) -> None:
    """A video's timeline: consecutive windows with the same top-1 class merged into segments (start, end, label,
    mean probability)."""
    from jobs.config import absolute_location
    from pipeline import StorageError
    from pipeline.storage import Storage
    from pipeline.timeline import format_timeline, timeline

    with _job("timeline", json_output, StorageError, KeyError, ValueError) as echo:
        segments = timeline(absolute_location(dst), video_id, smooth, Storage(endpoint_url))
        if not json_output:
            echo(format_timeline(video_id, segments, smooth))
    if json_output:
        _finish(json_output, {"video_id": video_id, "smooth": smooth,
                              "segments": [segment.to_dict() for segment in segments]})


@app.command("neighbours")
def neighbours_command(
    dst: str = typer.Argument(..., help="Windowed predictions with embeddings (`score --windows ... --embeddings`)."),
    video_id: str = typer.Argument(..., help="The video's id."),
    window: int = typer.Argument(..., help="The window's index."),
    k: int = typer.Option(5, "--k", min=1, help="Windows to show, nearest first."),
    endpoint_url: str = typer.Option(None, "--endpoint-url", help=ENDPOINT_URL),
    json_output: bool = typer.Option(False, "--json", help="The neighbours as one JSON object on stdout."),
) -> None:
    """The windows of a video most like one of its windows: cosine similarity of their embeddings."""
    from jobs.config import absolute_location
    from pipeline import StorageError
    from pipeline.storage import Storage
    from pipeline.timeline import neighbours

    with _job("neighbours", json_output, StorageError, KeyError, ValueError) as echo:
        found = neighbours(absolute_location(dst), video_id, window, k, Storage(endpoint_url))
        if not json_output:
            echo(f"windows of {video_id} nearest to window {window} (cosine)")
            for item in found:
                echo(f"  window {item.window_index:6d}  {item.start:9.2f} - {item.end:9.2f} s  {item.similarity:.4f}")
    if json_output:
        _finish(json_output, {"video_id": video_id, "window": window, "neighbours": [n.to_dict() for n in found]})


@app.command("gc")
def gc_command(
    dst: str = typer.Argument(..., help="A clip or predictions dataset: s3://bucket/prefix or a local folder."),
    keep_versions: int = typer.Option(..., "--keep-versions", min=1, help="Newest versions to keep, with all they use."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be removed; remove nothing."),
    min_age: float = typer.Option(3600.0, help="Seconds an unreferenced file must be old before it is removed."),
    endpoint_url: str = typer.Option(None, help=ENDPOINT_URL),
) -> None:
    """Remove older versions' manifests and every shard, table and staging file no kept version refers to; never
    what a running job writes or reads (ingest, score, train, evaluate). Prints what it removed and the bytes freed."""
    from pipeline import ManifestError, StorageError
    from pipeline.dataset.gc import collect_garbage
    from pipeline.storage import Storage, parse_uri

    storage, root = Storage(endpoint_url), parse_uri(dst)
    try:
        storage.check_access(root)
        report = collect_garbage(root, storage, keep_versions, dry_run=dry_run, min_age_s=min_age)
    except (StorageError, ManifestError) as error:
        typer.echo(f"gc failed: {redact(str(error))}", err=True)
        raise typer.Exit(code=ExitCode.FAILURE) from None
    for line in report.lines():
        typer.echo(line)


@_job_command("train", TrainConfig)
def train_command(config: TrainConfig, json_output: bool, dry_run: bool) -> None:
    """Train UniFormerV2 with Ray Train; resumes automatically from the last checkpoint in --storage."""
    from jobs.train import run_train
    from pipeline import ManifestError, StorageError

    with _job("train", json_output, StorageError, ManifestError, ValueError, RuntimeError) as echo:
        result = run_train(config)
        echo(f"run {result.run_name} (mlflow {result.mlflow_run_id}) checkpoint {result.checkpoint}")
        if result.registered_version is not None:
            echo(f"registered {config.register_as} version {result.registered_version}")
    _finish(json_output, {**dataclasses.asdict(result), "registered_as": config.register_as})


@_job_command("register", RegisterConfig)
def register_command(config: RegisterConfig, json_output: bool, dry_run: bool) -> None:
    """Log and register the final model of a finished training run (after MLflow was unreachable at its end)."""
    from jobs.train import register_run
    from pipeline import ManifestError, StorageError

    with _job("register", json_output, FileNotFoundError, StorageError, ManifestError, ValueError,
              RuntimeError) as echo:
        model_uri, version = register_run(config)
        echo(f"logged {model_uri}" + (f", registered version {version}" if version is not None else ""))
    _finish(json_output, {"run_name": config.run, "model_uri": model_uri, "registered_version": version})


@_job_command("retrain", RetrainConfig, dry_run=True)
def retrain_command(config: RetrainConfig, json_output: bool, dry_run: bool) -> None:
    """Ingest new videos, train a candidate, promote it to `champion` only if it beats the champion. Every training
    option goes in the config file's `train:` section, every ingest option in `ingest:`."""
    from jobs.retrain import run_retrain
    from pipeline import LabelsError, ManifestError, StorageError

    with _job("retrain", json_output, StorageError, LabelsError, ManifestError, ValueError, RuntimeError,
              TimeoutError) as echo:
        result = run_retrain(config, dry_run=dry_run, echo=echo)
        if not dry_run and result.decision is None:
            echo("nothing new to train on")
    if dry_run or result.decision is not None and result.decision.promoted:
        code = ExitCode.SUCCESS
    else:
        code = ExitCode.NOTHING_NEW if result.decision is None else ExitCode.REJECTED
    _finish(json_output, dataclasses.asdict(result), code)


@_job_command("demo", DemoConfig)
def demo_command(config: DemoConfig, json_output: bool, dry_run: bool) -> None:
    """Run ingest, train, register, score and a gated retrain end to end on embedded defaults."""
    from jobs.demo import run_demo

    with _job("demo", json_output, ValueError) as echo:
        summary = run_demo(config, echo=echo)
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
        submission = submit(typer.main.get_command(app), job, args or [], client=client, working_dir=shipped,
                            pip=pip, env=env, submission_id=job_id)
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
