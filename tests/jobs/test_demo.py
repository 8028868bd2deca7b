"""The one-command demo (`uniformer demo --json`), end to end at its small size: every stage runs for real on embedded
defaults."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from jobs.cli import app
from pipeline import load_manifest

pytestmark = pytest.mark.integration


def test_small_demo_runs_every_stage_end_to_end(tmp_path, monkeypatch, ray_local):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    caller = tmp_path / "caller"
    caller.mkdir()
    monkeypatch.chdir(caller)
    result = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path / "demo"), "--size", "small", "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)  # the summary alone on stdout; the text, and the jobs' own, on stderr

    assert summary["dataset_versions"] == [1, 2]  # retrain #2 ingested the new videos only
    assert load_manifest(str(tmp_path / "demo" / "clips")).counts["already_done"] == 4 * 24
    assert summary["clips"] == 4 * (24 + 8) and summary["validation_clips"] == 4 * 8
    assert summary["archive_videos_scored"] == 8
    assert summary["champion"] in (1, 2)
    output = result.stderr
    # everything under the workdir, MLflow's artifacts too (beside its database), nothing in the caller's folder
    assert not list(caller.iterdir()) and (tmp_path / "demo" / "mlruns").is_dir()
    assert "demo summary" in output and "mlflow ui --backend-store-uri sqlite:///" in output
    assert "gate decision on v2" in output
