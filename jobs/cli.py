"""The `uniformer` command line: parses options and calls the job modules, nothing more."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Distributed video training pipeline for UniFormerV2: ingest videos, train, score archives, retrain.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main_options() -> None:
    """Each sub-command is one job; `uniformer COMMAND --help` explains its options."""


@app.command("models")
def models_command() -> None:
    """List the named model configurations with their parameter counts."""
    import model

    rows = [(name, model.count_parameters(name)) for name in model.list_models()]
    width = max(len(name) for name, _ in rows)
    typer.echo(f"{'name':<{width}}  {'params (400 classes)':>22}")
    for name, params in rows:
        typer.echo(f"{name:<{width}}  {params / 1e6:>20.1f} M")


@app.command("ingest")
def ingest_command(
    src: str = typer.Argument(..., help="Videos: s3://bucket/prefix or a local folder."),
    out: str = typer.Option(..., "--out", help="Clip dataset: s3://bucket/prefix or a local folder."),
    labels: str = typer.Option(None, "--labels", help="CSV 'path,label' with paths relative to SRC."),
    labels_from_dirs: bool = typer.Option(False, "--labels-from-dirs", help="Label = parent folder (Kinetics layout)."),
    frames: int = typer.Option(8, help="Frames per clip."),
    size: int = typer.Option(224, help="Model input (crop) size recorded in the manifest; <= --short-side."),
    short_side: int = typer.Option(256, help="Stored square side: short side resized to it, then centre-cropped."),
    clips_per_video: int = typer.Option(1, help="Clips per video, at spread temporal offsets."),
    sampling: str = typer.Option("uniform", help="uniform (TSN segments) | dense (frames --stride apart)."),
    stride: int = typer.Option(16, help="Frame stride for dense sampling."),
    endpoint_url: str = typer.Option(None, help="S3-compatible endpoint (also AWS_ENDPOINT_URL)."),
) -> None:
    """Decode sampled clips of every new video under SRC into a sharded Parquet clip dataset with a manifest."""
    from jobs.ingest import run_ingest
    from pipeline import LabelsError, ManifestError, StorageError

    if sampling not in ("uniform", "dense"):
        raise typer.BadParameter("must be 'uniform' or 'dense'", param_hint="--sampling")
    try:
        run_ingest(
            src,
            out,
            labels_csv=labels,
            labels_from_dirs=labels_from_dirs,
            frames=frames,
            size=size,
            short_side=short_side,
            clips_per_video=clips_per_video,
            sampling=sampling,
            stride=stride,
            endpoint_url=endpoint_url,
            echo=typer.echo,
        )
    except (StorageError, LabelsError, ManifestError, ValueError) as error:
        typer.echo(f"ingest failed: {error}", err=True)
        raise typer.Exit(code=2) from None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
