"""`uniformer serve`: the registered model behind Ray Serve (real Ray, real `mlflow server`). A POSTed video gets the
top-k `predict` gives it and the version that answered; a garbage video gets its own error while the others of the
request are answered; a malformed request is a 400; and when the alias moves, the replica swaps to the new version
while requests keep coming, none of them failing."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

import mlflow
import numpy as np
import pytest

from jobs.options import ServeConfig
from jobs.predict import predict_videos
from jobs.registry import log_model
from tests.conftest import REPO_ROOT, start_local_ray
from tests.jobs.test_predict import CARD, CLASSES, package, random_package, videos  # noqa: F401 (fixtures)
from tests.jobs.test_serving import free_port

pytestmark = pytest.mark.integration

ALIAS = "live"
POLL_S = 1.0


@pytest.fixture(scope="module")
def other_package(tmp_path_factory):
    """A second tiny package of other weights: its answers differ from the first's."""
    return random_package(tmp_path_factory, "other", 11)


@pytest.fixture(scope="module")
def two_versions(package, other_package, mlflow_server):  # noqa: F811
    """A model with versions 1 (`package`) and 2 (`other_package`), its alias on version 1."""
    name = f"serve-{uuid.uuid4().hex[:8]}"
    client = mlflow.MlflowClient(mlflow_server.uri)
    experiment = client.create_experiment(name)
    for folder in (package, other_package):
        run_id = client.create_run(experiment).info.run_id
        log_model(run_id, str(folder / "model.safetensors"), CARD, mlflow_server.uri, register_as=name)
    client.set_registered_model_alias(name, ALIAS, "1")
    return name


@pytest.fixture(scope="module")
def endpoint(two_versions, mlflow_server, videos, _ray_session_teardown):  # noqa: F811
    from ray import serve

    from jobs.serve import start

    start_local_ray()
    port = free_port()
    config = ServeConfig(model=f"models:/{two_versions}@{ALIAS}", port=port, poll_s=POLL_S, views="1x1",
                         tracking_uri=mlflow_server.uri, allow_uris=str(videos[0].parents[1]))
    lines, environ = [], os.environ.get("MLFLOW_TRACKING_URI")
    try:
        summary = start(config, echo=lines.append)
        assert summary["model"]["version"] == 1 and f"version 1 at http://127.0.0.1:{port}/" in lines[0]
        yield f"http://127.0.0.1:{port}/"
    finally:
        serve.shutdown()
        if environ is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)  # `start` sets it for the replicas
        else:
            os.environ["MLFLOW_TRACKING_URI"] = environ


def post(url: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def expected(folder, paths) -> list[list[dict]]:
    """What `uniformer predict` says of each video at the served views, every class."""
    _, predictions = predict_videos([str(path) for path in paths], str(folder), views="1x1", top_k=len(CLASSES))
    return [prediction.top_k for prediction in predictions]


def encoded(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_a_posted_video_gets_the_top_k_predict_gives_and_a_garbage_one_its_own_error(
    endpoint, package, videos  # noqa: F811
):
    status, answer = post(endpoint, {"videos": [{"video": encoded(videos[0])},
                                                {"video": base64.b64encode(b"garbage, not a video").decode()},
                                                {"uri": str(videos[1])}], "top_k": 2})
    assert status == 200, answer
    assert answer["model"]["version"] == 1 and answer["model"]["alias"] == ALIAS
    first, garbage, by_uri = answer["predictions"]
    for got, want in zip((first, by_uri), expected(package, videos)):
        assert got["error"] is None and [top["name"] for top in got["top_k"]] == [top["name"] for top in want[:2]]
        np.testing.assert_allclose([top["prob"] for top in got["top_k"]], [top["prob"] for top in want[:2]],
                                   atol=1e-6)
    assert garbage["top_k"] is None and garbage["error"].startswith("decode: VideoDecodeError")

    status, answer = post(endpoint, {"videos": [{"video": encoded(videos[0]), "uri": "both"}]})
    assert status == 400 and "videos[0]" in answer["error"]
    status, answer = post(endpoint, {"videos": [{"uri": str(videos[1])}, {"uri": str(package / "model.safetensors")}]})
    assert status == 400 and "videos[1]" in answer["error"] and "--allow-uris" in answer["error"]
    status, answer = post(endpoint, b"{not json")
    assert status == 400 and "not JSON" in answer["error"]
    with urllib.request.urlopen(endpoint, timeout=30) as response:  # GET: the model that answers, no credentials
        described = json.loads(response.read())
    assert described["model"]["version"] == 1 and "127.0.0.1" not in json.dumps(described)


def test_moving_the_alias_swaps_versions_while_requests_keep_being_answered(
    endpoint, two_versions, other_package, videos, mlflow_server  # noqa: F811
):
    body = {"videos": [{"video": encoded(videos[0])}], "top_k": len(CLASSES)}
    answers, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            answers.append((time.monotonic(), *post(endpoint, body)))

    sender = threading.Thread(target=client)
    sender.start()
    try:
        time.sleep(1.0)
        moved_at = time.monotonic()
        mlflow.MlflowClient(mlflow_server.uri).set_registered_model_alias(two_versions, ALIAS, "2")
        deadline = moved_at + 60
        while not any(answer["model"]["version"] == 2 for _, status, answer in answers if status == 200):
            assert time.monotonic() < deadline, "the replica did not swap to version 2"
            time.sleep(0.2)
        time.sleep(1.0)  # some answers after the swap
    finally:
        stop.set()
        sender.join(timeout=60)

    assert [status for _, status, _ in answers] == [200] * len(answers), [a for a in answers if a[1] != 200]
    versions = [answer["model"]["version"] for _, _, answer in answers]
    swapped = versions.index(2)
    assert versions[:swapped] == [1] * swapped and versions[swapped:] == [2] * (len(versions) - swapped)
    assert swapped > 0 and answers[swapped][0] > moved_at
    [want] = expected(other_package, videos[:1])
    got = answers[-1][2]["predictions"][0]["top_k"]
    assert [top["name"] for top in got] == [top["name"] for top in want]
    np.testing.assert_allclose([top["prob"] for top in got], [top["prob"] for top in want], atol=1e-6)


def test_sigterm_shuts_the_application_down_and_the_command_exits_cleanly(package, tmp_path):  # noqa: F811
    """As a supervisor (systemd, Kubernetes) stops it: SIGTERM reaches `run_serve`'s handler, not Ray's core worker's,
    which ended the process with a stack dump and Serve still deployed on a cluster the command had joined."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # a local Ray of its own
    command = [sys.executable, "-u", "-m", "jobs.cli", "serve", "--model", str(package), "--port", str(port)]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not any(line.startswith("serving ") for line in lines):
            assert process.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as response:
            assert response.status == 200
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=120)
    finally:
        process.kill()
    reader.join(timeout=30)
    output = "".join(lines)
    assert returncode == 0 and "shutting down" in output, output
    assert "SIGTERM received" not in output, output
