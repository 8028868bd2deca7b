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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
