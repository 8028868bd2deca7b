"""A tracking server that does not answer is reported within seconds, its URI's password masked, before any work."""

import contextlib
import socket
import threading
import time

import pytest
from typer.testing import CliRunner

from jobs.cli import app
from jobs.registry import PROBE_TIMEOUT_S, TrackingUnreachable, probe_tracking_server

PASSWORD = "S3cretPW"


@contextlib.contextmanager
def refusing_port():
    """A loopback port nothing listens on: connections are refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    yield port


@contextlib.contextmanager
def silent_port():
    """A loopback port whose listener accepts connections and never answers (a hung server)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


@pytest.mark.parametrize("port_of", [refusing_port, silent_port])
@pytest.mark.parametrize("command", [
    # retrain reads MLFLOW_TRACKING_URI; score is given --tracking-uri (an address earlier tests of this process set
    # with mlflow.set_tracking_uri would otherwise stand in for the environment's)
    ["retrain", "--source", "./raw", "--dataset", "./clips", "--model-name", "m", "--val", "./val", "--dry-run"],
    ["score", "./archive", "--model", "models:/m@champion", "--out", "./scores", "--tracking-uri", "{address}"],
])
def test_jobs_report_a_tracking_server_that_does_not_answer_within_seconds(tmp_path, monkeypatch, port_of, command):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "archive").mkdir()
    with port_of() as port:
        address = f"http://alice:{PASSWORD}@127.0.0.1:{port}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", address)
        started = time.monotonic()
        result = CliRunner().invoke(app, [arg.format(address=address) for arg in command])
        seconds = time.monotonic() - started
    assert result.exit_code == 1, result.output
    assert f"the MLflow tracking server at http://alice:***@127.0.0.1:{port} does not answer" in result.output
    assert PASSWORD not in result.output and "Traceback" not in result.output
    assert seconds < 3 * PROBE_TIMEOUT_S, seconds  # not minutes of the client's retries
    assert not (tmp_path / "scores").exists() and not (tmp_path / "clips").exists()  # nothing started


def test_any_http_answer_is_reachable_and_local_stores_are_not_probed():
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    asked = []

    class Refusing(BaseHTTPRequestHandler):  # a server that answers, if only with 401: the job explains that
        def do_GET(self):
            asked.append((self.path, self.headers.get("Authorization")))
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        probe_tracking_server(f"http://alice:{PASSWORD}@127.0.0.1:{server.server_port}/mlflow/")
    finally:
        server.shutdown()
        server.server_close()
    assert asked == [("/mlflow/health", None)]  # the probe sends no credential
    probe_tracking_server("sqlite:///nowhere/mlflow.db")
    probe_tracking_server("/a/folder")
    with refusing_port() as port, pytest.raises(TrackingUnreachable):
        probe_tracking_server(f"http://127.0.0.1:{port}/prefix")
