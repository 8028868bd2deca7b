"""The registered pyfunc as a serving client meets it: videos as bytes or URIs, predicted as `uniformer score` and
`uniformer predict` predict them (same decoding, same views, same probabilities), clips of any size, top-k rows with
class names, a bad video's error in its own row; and `mlflow models serve` answering a POST of a video's bytes."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import warnings

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

import model
from jobs.predict import predict_videos
from jobs.registry import log_model
from model.inference import predict_views
from pipeline.decode import resize_center_crop
from tests.jobs.test_predict import CARD, CLASSES, package, videos  # noqa: F401 (fixtures)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def registered(package, mlflow_server) -> str:  # noqa: F811
    """The tiny package registered as a new model: its `models:/NAME/1`."""
    name = f"serving-{uuid.uuid4().hex[:8]}"
    client = mlflow.MlflowClient(mlflow_server.uri)
    run_id = client.create_run(client.create_experiment(name)).info.run_id
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log_model(run_id, str(package / "model.safetensors"), CARD, mlflow_server.uri, register_as=name)
    assert not [w for w in caught if "Operation with range" in str(w.message)]  # MLflow's, silenced where it logs
    return f"models:/{name}/1"


@pytest.fixture(scope="module")
def served(registered, mlflow_server):
    mlflow.set_tracking_uri(mlflow_server.uri)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = mlflow.pyfunc.load_model(registered)
    assert not [w for w in caught if "type hints" in str(w.message)], [str(w.message) for w in caught]
    return loaded


def test_the_logged_example_is_a_short_video_that_the_model_answers_at_one_view(registered, served):
    local = mlflow.artifacts.download_artifacts(registered)
    logged = mlflow.models.Model.load(local)
    example, params = logged.load_input_example(local), logged.load_input_example_params(local)
    # one view: MLflow predicts the example as it logs the model, and 4x3 cost a B/16 registration half a minute
    assert params == {"views": "1x1"} and list(example.columns) == ["video"] and len(example) == 1
    [row] = served.predict(example, params=params).to_dict("records")
    assert row["error"] is None and len(row["top_k_names"]) == len(CLASSES)


def predicted(package, paths) -> list:  # noqa: F811
    """What `uniformer predict` says of each video, at its default views, with every class."""
    _, predictions = predict_videos([str(path) for path in paths], str(package), top_k=len(CLASSES))
    return list(predictions)


def test_videos_as_bytes_or_paths_get_the_probabilities_predict_gives_and_a_bad_one_its_error(
    served, package, videos  # noqa: F811
):
    expected = predicted(package, videos)
    contents = [path.read_bytes() for path in videos]
    as_bytes = served.predict(pd.DataFrame({"video": [contents[0], b"not a video at all", contents[1]]}))
    as_paths = served.predict([str(videos[0]), str(videos[1])], params={"top_k": 2, "full_probs": True})
    # text that is not base64 (what JSON carries for bytes) is its row's error, not the request's
    as_text = served.predict(pd.DataFrame({"video": [base64.b64encode(contents[0]).decode(), "not base64!"]}))
    assert as_text["error"][0] is None and as_text["top_k_names"][0] == [top["name"] for top in expected[0].top_k]
    assert as_text["error"][1].startswith("read: UnreadableInput: the video column is not base64")

    assert list(as_bytes.columns) == ["top_k_ids", "top_k_names", "top_k_probs", "error"]
    assert as_bytes["error"][1].startswith("decode: VideoDecodeError: cannot open as a video")
    assert as_bytes["top_k_ids"][1] is None and as_bytes["error"][0] is None and as_bytes["error"][2] is None
    for (_, row), want in zip(as_bytes.iloc[[0, 2]].iterrows(), expected):
        assert row["top_k_ids"] == [top["id"] for top in want.top_k][:4]
        assert row["top_k_names"] == [top["name"] for top in want.top_k] == [CLASSES[i] for i in row["top_k_ids"]]
        np.testing.assert_allclose(row["top_k_probs"], [top["prob"] for top in want.top_k], atol=1e-6)
    for (_, row), want in zip(as_paths.iterrows(), expected):
        assert row["top_k_names"] == [top["name"] for top in want.top_k][:2] and row["error"] is None
        full = {top["id"]: top["prob"] for top in want.top_k}
        np.testing.assert_allclose(row["probs"], [full[i] for i in range(len(CLASSES))], atol=1e-6)
    # the views a call names are the ones it is predicted at, as `--views` is
    _, one_view = predict_videos([str(videos[0])], str(package), views="1x1", top_k=1)
    assert served.predict([contents[0]], params={"views": "1x1", "top_k": 1})["top_k_names"][0] == [
        top["name"] for top in next(one_view).top_k]


def test_clips_of_any_size_are_brought_to_the_stored_format_and_a_missing_path_is_its_rows_error(
    served, package, videos, tmp_path, monkeypatch  # noqa: F811
):
    net, card = model.load_package(package / "model.safetensors", package / "model_config.json")
    rng = np.random.default_rng(5)
    stored = rng.integers(0, 256, (2, card.frames, card.short_side, card.short_side, 3), dtype=np.uint8)
    other = rng.integers(0, 256, (2, card.frames, 48, 70, 3), dtype=np.uint8)  # not the stored H x W

    rows = served.predict(stored, params={"full_probs": True})
    direct = predict_views(net, torch.from_numpy(stored)[:, None], card.crop_size).numpy()
    np.testing.assert_allclose(np.stack(rows["probs"]), direct, atol=1e-5)  # a stored clip: its centre crop, as before
    rows = served.predict(other, params={"full_probs": True})
    brought = np.stack([resize_center_crop(clip, card.short_side) for clip in other])
    direct = predict_views(net, torch.from_numpy(brought)[:, None], card.crop_size).numpy()
    np.testing.assert_allclose(np.stack(rows["probs"]), direct, atol=1e-5)
    assert [len(names) for names in rows["top_k_names"]] == [4, 4] and rows["error"].isna().all()

    gone = str(tmp_path / "gone.mp4")
    # a `uri` column, or an array of strings (what MLflow makes of JSON `{"inputs": [...]}`)
    for missing in (served.predict(pd.DataFrame({"uri": [gone]})), served.predict(np.array([gone]))):
        assert missing["error"].tolist() == ["read: FileNotFoundError: no such video"]

    # a server that reads URIs only under a prefix: another path is its row's error, read or not
    monkeypatch.setenv("UNIFORMER_ALLOW_URIS", str(videos[0].parents[1]))
    rows = served.predict(pd.DataFrame({"uri": [str(videos[0]), str(package / "model.safetensors")]}))
    assert rows["error"][0] is None and rows["error"][1].startswith("read: UriNotAllowed: not under a prefix")


def test_a_video_on_s3_is_answered_like_its_bytes_with_the_endpoint_from_the_environment(
    served, videos, s3_server, s3_bucket, monkeypatch  # noqa: F811
):
    s3_server.client().upload_file(str(videos[0]), s3_bucket, "archive/clip.mp4")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    remote = served.predict(pd.DataFrame({"uri": [f"s3://{s3_bucket}/archive/clip.mp4",
                                                  f"s3://{s3_bucket}/archive/gone.mp4"]}))
    local = served.predict([videos[0].read_bytes()])
    assert remote["top_k_probs"][0] == local["top_k_probs"][0] and remote["top_k_names"][0] == local["top_k_names"][0]
    assert remote["error"].tolist() == [None, "read: FileNotFoundError: no such video"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_mlflow_models_serve_answers_a_post_of_a_videos_bytes_with_its_top_classes(
    registered, mlflow_server, package, videos, tmp_path  # noqa: F811
):
    port = free_port()
    bin_dir = os.path.dirname(sys.executable)
    # the served code is what the model shipped: no project on the path, another working directory
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", MLFLOW_TRACKING_URI=mlflow_server.uri)
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen(
        [os.path.join(bin_dir, "mlflow"), "models", "serve", "-m", registered, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)  # its own process group: the uvicorn it starts ends with it
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(0.5)
        content = base64.b64encode(videos[0].read_bytes()).decode()
        body = {"dataframe_split": {"columns": ["video"], "data": [[content], [base64.b64encode(b"junk").decode()]]},
                "params": {"top_k": 3}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()
    first, junk = answer["predictions"]
    [want] = predicted(package, videos[:1])
    assert first["top_k_names"] == [top["name"] for top in want.top_k][:3] and first["error"] is None
    np.testing.assert_allclose(first["top_k_probs"], [top["prob"] for top in want.top_k][:3], atol=1e-6)
    assert junk["top_k_names"] is None and junk["error"].startswith("decode: VideoDecodeError")
