"""Batch scoring end to end on real components: a real `mlflow server` registry, the S3-compatible server, local Ray,
real mp4 files, a registered UniFormerV2 logged the way training logs it."""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

import model
from jobs.cli import app
from jobs.options import ScoreConfig, ScoreOptions
from jobs.registry import ModelReferenceError, log_model, resolve_model
from jobs.score import run_score, score_dataset
from model.package import ModelCard, save_package
from model.transforms import eval_transform
from pipeline import Storage, generate_motion_dataset, parse_uri, write_motion_video
from pipeline.dataset.sources import read_sources
from pipeline.predictions import ScoreConfigError, latest_score_manifest, read_predictions
from pipeline.storage import StorageError
from pipeline.views import decode_views
from tests.conftest import ignore_conditional_writes, kill_driver_after_first_part

pytestmark = pytest.mark.integration

CLASSES = ["down", "left", "right", "up"]
CARD = ModelCard("uniformerv2_tiny", 4, {"t_size": 8}, CLASSES, frames=8, crop_size=32, short_side=40)
VIEWS = (2, 3)


def tiny_net(seed: int):
    torch.manual_seed(seed)
    return model.create_model(CARD.model, CARD.num_classes, **CARD.overrides).eval()


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> dict[int, Path]:
    """Two random-initialised tiny models saved as packages (model.save_package): version 1 and version 2."""
    root = tmp_path_factory.mktemp("packages")
    folders = {}
    for version, seed in ((1, 0), (2, 1)):
        folders[version] = root / f"v{version}"
        save_package(tiny_net(seed), CARD, folders[version])
    return folders


@pytest.fixture(scope="module")
def registered(packages, mlflow_server) -> str:
    """Both packages logged and registered through training's code path; alias `champion` on version 1."""
    name = f"actions-{uuid.uuid4().hex[:8]}"
    client = mlflow.MlflowClient(mlflow_server.uri)
    experiment = client.create_experiment(f"score-tests-{uuid.uuid4().hex[:8]}")
    for version in (1, 2):
        run_id = client.create_run(experiment).info.run_id
        _, registered_version = log_model(
            run_id, str(packages[version] / "model.safetensors"), CARD, mlflow_server.uri, register_as=name
        )
        client.set_terminated(run_id)
        assert registered_version == version
    client.set_registered_model_alias(name, "champion", "1")
    return name


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """Six tiny landscape videos (the three crops differ), one folder per class."""
    folder = tmp_path_factory.mktemp("videos") / "archive"
    generate_motion_dataset(folder, 1, classes=("left", "right", "up"), size=(64, 48), num_frames=16, seed=3)
    generate_motion_dataset(folder, 1, classes=("down", "left", "up"), size=(64, 48), num_frames=12, seed=4,
                            layout="flat", write_labels_csv=False)
    (folder / "labels.csv").unlink()
    return folder


def expected_probs(net, path) -> np.ndarray:
    """The multi-view average computed directly: decode_views, the net, softmax, mean over views."""
    views, _ = decode_views(path, CARD.frames, CARD.crop_size, *VIEWS)
    with torch.no_grad():
        logits = net(eval_transform(torch.from_numpy(views), CARD.crop_size))
    return torch.softmax(logits, dim=-1).mean(dim=0).numpy()


def assert_rows_match_the_net(rows: list[dict], net, local_path) -> None:
    for row in rows:
        want = expected_probs(net, local_path(row))
        np.testing.assert_allclose(row["probs"], want, atol=2e-5)
        order = np.argsort(-want, kind="stable")[:3]
        assert row["top_k_ids"] == order.tolist()
        assert row["top_k_names"] == [CLASSES[i] for i in order]
        np.testing.assert_allclose(row["top_k_probs"], want[order], atol=2e-5)


def test_registered_alias_scores_s3_videos_like_the_model_run_directly(
    s3_server, s3_bucket, registered, mlflow_server, videos, tmp_path, broken_video, ray_local
):
    archive = tmp_path / "upload"
    shutil.copytree(videos, archive)
    broken_video(archive / "broken" / "truncated.mp4", "truncated")
    broken_video(archive / "broken" / "notes.mp4", "text")
    s3_server.upload_folder(archive, s3_bucket, "archive")
    src, dst = f"s3://{s3_bucket}/archive", f"s3://{s3_bucket}/scores"

    summary = run_score(
        ScoreConfig(
            src,
            dst,
            f"models:/{registered}@champion",
            views="2x3",
            top_k=3,
            full_probs=True,
            tracking_uri=mlflow_server.uri,
            endpoint_url=s3_server.endpoint_url,
            options=ScoreOptions(batch_size=2),
        )
    )

    assert (summary.listed, summary.scored, summary.already_done, summary.errored) == (8, 6, 0, 2)
    assert summary.model.version == 1 and summary.model.alias == "champion"
    storage = Storage(s3_server.endpoint_url)
    rows = read_predictions(dst, storage).to_pylist()
    assert sorted(row["video_id"] for row in rows) == sorted(
        path.relative_to(videos).as_posix() for path in videos.rglob("*.mp4")
    )
    version = mlflow.MlflowClient(mlflow_server.uri).get_model_version(registered, "1")
    for row in rows:
        assert (row["model_name"], row["model_version"], row["model_alias"]) == (registered, 1, "champion")
        assert row["model_run_id"] == version.run_id and row["model_id"].startswith("m-")
        assert row["source_uri"] == f"{src}/{row['video_id']}" and row["source_etag"] and row["scored_at"]
    assert_rows_match_the_net(rows, tiny_net(0), lambda row: videos / row["video_id"])

    # Broken files are reported, with the stage that failed, and did not stop the others.
    errors_location = parse_uri(summary.errors_uri)
    errors = pq.read_table(storage.arrow_path(errors_location), filesystem=storage.arrow_filesystem(errors_location))
    assert sorted(errors.column("source_uri").to_pylist()) == [f"{src}/broken/notes.mp4", f"{src}/broken/truncated.mp4"]
    assert set(errors.column("stage").to_pylist()) == {"decode"}
    assert all(message for message in errors.column("message").to_pylist())
    manifest = latest_score_manifest(parse_uri(dst), storage)
    assert manifest.counts["errored"] == 2 and manifest.model["version"] == 1 and manifest.num_rows == 6
    assert manifest.params["temporal_views"] == 2 and manifest.params["spatial_views"] == 3
    assert manifest.throughput["videos"] == 8 and manifest.throughput["videos_per_s"] > 0
    # the first prediction counts from the job's start, before the Ray phase its startup counts from
    assert manifest.throughput["first_prediction_seconds"] > manifest.throughput["startup_seconds"] > 0


def test_alias_moved_during_a_run_does_not_change_the_version_used_and_the_next_run_follows_it(
    registered, mlflow_server, videos, packages, tmp_path, ray_local
):
    client = mlflow.MlflowClient(mlflow_server.uri)
    dst = str(tmp_path / "scores")
    champion = ScoreConfig(str(videos), dst, f"models:/{registered}@champion", views="2x3", top_k=3, full_probs=True,
                           tracking_uri=mlflow_server.uri)
    moved = []

    def echo(line: str) -> None:
        if not moved:  # the first line comes once the model is resolved, before any video is scored
            client.set_registered_model_alias(registered, "champion", "2")
            moved.append(line)

    try:
        summary = run_score(champion, echo=echo)
        assert moved and "version 1" in moved[0]
        assert client.get_model_version_by_alias(registered, "champion").version == "2"
        rows = read_predictions(dst).to_pylist()
        assert summary.scored == 6 and {row["model_version"] for row in rows} == {1}
        assert_rows_match_the_net(rows, tiny_net(0), lambda row: row["source_uri"])
        v2 = expected_probs(tiny_net(1), rows[0]["source_uri"])
        assert np.abs(np.asarray(rows[0]["probs"]) - v2).max() > 1e-3  # the versions are told apart

        # The alias now names version 2: the same command scores every video again with it, into the next version
        lines = []
        moved_on = run_score(champion, echo=lines.append)
        assert (moved_on.scored, moved_on.already_done, moved_on.manifest_version) == (6, 0, 2)
        assert any("succeeds it: every listed video is scored again" in line for line in lines), lines
        current = read_predictions(dst).to_pylist()
        assert {row["model_version"] for row in current} == {2} and len(current) == 6
        assert_rows_match_the_net(current, tiny_net(1), lambda row: row["source_uri"])
        # readers follow the destination; version 1's predictions stay readable by number until gc
        assert {row["model_version"] for row in read_predictions(f"{dst}@1").to_pylist()} == {1}
        # a week later, nothing new for the same champion
        again = run_score(champion, echo=lambda line: None)
        assert (again.scored, again.already_done, again.manifest_written) == (0, 6, False)
        # another model (here a package that is no version of this registered model) is not mixed in
        with pytest.raises(ScoreConfigError, match="One destination follows one registered model"):
            run_score(
                ScoreConfig(str(videos), dst, str(packages[1]), views="2x3", top_k=3, full_probs=True),
                echo=lambda line: None,
            )
        with pytest.raises(ScoreConfigError, match="no predictions version 7"):
            read_predictions(f"{dst}@7")
    finally:
        client.set_registered_model_alias(registered, "champion", "1")


def test_logged_model_id_and_version_resolve_to_the_same_package(registered, mlflow_server, packages, tmp_path):
    client = mlflow.MlflowClient(mlflow_server.uri)
    by_version = resolve_model(f"models:/{registered}/2", str(tmp_path / "a"), mlflow_server.uri)
    logged_id = by_version.identity.model_id
    by_id = resolve_model(f"models:/{logged_id}", str(tmp_path / "b"), mlflow_server.uri)
    local = resolve_model(str(packages[2]), str(tmp_path / "c"))
    assert by_version.identity.package_sha256 == by_id.identity.package_sha256 == local.identity.package_sha256
    assert by_version.identity.run_id == by_id.identity.run_id == client.get_model_version(registered, "2").run_id
    assert by_id.identity.version is None and by_version.identity.version == 2
    assert by_version.card == CARD

    with pytest.raises(ModelReferenceError, match="nobody"):
        resolve_model(f"models:/{registered}@nobody", str(tmp_path / "d"), mlflow_server.uri)
    with pytest.raises(ModelReferenceError, match="not a model package folder"):
        resolve_model(str(tmp_path), str(tmp_path / "e"))
    with pytest.raises(ModelReferenceError, match="models:/NAME@ALIAS"):
        resolve_model("models:/a/b/c", str(tmp_path / "f"), mlflow_server.uri)


def test_rerun_scores_only_new_and_changed_videos(packages, tmp_path, ray_local):
    src, dst = tmp_path / "videos", str(tmp_path / "scores")
    for index in range(4):
        write_motion_video(src / f"v{index}.mp4", CLASSES[index], size=(40, 40), num_frames=12, seed=index)
    first = run_score(ScoreConfig(str(src), dst, str(packages[1]), views="1x1", top_k=2))
    assert (first.scored, first.model.version, first.model.name) == (4, None, "v1")
    before = {row["video_id"]: row for row in read_predictions(dst).to_pylist()}

    write_motion_video(src / "v4.mp4", "left", size=(40, 40), num_frames=12, seed=9)  # new
    time.sleep(0.01)
    write_motion_video(src / "v1.mp4", "up", size=(40, 40), num_frames=12, seed=10)  # replaced in place
    second = run_score(ScoreConfig(str(src), dst, str(packages[1]), views="1x1", top_k=2))
    assert (second.listed, second.scored, second.already_done, second.errored) == (5, 2, 3, 0)

    rows = {row["video_id"]: row for row in read_predictions(dst).to_pylist()}
    assert sorted(rows) == [f"v{i}.mp4" for i in range(5)]  # each video once: the old v1 row is gone
    assert rows["v1.mp4"]["source_etag"] != before["v1.mp4"]["source_etag"]
    assert rows["v0.mp4"]["scored_at"] == before["v0.mp4"]["scored_at"]  # not scored again
    assert len(rows["v4.mp4"]["top_k_ids"]) == 2 and "probs" not in rows["v4.mp4"]

    with pytest.raises(ScoreConfigError, match="views|temporal_views"):
        run_score(ScoreConfig(str(src), dst, str(packages[1]), views="2x1", top_k=2))


def test_a_destination_that_ignores_conditional_writes_is_refused_before_any_work(
    s3_server, s3_bucket, packages, videos, monkeypatch
):
    ignored = ignore_conditional_writes(monkeypatch, "if_absent")
    with pytest.raises(StorageError, match="ignores If-None-Match"):
        run_score(
            ScoreConfig(str(videos), f"s3://{s3_bucket}/scores", str(packages[1]), endpoint_url=s3_server.endpoint_url)
        )
    assert ignored  # the store really replaced an object an if-absent write found there
    assert "Contents" not in s3_server.client().list_objects_v2(Bucket=s3_bucket)


def test_score_dataset_is_a_ray_dataset_of_rows_with_errors_inline(packages, videos, tmp_path, broken_video, ray_local):
    src = tmp_path / "videos"
    shutil.copytree(videos, src)
    broken_video(src / "zero.mp4", "zero_byte")
    dataset = score_dataset(str(src), str(packages[1]), views="1x3", top_k=1)
    rows = dataset.take_all()
    assert len(rows) == 7
    failed = [row for row in rows if row["error_type"] is not None]
    assert [row["video_id"] for row in failed] == ["zero.mp4"] and failed[0]["top_k_ids"] is None
    assert all(len(row["top_k_ids"]) == 1 and row["model_name"] == "v1" for row in rows if row not in failed)


def test_killed_run_resumes_without_duplicates(packages, tmp_path, ray_local):
    src, dst = tmp_path / "videos", tmp_path / "scores"
    generate_motion_dataset(src, 5, size=(40, 40), num_frames=12, seed=5, write_labels_csv=False)  # 20 videos
    address = ray_local.get_runtime_context().gcs_address
    script = (
        "import sys; from jobs.options import ScoreConfig, ScoreOptions; from jobs.score import run_score; "
        "run_score(ScoreConfig(sys.argv[1], sys.argv[2], sys.argv[3], views='2x3', options=ScoreOptions(batch_size=1)), "
        "videos_per_shard=1)"
    )
    published = kill_driver_after_first_part(
        script, [str(src), str(dst), str(packages[1])], address, dst / "predictions"
    )
    assert not (dst / "manifests").exists(), "the run finished before it could be killed"
    assert 1 <= len(published) < 20

    summary = run_score(ScoreConfig(str(src), str(dst), str(packages[1]), views="2x3"), videos_per_shard=1)
    assert (summary.scored, summary.errored) == (20, 0)
    assert summary.shards_adopted >= len(published)
    assert summary.shards_adopted + summary.shards_written == 20
    rows = read_predictions(str(dst), columns=["video_id"]).column("video_id").to_pylist()
    assert sorted(rows) == sorted(path.relative_to(src).as_posix() for path in src.rglob("*.mp4"))


def test_cli_scores_a_folder_and_refuses_usage_errors(packages, videos, tmp_path, ray_local):
    runner = CliRunner()
    dst = str(tmp_path / "scores")
    result = runner.invoke(app, ["score", str(videos), "--model", str(packages[2]), "--out", dst,
                                 "--views", "1x1", "--top-k", "2", "--batch-size", "3"])
    assert result.exit_code == 0, result.output
    assert "score summary" in result.output and "scored" in result.output
    assert len(read_predictions(dst)) == 6

    result = runner.invoke(app, ["score", str(videos), "--model", str(packages[2]), "--out", dst, "--views", "4"])
    assert result.exit_code == 2 and "TEMPORALxSPATIAL" in result.output
    result = runner.invoke(app, ["score", str(videos), "--model", str(tmp_path / "nothing"), "--out", dst])
    assert result.exit_code == 1 and "not a model package folder" in result.output


def test_failed_videos_are_remembered_and_a_rerun_with_nothing_new_writes_no_version(
    packages, tmp_path, broken_video, ray_local
):
    src, dst = tmp_path / "videos", str(tmp_path / "scores")
    write_motion_video(src / "good.mp4", "left", size=(40, 40), num_frames=12, seed=1)
    broken_video(src / "broken.mp4", "truncated")
    first = run_score(ScoreConfig(str(src), dst, str(packages[1]), views="1x1", top_k=2))
    assert (first.scored, first.errored, first.manifest_version) == (1, 1, 1)

    lines = []
    again = run_score(ScoreConfig(str(src), dst, str(packages[1]), views="1x1", top_k=2), echo=lines.append)
    assert (again.scored, again.already_done, again.known_failures, again.errored) == (0, 1, 1, 0)
    assert not again.manifest_written and "nothing new: 2 listed, 1 already scored, 1 known failures" in lines
    assert any("0 to score" in line for line in lines)  # the broken video was not decoded again

    retried = run_score(ScoreConfig(str(src), dst, str(packages[1]), views="1x1", top_k=2, retry_errors=True))
    assert (retried.errored, retried.known_failures, retried.manifest_written) == (1, 0, False)

    write_motion_video(src / "broken.mp4", "up", size=(40, 40), num_frames=12, seed=2)  # replaced: a new ETag
    fixed = run_score(ScoreConfig(str(src), dst, str(packages[1]), views="1x1", top_k=2))
    assert (fixed.scored, fixed.errored, fixed.manifest_version, fixed.errors_uri) == (1, 0, 2, None)
    assert sorted(read_predictions(dst, columns=["video_id"]).column("video_id").to_pylist()) == [
        "broken.mp4", "good.mp4"
    ]


def test_predictions_of_videos_deleted_from_the_source_leave_the_next_version_unless_kept(
    packages, tmp_path, ray_local
):
    src, dst = tmp_path / "videos", str(tmp_path / "scores")
    for index in range(3):
        write_motion_video(src / f"v{index}.mp4", CLASSES[index], size=(40, 40), num_frames=12, seed=index)
    run_score(
        ScoreConfig(str(src), dst, str(packages[1]), views="1x1", top_k=2), videos_per_shard=3
    )  # one shard of 3 videos
    (src / "v1.mp4").unlink()

    kept = CliRunner().invoke(app, ["score", str(src), "--model", str(packages[1]), "--out", dst, "--views", "1x1",
                                    "--top-k", "2", "--keep-deleted"])
    assert kept.exit_code == 3, kept.output  # nothing new: the deleted video's predictions stay
    assert "nothing new: 2 listed, 2 already scored, 0 known failures" in kept.output

    dropped = run_score(ScoreConfig(str(src), dst, str(packages[1]), views="1x1", top_k=2))
    assert (dropped.already_done, dropped.deleted, dropped.manifest_version) == (2, 1, 2)
    assert sorted(read_predictions(dst, columns=["video_id"]).column("video_id").to_pylist()) == ["v0.mp4", "v2.mp4"]
    latest = latest_score_manifest(parse_uri(dst), Storage())
    assert sorted(read_sources(parse_uri(dst), latest, Storage()).to_dict()) == ["v0.mp4", "v2.mp4"]
