"""The `uniformer` command itself: its version, and how outcomes become exit codes."""

from importlib.metadata import version

import pytest
import typer
from typer.testing import CliRunner

import jobs.cli
from jobs.cli import app
from jobs.exitcodes import ExitCode


def test_version_is_the_installed_distributions():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"uniformer {version('uniformer-pipeline')}"


@pytest.mark.parametrize("scheduled", [True, False])
def test_scheduled_reports_the_outcomes_a_schedule_expects_as_0_and_keeps_every_failure(scheduled):
    # the flag is read by the command that runs after `uniformer`'s own options; `models` is one that needs nothing
    result = CliRunner().invoke(app, ["--scheduled", "models"] if scheduled else ["models"])
    assert result.exit_code == 0, result.output
    expected_zero = {ExitCode.SUCCESS} | ({ExitCode.NOTHING_NEW, ExitCode.REJECTED, ExitCode.PARTIAL} if scheduled
                                         else set())
    for code in ExitCode:
        with pytest.raises(typer.Exit) as exited:
            jobs.cli._exit(code)
        assert exited.value.exit_code == (0 if code in expected_zero else int(code)), code
