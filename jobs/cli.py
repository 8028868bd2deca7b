"""The `uniformer` command line: parses options and calls the job modules, nothing more."""

from __future__ import annotations

import contextlib
import os
import sys

import typer

from pipeline.decode import DecodeLimits

if not os.environ.get("RAY_ADDRESS"):
    # A Ray started here for a local run listens on loopback only (on Linux Ray would otherwise bind the machine's
    # address). Ray reads this at import, so it is set before any job imports Ray.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

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
) -> None:
    """Each sub-command is one job; `uniformer COMMAND --help` explains its options. Options of `uniformer` itself
    (-v, -q) go before COMMAND."""
    from jobs.console import QUIET, configure_logging

    if verbose and quiet:
        raise typer.BadParameter("-v and -q contradict each other", param_hint="-v/-q")
    configure_logging(QUIET if quiet else verbose)


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
    classes: int = typer.Option(400, help="Classes of that model: a classifier head of another count is skipped."),
) -> None:
    """Print the file's layout, the architecture its tensors imply, and what loading it into --model would load,
    inflate, interpolate, keep or ignore. Nothing in the file is run."""
    import torch

    import model

    try:
        checkpoint = model.read_checkpoint(path)
    except (OSError, ValueError) as error:
        typer.echo(f"cannot read {path}: {error}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(f"layout        {checkpoint.layout}: {model.LAYOUTS[checkpoint.layout]}")
    typer.echo("architecture  " + ", ".join(f"{key}={value}" for key, value in checkpoint.architecture().items()))
    with torch.device("meta"):  # the check reads shapes only: no memory for a B/16 or L/14
        net = model.create_model(model_name, classes, **_parse_overrides(overrides))
    try:
        report = model.check_pretrained(net, checkpoint)
    except ValueError as error:
        typer.echo(f"does not load into {model_name}: {error}", err=True)
        raise typer.Exit(code=1) from None
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
        raise typer.Exit(code=2) from None
    typer.echo(f"wrote {len(checkpoint.state)} tensors of a {checkpoint.layout} checkpoint to {out} "
               f"({len(checkpoint.ignored)} of the file ignored; `uniformer weights inspect` lists them)")


_LIMITS = DecodeLimits()


def _decode_limits(max_frame_side: int, max_frames: int, max_seconds: float, decode_timeout: float) -> DecodeLimits:
    try:
        return DecodeLimits(max_frame_side, max_frames, max_seconds, decode_timeout)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None


# Shared by ingest and score: what one video may cost before it is refused as an error row.
_MAX_FRAME_SIDE = typer.Option(_LIMITS.max_frame_side, help="Refuse videos with a longer frame side (pixels).")
_MAX_FRAMES = typer.Option(_LIMITS.max_frames, help="Refuse videos that declare more frames.")
_MAX_SECONDS = typer.Option(_LIMITS.max_seconds, help="Refuse videos that declare a longer duration (seconds).")
_DECODE_TIMEOUT = typer.Option(_LIMITS.timeout_s, help="Seconds one video's decoding may take before it is stopped.")


@app.command("ingest")
def ingest_command(
    src: str = typer.Argument(..., help="Videos: s3://bucket/prefix or a local folder."),
    out: str = typer.Option(..., "--out", help="Clip dataset: s3://bucket/prefix or a local folder."),
    labels: str = typer.Option(None, "--labels", help="CSV 'path,label' with paths relative to SRC."),
    labels_from_dirs: bool = typer.Option(False, "--labels-from-dirs", help="Label = parent folder (Kinetics layout)."),
    classes: str = typer.Option(
        None, "--classes", help="Class names, one per line, in class id order (e.g. Kinetics-400's label map): ids "
        "match a checkpoint's head however few classes the videos show; other labels become error rows."
    ),
    frames: int = typer.Option(8, help="Frames per clip."),
    size: int = typer.Option(224, help="Model input (crop) size recorded in the manifest; <= --short-side."),
    short_side: int = typer.Option(256, help="Stored square side: short side resized to it, then centre-cropped."),
    clips_per_video: int = typer.Option(1, help="Clips per video, at spread temporal offsets."),
    sampling: str = typer.Option("uniform", help="uniform (TSN segments) | dense (frames --stride apart)."),
    stride: int = typer.Option(16, help="Frame stride for dense sampling."),
    frames_per_segment: int = typer.Option(
        1, help="Candidate frames stored per segment (uniform): training picks one per segment each epoch "
        "(temporal jitter); storage grows by this factor."
    ),
    endpoint_url: str = typer.Option(None, help="S3-compatible endpoint (also AWS_ENDPOINT_URL)."),
    max_frame_side: int = _MAX_FRAME_SIDE,
    max_frames: int = _MAX_FRAMES,
    max_seconds: float = _MAX_SECONDS,
    decode_timeout: float = _DECODE_TIMEOUT,
    retry_errors: bool = typer.Option(
        False, "--retry-errors", help="Decode again the videos that failed before, though they did not change."
    ),
    keep_deleted: bool = typer.Option(
        False, "--keep-deleted", help="Keep the clips of videos gone from SRC (default: they leave the new version)."
    ),
) -> None:
    """Decode sampled clips of every new video under SRC into a sharded Parquet clip dataset with a manifest."""
    from jobs.ingest import run_ingest
    from pipeline import LabelsError, ManifestError, StorageError

    if sampling not in ("uniform", "dense"):
        raise typer.BadParameter("must be 'uniform' or 'dense'", param_hint="--sampling")
    limits = _decode_limits(max_frame_side, max_frames, max_seconds, decode_timeout)
    try:
        run_ingest(
            src,
            out,
            labels_csv=labels,
            labels_from_dirs=labels_from_dirs,
            classes=classes,
            frames=frames,
            size=size,
            short_side=short_side,
            clips_per_video=clips_per_video,
            sampling=sampling,
            stride=stride,
            frames_per_segment=frames_per_segment,
            endpoint_url=endpoint_url,
            decode_limits=limits,
            retry_errors=retry_errors,
            keep_deleted=keep_deleted,
            echo=typer.echo,
        )
    except (StorageError, LabelsError, ManifestError, ValueError) as error:
        typer.echo(f"ingest failed: {error}", err=True)
        raise typer.Exit(code=2) from None


@app.command("score")
def score_command(
    src: str = typer.Argument(..., help="Videos: s3://bucket/prefix or a local folder."),
    model_ref: str = typer.Option(
        ..., "--model", help="models:/NAME@ALIAS, models:/NAME/VERSION, models:/m-ID, or a local package folder."
    ),
    out: str = typer.Option(..., "--out", help="Predictions: s3://bucket/prefix or a local folder (one model each)."),
    views: str = typer.Option("4x3", help="Test views TEMPORALxSPATIAL: clips at spread offsets x crops."),
    top_k: int = typer.Option(5, help="Classes kept per video, best first."),
    full_probs: bool = typer.Option(False, "--full-probs", help="Also store every class's probability."),
    short_side: int = typer.Option(None, help="Scale short sides to this before cropping; default: the crop size."),
    batch_size: int = typer.Option(4, help="Videos per model call (each brings TEMPORALxSPATIAL clips)."),
    gpu: bool = typer.Option(False, "--gpu", help="One GPU per model actor."),
    actors: int = typer.Option(
        None, help="Most model actors (the pool starts with one); default: the cluster's GPUs now with --gpu, else 1."
    ),
    cpus_per_actor: float = typer.Option(1.0, help="CPUs per model actor (its torch threads on CPU)."),
    precision: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16 (autocast)."),
    tracking_uri: str = typer.Option(None, help="MLflow tracking URI; default: MLFLOW_TRACKING_URI."),
    endpoint_url: str = typer.Option(None, help="S3-compatible endpoint (also AWS_ENDPOINT_URL)."),
    max_frame_side: int = _MAX_FRAME_SIDE,
    max_frames: int = _MAX_FRAMES,
    max_seconds: float = _MAX_SECONDS,
    decode_timeout: float = _DECODE_TIMEOUT,
) -> None:
    """Score every video under SRC not yet scored into --out by the same model: multi-view predictions as Parquet."""
    from jobs.score import ScoreOptions, run_score
    from jobs.scoring.model_ref import ModelReferenceError
    from pipeline import StorageError

    limits = _decode_limits(max_frame_side, max_frames, max_seconds, decode_timeout)
    try:
        run_score(
            src, out, model_ref, views=views, top_k=top_k, full_probs=full_probs, short_side=short_side,
            options=ScoreOptions(batch_size, gpu, actors, cpus_per_actor, precision, decode_limits=limits),
            tracking_uri=tracking_uri, endpoint_url=endpoint_url, echo=typer.echo,
        )
    except (StorageError, ModelReferenceError, ValueError) as error:
        typer.echo(f"score failed: {error}", err=True)
        raise typer.Exit(code=2) from None


@app.command("evaluate")
def evaluate_command(
    data: str = typer.Option(..., "--data", help="Labelled clip dataset: DST or DST@VERSION (its source videos)."),
    model_ref: str = typer.Option(
        ..., "--model", help="models:/NAME@ALIAS, models:/NAME/VERSION, models:/m-ID, or a local package folder."
    ),
    views: str = typer.Option("4x3", help="Test views TEMPORALxSPATIAL, as scoring takes them."),
    batch_size: int = typer.Option(4, help="Videos per model call."),
    gpu: bool = typer.Option(False, "--gpu", help="One GPU per model actor."),
    actors: int = typer.Option(None, help="Most model actors; default: the cluster's GPUs with --gpu, else 1."),
    cpus_per_actor: float = typer.Option(1.0, help="CPUs per model actor (its torch threads on CPU)."),
    precision: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16 (autocast)."),
    experiment: str = typer.Option("uniformerv2-evaluations", help="MLflow experiment of the evaluation run."),
    json_output: bool = typer.Option(False, "--json", help="Print the evaluation as JSON on stdout (text on stderr)."),
    tracking_uri: str = typer.Option(None, help="MLflow tracking URI; default: MLFLOW_TRACKING_URI."),
    endpoint_url: str = typer.Option(None, help="S3-compatible endpoint (also AWS_ENDPOINT_URL)."),
) -> None:
    """Top-1, top-5 and mean-class accuracy, loss and a per-class table of a model on a labelled dataset version,
    scored at multi-view like production; logged to MLflow."""
    from jobs.evaluate import EvaluationError, evaluate_model, summary_lines, to_json
    from jobs.score import ScoreOptions
    from jobs.scoring.model_ref import ModelReferenceError
    from pipeline import ManifestError, StorageError

    # with --json, stdout carries the JSON alone: whatever the job's libraries print goes to stderr
    try:
        with contextlib.redirect_stdout(sys.stderr) if json_output else contextlib.nullcontext():
            evaluation = evaluate_model(
                data, model_ref, views=views, options=ScoreOptions(batch_size, gpu, actors, cpus_per_actor, precision),
                tracking_uri=tracking_uri, endpoint_url=endpoint_url, experiment=experiment,
            )
    except (StorageError, ManifestError, ModelReferenceError, EvaluationError, ValueError) as error:
        typer.echo(f"evaluate failed: {error}", err=True)
        raise typer.Exit(code=2) from None
    for line in summary_lines(evaluation):
        typer.echo(line, err=json_output)
    if json_output:
        typer.echo(to_json(evaluation))


@app.command("gc")
def gc_command(
    dst: str = typer.Argument(..., help="A clip or predictions dataset: s3://bucket/prefix or a local folder."),
    keep_versions: int = typer.Option(..., "--keep-versions", min=1, help="Newest versions to keep, with all they use."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be removed; remove nothing."),
    min_age: float = typer.Option(3600.0, help="Seconds an unreferenced file must be old before it is removed."),
    endpoint_url: str = typer.Option(None, help="S3-compatible endpoint (also AWS_ENDPOINT_URL)."),
) -> None:
    """Remove older versions' manifests and every shard, table and staging file no kept version refers to; never
    what a running ingest or score uses. Prints what it removed and the bytes freed."""
    from pipeline import StorageError
    from pipeline.storage import Storage, parse_uri
    from pipeline.versioned import collect_garbage

    storage, root = Storage(endpoint_url), parse_uri(dst)
    try:
        storage.check_access(root)
        report = collect_garbage(root, storage, keep_versions, dry_run=dry_run, min_age_s=min_age)
    except StorageError as error:
        typer.echo(f"gc failed: {error}", err=True)
        raise typer.Exit(code=2) from None
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


@app.command("train")
def train_command(
    data: str = typer.Option(..., help="Clip dataset: DST or DST@VERSION (s3://... or a local folder)."),
    model_name: str = typer.Option("uniformerv2_b16", "--model", help="Named configuration (see `uniformer models`)."),
    overrides: list[str] = typer.Option([], "--set", help="Model option override KEY=VALUE, e.g. --set no_lmhra=True."),
    pretrained: str = typer.Option(None, help="Initial weights: CLIP / timm / official / MMAction2 checkpoint file."),
    val_data: str = typer.Option(None, "--val", help="Validation dataset DST[@VERSION]; default: a held-out split."),
    val_fraction: float = typer.Option(0.2, help="Share of videos held out for validation when --val is not given."),
    workers: int = typer.Option(1, help="Ray Train workers (one per GPU with --gpu)."),
    gpu: bool = typer.Option(False, "--gpu", help="One GPU per worker, NCCL; otherwise CPU workers with gloo."),
    cpus_per_worker: float = typer.Option(1.0, help="CPUs reserved per training worker."),
    placement_strategy: str = typer.Option(
        "PACK", help="Where workers go: PACK fills nodes, SPREAD puts them on different nodes when it can."
    ),
    epochs: int = typer.Option(10),
    batch_size: int = typer.Option(8, help="Clips per worker per micro-step."),
    grad_accum: int = typer.Option(1, help="Micro-steps per optimizer step."),
    lr: float = typer.Option(4e-4),
    min_lr: float = typer.Option(1e-6),
    weight_decay: float = typer.Option(0.05),
    warmup_epochs: float = typer.Option(1.0),
    label_smoothing: float = typer.Option(0.0),
    hflip: bool = typer.Option(True, "--hflip/--no-hflip", help="Random horizontal flips (off for left/right classes)."),
    augment: str = typer.Option(
        "recipe", help="recipe: RandAugment m7 n4 + RandomResizedCrop + flip (the paper's); crop: random crop + flip."
    ),
    grad_clip: float = typer.Option(1.0, help="Max gradient norm; 0 disables clipping."),
    precision: str = typer.Option("bf16", help="bf16 | fp16 | fp32 (autocast applies on CUDA)."),
    activation_checkpointing: bool = typer.Option(False, "--activation-checkpointing"),
    compile_blocks: str = typer.Option(
        "auto", "--compile", help="torch.compile each block: on | off | auto (on with CUDA)."
    ),
    log_every: int = typer.Option(10, help="Optimizer steps between reading step metrics back from the device."),
    seed: int = typer.Option(0),
    checkpoint_every: int = typer.Option(0, help="Optimizer steps between checkpoints; 0 = each epoch end."),
    keep_checkpoints: int = typer.Option(2),
    max_failures: int = typer.Option(3, help="Automatic restarts after worker or node loss (-1: forever)."),
    max_steps: int = typer.Option(None, help="Stop after this many optimizer steps."),
    select: str = typer.Option("best", help="Checkpoint to register: best (validation top-1 at an epoch end) | last."),
    storage: str = typer.Option("./runs", help="Checkpoint storage: local folder or s3://bucket/prefix."),
    run_name: str = typer.Option(None, help="Ray Train run name; default derived from the options (same command = same run)."),
    experiment: str = typer.Option("uniformerv2", help="MLflow experiment."),
    register_as: str = typer.Option(None, help="Register the final model under this MLflow model name."),
    endpoint_url: str = typer.Option(None, help="S3-compatible endpoint (also AWS_ENDPOINT_URL)."),
) -> None:
    """Train UniFormerV2 with Ray Train; resumes automatically from the last checkpoint in --storage."""
    from jobs.train import run_train
    from jobs.training.config import TrainConfig

    config = TrainConfig(
        data=data, model=model_name, model_overrides=_parse_overrides(overrides), pretrained=pretrained,
        val_data=val_data, val_fraction=val_fraction, workers=workers, use_gpu=gpu, cpus_per_worker=cpus_per_worker,
        placement_strategy=placement_strategy,
        epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, lr=lr, min_lr=min_lr, weight_decay=weight_decay,
        warmup_epochs=warmup_epochs, label_smoothing=label_smoothing, hflip=hflip, augment=augment, grad_clip=grad_clip,
        precision=precision,
        activation_checkpointing=activation_checkpointing, compile=compile_blocks, log_every=log_every, seed=seed,
        checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints, max_failures=max_failures,
        max_steps=max_steps, select=select, storage=storage,
        run_name=run_name, experiment=experiment, register_as=register_as, endpoint_url=endpoint_url,
    )
    result = run_train(config)
    typer.echo(f"run {result.run_name} (mlflow {result.mlflow_run_id}) checkpoint {result.checkpoint}")
    if result.registered_version is not None:
        typer.echo(f"registered {register_as} version {result.registered_version}")


@app.command("register")
def register_command(
    run: str = typer.Option(..., help="Ray Train run name (printed by `uniformer train`)."),
    storage: str = typer.Option("./runs", help="The checkpoint storage the run used."),
    register_as: str = typer.Option(None, help="Model name; default: the run's --register-as."),
    tracking_uri: str = typer.Option(None, help="MLflow tracking URI; default: MLFLOW_TRACKING_URI or the run's."),
    endpoint_url: str = typer.Option(None, help="S3-compatible endpoint for s3:// storage."),
) -> None:
    """Log and register the final model of a finished training run (after MLflow was unreachable at its end)."""
    from jobs.train import register_run

    model_uri, version = register_run(run, storage, register_as, tracking_uri, endpoint_url)
    typer.echo(f"logged {model_uri}" + (f", registered version {version}" if version is not None else ""))


@app.command("retrain")
def retrain_command(
    source: str = typer.Option(..., help="Raw videos (s3://... or a folder); what is new is ingested."),
    dataset: str = typer.Option(..., help="The clip dataset to grow (DST)."),
    model_name: str = typer.Option(..., help="Registered model name; its `champion` alias is gated."),
    val: str = typer.Option(..., help="Fixed validation dataset DST[@VERSION] for candidate and champion."),
    min_gain: float = typer.Option(0.0, help="What the candidate must gain over the champion to be promoted."),
    gate_metric: str = typer.Option(
        "accuracy", help="Gate figure: accuracy (top-1) | top5_accuracy | mean_class_accuracy."
    ),
    gate_views: str = typer.Option("4x3", help="Views the gate evaluates at: the ones scoring uses."),
    init: str = typer.Option("champion", help="Candidate starts from the champion's weights or from --pretrained."),
    labels: str = typer.Option(None, help="Labels CSV for the new videos."),
    labels_from_dirs: bool = typer.Option(False, "--labels-from-dirs", help="Labels from parent folder names."),
    retry_errors: bool = typer.Option(
        False, "--retry-errors", help="Ingest: decode again the videos that failed before, though unchanged."
    ),
    frames: int = typer.Option(8),
    size: int = typer.Option(224),
    short_side: int = typer.Option(256),
    model_config: str = typer.Option("uniformerv2_b16", "--model", help="Named configuration of the candidate."),
    overrides: list[str] = typer.Option([], "--set", help="Model option override KEY=VALUE."),
    pretrained: str = typer.Option(None, help="Initial weights when --init pretrained (or no champion yet)."),
    workers: int = typer.Option(1),
    gpu: bool = typer.Option(False, "--gpu"),
    epochs: int = typer.Option(10),
    batch_size: int = typer.Option(8),
    lr: float = typer.Option(4e-4),
    hflip: bool = typer.Option(True, "--hflip/--no-hflip"),
    storage: str = typer.Option("./runs", help="Checkpoints and the promotion lock (local folder or s3://)."),
    experiment: str = typer.Option("uniformerv2-retrain"),
    endpoint_url: str = typer.Option(None, help="S3-compatible endpoint (also AWS_ENDPOINT_URL)."),
) -> None:
    """Ingest new videos, train a candidate, promote it to `champion` only if it beats the champion."""
    from jobs.retrain import run_retrain
    from jobs.training.config import TrainConfig

    train = TrainConfig(
        data=dataset, model=model_config, model_overrides=_parse_overrides(overrides), pretrained=pretrained,
        workers=workers, use_gpu=gpu, epochs=epochs, batch_size=batch_size, lr=lr, hflip=hflip, storage=storage,
        experiment=experiment, endpoint_url=endpoint_url,
    )
    ingest = dict(labels_csv=labels, labels_from_dirs=labels_from_dirs, frames=frames, size=size, short_side=short_side,
                  retry_errors=retry_errors)
    result = run_retrain(source, dataset, model_name, val, min_gain=min_gain, init=init, train=train,
                         ingest_options=ingest, endpoint_url=endpoint_url, gate_views=gate_views,
                         gate_metric=gate_metric)
    if result.decision is None:
        typer.echo("nothing new to train on")


@app.command("demo")
def demo_command(
    workdir: str = typer.Option("demo-output", help="Where videos, clips, runs, scores and mlflow.db go."),
    size: str = typer.Option("default", help="default (shows learning) or small (a quick smoke run)."),
    workers: int = typer.Option(2, help="Ray Train workers."),
) -> None:
    """Run ingest, train, register, score and a gated retrain end to end on embedded defaults."""
    from jobs.demo import run_demo

    run_demo(workdir, size, workers)


@app.command("submit", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
def submit_command(
    job: str = typer.Argument(..., help="The uniformer command to run on the cluster (ingest, train, score, ...)."),
    args: list[str] = typer.Argument(None, help="Its options and arguments, as for a local run."),
    address: str = typer.Option(None, help="Ray dashboard http://HEAD:8265; default: RAY_ADDRESS."),
    wait: bool = typer.Option(False, "--wait", help="Follow the job's logs and exit with its outcome."),
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
    from jobs.submit import SubmitError, connect, follow, submit

    shipped = {"auto": True, "none": None}.get(working_dir, working_dir)
    try:
        client = connect(address)
        submission = submit(job, args or [], client=client, working_dir=shipped, pip=pip, env=env,
                            submission_id=job_id)
    except SubmitError as error:
        typer.echo(f"submit failed: {error}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(f"submitted {submission.job_id} to {submission.address}: {submission.entrypoint}")
    if not wait:
        typer.echo(f"follow it with: ray job logs --follow {submission.job_id} --address {submission.address}")
        return
    status = follow(client, submission.job_id)
    typer.echo(f"job {submission.job_id} {status.value}")
    raise typer.Exit(code=0 if status.value == "SUCCEEDED" else 1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
