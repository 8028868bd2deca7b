"""Jobs submitted through the Ray Jobs API (`jobs.submit`, i.e. JobSubmissionClient) to a real two-node cluster:
a `ray start --head` node and a `ray start --address` worker node on this machine, listening on 127.0.0.1 only, with
Ray token authentication on. Ingest reads videos from the S3-compatible server; train logs to a real `mlflow server`.

Stopping the cluster: `ray stop` would kill every Ray on the machine (other test sessions included), so each node is
started with `--block` in its own session, and stopping kills exactly the process tree under it (raylet, GCS,
dashboard, workers, job drivers), then anything left that names this cluster's temp dir.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import mlflow
import psutil
import pytest

from jobs.submit import SubmitError, connect, follow, submit
from pipeline import load_manifest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "infra" / "ray_loopback.py"
JOB_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LoopbackCluster:
    """A head node and worker nodes started by `infra/ray_loopback.py start --block`, each in its own session."""

    def __init__(self, root: Path, logs: Path, cpus_per_node: int = 2):
        self.root, self.logs = root, logs
        self.token_path = root / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.cpus_per_node = cpus_per_node
        self.nodes: list[subprocess.Popen] = []
        # the nodes' own environment: token auth on, this checkout's interpreter and `uniformer` first on PATH (the
        # job entrypoint runs in a shell), the test's AWS credentials (conftest) as a node's credential chain
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.env.pop("RAY_AUTH_TOKEN", None)
        self.env.pop("RAY_ADDRESS", None)

    def _start_node(self, name: str, *args: str) -> None:
        log = open(self.logs / f"{name}.log", "wb")
        self.nodes.append(subprocess.Popen(
            [sys.executable, str(LAUNCHER), "start", "--block", "--node-ip-address", "127.0.0.1",
             "--num-cpus", str(self.cpus_per_node), "--num-gpus", "0", "--object-store-memory", str(200 * 2**20),
             "--temp-dir", str(self.root / name), "--dashboard-agent-listen-port", str(free_port()),
             "--disable-usage-stats", *args],
            cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        ))

    def start(self, workers: int = 1, timeout_s: float = 120) -> None:
        self._start_node("head", "--head", "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1",
                         "--dashboard-port", str(self.dashboard_port),
                         "--ray-client-server-port", str(free_port()))
        self._wait(lambda nodes: nodes >= 1, timeout_s)
        for index in range(workers):
            self._start_node(f"worker{index}", "--address", f"127.0.0.1:{self.gcs_port}")
        self._wait(lambda nodes: nodes == 1 + workers, timeout_s)

    def alive_nodes(self) -> int:
        request = urllib.request.Request(f"{self.address}/api/v0/nodes",
                                         headers={"Authorization": f"Bearer {self.token_path.read_text()}"})
        body = json.loads(urllib.request.urlopen(request, timeout=5).read())
        return sum(node["state"] == "ALIVE" for node in body["data"]["result"]["result"])

    def _wait(self, ready, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.poll() is not None:
                    raise RuntimeError(f"a Ray node exited with {node.returncode}; see {self.logs}/*.log")
            try:
                if ready(self.alive_nodes()):
                    return
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"the cluster did not come up in {timeout_s} s; see {self.logs}/*.log")

    def processes(self) -> list[psutil.Process]:
        found = {}
        for node in self.nodes:
            try:
                root = psutil.Process(node.pid)
                found.update({p.pid: p for p in [root, *root.children(recursive=True)]})
            except psutil.NoSuchProcess:
                pass
        marker = str(self.root)  # orphans whose parent died first still name the temp dir on their command line
        for process in psutil.process_iter(["cmdline"]):
            if marker in " ".join(process.info["cmdline"] or []):
                found.setdefault(process.pid, process)
        return list(found.values())

    def listening_beyond_loopback(self) -> set[str]:
        """host:port of every socket this cluster's processes listen on that is not a loopback address."""
        exposed = set()
        for process in self.processes():
            try:
                sockets = [c for c in process.net_connections("inet") if c.status == psutil.CONN_LISTEN]
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            for sock in sockets:
                ip = ipaddress.ip_address(sock.laddr.ip)
                ip = getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:127.0.0.1 is 127.0.0.1
                if not ip.is_loopback:
                    exposed.add(f"{sock.laddr.ip}:{sock.laddr.port} ({process.name()})")
        return exposed

    def stop(self) -> None:
        for _ in range(3):  # a raylet may start a worker while its siblings are being killed
            processes = self.processes()
            if not processes:
                break
            for process in processes:
                try:
                    process.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(processes, timeout=10)
        for node in self.nodes:
            node.wait(timeout=10)


@pytest.fixture
def cluster(tmp_path_factory):
    # a short path: Ray's unix sockets live under the temp dir and a socket path is limited to 107 characters
    root = Path(tempfile.mkdtemp(prefix="uray-", dir="/tmp"))
    cluster = LoopbackCluster(root, logs=tmp_path_factory.mktemp("ray-nodes"))
    try:
        cluster.start(workers=1)
        yield cluster
    finally:
        cluster.stop()
        leftovers = [p.pid for p in cluster.processes()]
        shutil.rmtree(root, ignore_errors=True)
        assert not leftovers, f"processes of the test cluster survived stop: {leftovers}"


def run_to_end(client, job: str, args: list[str], environ: dict) -> str:
    submission = submit(job, args, client=client, environ=environ)
    chunks: list[str] = []
    status = follow(client, submission.job_id, write=chunks.append, timeout_s=JOB_TIMEOUT_S)
    logs = "".join(chunks) or client.get_job_logs(submission.job_id)
    assert status.value == "SUCCEEDED", f"{job} ended {status.value}:\n{logs[-6000:]}"
    info = client.get_job_info(submission.job_id)
    assert info.entrypoint.startswith(f"uniformer {job} ")
    assert info.runtime_env["env_vars"] == environ and info.runtime_env["working_dir"].startswith("gcs://")
    return logs


def test_ingest_and_train_jobs_run_on_a_token_authenticated_two_node_cluster(
    cluster, monkeypatch, tmp_path, make_videos, s3_server, s3_bucket, mlflow_server
):
    assert cluster.alive_nodes() == 2
    assert not cluster.listening_beyond_loopback()

    # token authentication is on: a wrong token is refused before anything is submitted
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
    with pytest.raises(SubmitError, match="refused"):
        connect(cluster.address).list_jobs()
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(cluster.token_path))
    client = connect(cluster.address)

    make_videos(tmp_path / "videos", num_per_class=4, size=(40, 40), num_frames=16)
    s3_server.upload_folder(tmp_path / "videos", s3_bucket, "raw")
    clips = f"s3://{s3_bucket}/clips"
    environ = {"AWS_ENDPOINT_URL": s3_server.endpoint_url, "MLFLOW_TRACKING_URI": mlflow_server.uri}

    run_to_end(client, "ingest", [f"s3://{s3_bucket}/raw", "--out", clips, "--labels-from-dirs", "--frames", "8",
                                  "--short-side", "40", "--size", "32"], environ)
    manifest = load_manifest(clips, endpoint_url=s3_server.endpoint_url)
    assert manifest.num_clips == 16 and manifest.counts["listed"] == 16 and manifest.sampling.size == 32

    experiment = f"submit-{uuid.uuid4().hex[:8]}"
    storage = tmp_path / "runs"
    logs = run_to_end(client, "train", ["--data", clips, "--model", "uniformerv2_tiny", "--workers", "2",
                                        "--epochs", "1", "--batch-size", "4", "--no-hflip", "--storage", str(storage),
                                        "--experiment", experiment], environ)
    printed = re.search(r"run (\S+) \(mlflow (\w+)\) checkpoint (\S+)", logs)
    assert printed, logs[-3000:]
    run_name, run_id, checkpoint = printed.groups()
    assert Path(checkpoint).is_dir() and Path(checkpoint).is_relative_to(storage / run_name)
    run = mlflow.MlflowClient(mlflow_server.uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["model"] == "uniformerv2_tiny"
    assert mlflow.MlflowClient(mlflow_server.uri).get_experiment(run.info.experiment_id).name == experiment
