"""The `uniformer` command itself: its version."""

from importlib.metadata import version

from typer.testing import CliRunner

from jobs.cli import app


def test_version_is_the_installed_distributions():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"uniformer {version('uniformer-pipeline')}"
