"""Shared fixtures: a real S3-compatible server (moto over HTTP), a local Ray, synthetic and broken videos."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Test credentials for the moto server, set before anything starts Ray so that Ray workers inherit them; the
# shared AWS config files are hidden so that no developer profile or real endpoint leaks into a test.
TEST_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-access-key",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
os.environ.update(TEST_AWS_ENV)
# Keep every Ray node the tests start on 127.0.0.1: on Linux Ray otherwise swaps loopback for the machine's
# address. Ray reads this once, at import, so it is set before anything imports Ray.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
for _name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
    os.environ.pop(_name, None)


def pytest_report_header(config) -> str:
    """Free space where the tests write (pytest's folders, Ray's sessions, checkpoints): a disk that fills mid-run
    shows only as later tests failing in set-up, so CI's log says at its top how much room the run started with."""
    folder = tempfile.gettempdir()
    return f"free disk in {folder}: {shutil.disk_usage(folder).free / 2**30:.1f} GiB (a full run peaks near 8.5 GiB)"


# ---- S3-compatible server ---------------------------------------------------------------------------------------
class S3Server:
    """moto's ThreadedMotoServer on 127.0.0.1 and a free port; state survives `restart` (moto keeps it in-process)."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        self.host, self.port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{self.host}:{self.port}"

    def client(self, **credentials):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, **credentials)

    def create_bucket(self, prefix: str = "bucket") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name

    def upload_folder(self, folder: str | Path, bucket: str, prefix: str = "") -> list[str]:
        """Upload every file below `folder` under `prefix`; returns the keys."""
        client, keys = self.client(), []
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                key = "/".join(part for part in (prefix.strip("/"), path.relative_to(folder).as_posix()) if part)
                client.upload_file(str(path), bucket, key)
                keys.append(key)
        return keys

    def require_credentials(self, enabled: bool) -> None:
        """Make the server check signatures against its IAM users (no user exists, so every key is rejected)."""
        request = urllib.request.Request(
            f"{self.endpoint_url}/moto-api/reset-auth",
            data=b"0" if enabled else b"inf",
            method="POST",
            headers={"Content-Type": "text/plain"},  # a form content type would hide the body from moto
        )
        urllib.request.urlopen(request, timeout=5).read()

    def stop(self) -> None:
        self._server.stop()

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
        self._server.start()

    def restart(self, downtime_s: float = 1.0) -> None:
        self.stop()
        time.sleep(downtime_s)
        self.start()


@pytest.fixture(params=["s3", "local"])
def storage_folder(request, s3_server, tmp_path):
    """(storage, a folder) on the S3 server over HTTP, and in a local folder: for what must hold on both backends."""
    from pipeline.storage import Storage, parse_uri

    if request.param == "s3":
        return Storage(s3_server.endpoint_url), parse_uri(f"s3://{s3_server.create_bucket()}/store")
    return Storage(), parse_uri(str(tmp_path / "store"))


def ignore_conditional_writes(monkeypatch, *conditions: str) -> list[str]:
    """Make every S3 write through pipeline.storage.Storage drop the named conditions ("if_absent", "if_match") and
    write anyway, as S3-compatible stores that ignore the headers do; returns the URIs written without them."""
    from pipeline.storage import Storage

    put_bytes, ignored = Storage.put_bytes, []

    def put_ignoring(self, location, data, if_absent=False, if_match=None):
        dropped = ("if_absent" in conditions and if_absent) or ("if_match" in conditions and if_match is not None)
        if location.scheme == "s3" and dropped:
            ignored.append(location.uri)
            return put_bytes(self, location, data)
        return put_bytes(self, location, data, if_absent=if_absent, if_match=if_match)

    monkeypatch.setattr(Storage, "put_bytes", put_ignoring)
    return ignored


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on the session's S3 server."""
    return s3_server.create_bucket()


# ---- Ray ----------------------------------------------------------------------------------------------------------
# Logical CPUs: two training workers hold one each, and the Ray Data readers feeding them need room beside them.
RAY_TEST_CPUS = 4


def start_local_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=RAY_TEST_CPUS, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)


@pytest.fixture(scope="session")
def _ray_session_teardown():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def ray_local(_ray_session_teardown):
    """A local Ray with 4 logical CPUs, started once and reused (a test that needs its own cluster shuts it down first,
    and the next user restarts it)."""
    import ray

    start_local_ray()
    yield ray


@contextlib.contextmanager
def two_node_ray(head_cpus: int, worker_cpus: int):
    """A two-node Ray cluster on this machine (ray.cluster_utils.Cluster) with this process connected; yields the
    cluster and its worker node. The session's local Ray is shut down first; the next test that needs it restarts it."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "include_dashboard": False})
    worker_node = cluster.add_node(num_cpus=worker_cpus)
    ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield cluster, worker_node
    finally:
        ray.shutdown()
        cluster.shutdown()


def published_parts(folder: Path) -> set[str]:
    """Names of the Parquet part files a job has published in `folder` (files being staged are not `part-*`)."""
    return {path.name for path in folder.glob("part-*.parquet")} if folder.exists() else set()


def kill_driver_after_first_part(script: str, args: list[str], ray_address: str, folder: Path) -> set[str]:
    """Runs `python -c script ARGS` as a driver of the Ray at `ray_address`, in a process group of its own, SIGKILLs
    that group as soon as the job has published a part file in `folder` (or has exited, or after 120 s), and returns
    the part files published by then."""
    process = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        env={**os.environ, "RAY_ADDRESS": ray_address},
        cwd=REPO_ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not published_parts(folder) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # the driver's own process group, started above
    process.wait()
    time.sleep(1.0)  # let Ray tear down the dead driver's tasks and actors
    return published_parts(folder)


# ---- videos -------------------------------------------------------------------------------------------------------
@pytest.fixture
def make_videos():
    """Write tiny synthetic motion videos: `make_videos(folder, num_per_class=1, **generate_motion_dataset args)`."""
    from pipeline.synthetic import generate_motion_dataset

    def make(folder, num_per_class: int = 1, **options):
        options = {"size": (64, 48), "num_frames": 16, "fps": 8.0, **options}
        return generate_motion_dataset(folder, num_per_class, **options)

    return make


BROKEN_KINDS = ("truncated", "truncated_faststart", "zero_byte", "text", "png", "audio_only", "corrupt_header")


def write_broken_video(path: str | Path, kind: str, seed: int = 0) -> Path:
    """A file named like a video that is not a decodable one, of the given kind (see BROKEN_KINDS)."""
    import av

    from pipeline.synthetic import encode_mp4, render_motion_frames

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if kind in ("truncated", "truncated_faststart", "corrupt_header"):
        frames = render_motion_frames("left", 64, 48, 24, rng)
        whole = path.with_suffix(".whole.mp4")
        if kind == "truncated_faststart":
            # moov first, as streaming uploads have it: the index survives, the frame data is cut off
            with av.open(str(whole), "w", options={"movflags": "faststart"}) as container:
                stream = container.add_stream("libx264", rate=8)
                stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
                for array in frames:
                    for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                        container.mux(packet)
                for packet in stream.encode():
                    container.mux(packet)
        else:
            encode_mp4(whole, frames, fps=8)
        data = bytearray(whole.read_bytes())
        whole.unlink()
        if kind == "corrupt_header":
            start = data.find(b"moov")
            data[start + 8 : start + 200] = rng.integers(0, 256, 192, dtype=np.uint8).tobytes()
        else:
            data = data[: len(data) * 2 // 3]
        path.write_bytes(bytes(data))
    elif kind == "zero_byte":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is a text file that someone named .mp4\n")
    elif kind == "png":
        from PIL import Image

        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path, format="PNG")
    elif kind == "audio_only":
        with av.open(str(path), "w", format="mp4") as container:
            stream = container.add_stream("aac", rate=16000)
            for index in range(16):
                frame = av.AudioFrame.from_ndarray(
                    rng.uniform(-0.1, 0.1, (1, 1024)).astype(np.float32), format="fltp", layout="mono"
                )
                frame.sample_rate, frame.pts = 16000, index * 1024
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    else:
        raise ValueError(f"unknown broken kind {kind!r}; expected one of {BROKEN_KINDS}")
    return path


@pytest.fixture
def broken_video():
    """`broken_video(path, kind)` writes a deliberately broken file; kinds in BROKEN_KINDS."""
    return write_broken_video


# ---- MLflow -------------------------------------------------------------------------------------------------------
class MlflowServer:
    """A real `mlflow server` process on 127.0.0.1 with a sqlite backend and proxied local artifacts; `args` and `env`
    add options and variables (e.g. an auth app and its settings)."""

    def __init__(self, root: Path, args: tuple[str, ...] = (), env: dict[str, str] | None = None):
        import socket
        import subprocess
        import sys

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = open(root / "mlflow-server.log", "wb")
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "mlflow", "server",
                "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                "--artifacts-destination", str(root / "artifacts"),
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1", *args,
            ],
            env={**os.environ, **env} if env else None,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self._wait_healthy(timeout_s=120)

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}; see {self.log.name}")
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2).read()
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not become healthy in {timeout_s} s; see {self.log.name}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except Exception:
            self.process.kill()
        self.log.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One server per test session (a fresh sqlite file spends ~10 s migrating)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()
