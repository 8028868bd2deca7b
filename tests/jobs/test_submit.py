"""Jobs submitted through the Ray Jobs API (`jobs.submit`, i.e. JobSubmissionClient) to a real two-node cluster
started by `infra/local-cluster.sh`: `ray start --head` and `ray start --address` nodes on this machine, listening on
127.0.0.1 only, Ray token authentication on. Ingest reads videos from the S3-compatible server; train logs to a real
`mlflow server`.

Stopping the cluster: `ray stop` would kill every Ray on the machine (other test sessions included). The script
starts each node with `--block` as its own process group and `stop` kills exactly those groups; the test then checks
that no process of the cluster (its groups, or anything naming its folder) survived.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shutil
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
import typer

from jobs.cli import app
from jobs.exitcodes import ExitCode
from jobs.submit import SubmitError, connect, exit_code_of, follow, submit
from pipeline import load_manifest

CLI = typer.main.get_command(app)  # what `uniformer submit` checks a command line against

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "infra" / "local-cluster.sh"
JOB_TIMEOUT_S = 240


class LocalCluster:
    """The cluster `infra/local-cluster.sh` starts (head + worker nodes on 127.0.0.1, token auth on), in `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.token_path = root / "auth_token"
        self.groups: set[int] = set()
        # the script's environment: this interpreter (its bin dir goes first on the nodes' PATH, so the job's
        # `uniformer` entrypoint is this checkout's), the test's AWS credentials (conftest) as the nodes' credential
        # chain, and no Ray address or token of the test process's own
        self.env = {**os.environ, "PYTHON": sys.executable}
        for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
            self.env.pop(name, None)

    def script(self, *args: str) -> str:
        done = subprocess.run(["bash", str(SCRIPT), *args, "--dir", str(self.root)], env=self.env, text=True,
                              capture_output=True, timeout=300)
        if done.returncode != 0:
            logs = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in sorted(self.root.glob("*.log")))
            raise RuntimeError(f"local-cluster.sh {args[0]} failed:\n{done.stdout}{done.stderr}\n{logs}")
        return done.stdout

    def start(self, workers: int) -> None:
        try:
            self.script("start", "--workers", str(workers), "--cpus-per-node", "2")
        finally:  # each node is a process group named by its pid file; kept for the checks after `stop`
            self.groups = {int(pidfile.read_text()) for pidfile in self.root.glob("*.pid")}
        self.address = (self.root / "address").read_text().strip()

    def alive_nodes(self) -> int:
        request = urllib.request.Request(f"{self.address}/api/v0/nodes",
                                         headers={"Authorization": f"Bearer {self.token_path.read_text().strip()}"})
        body = json.loads(urllib.request.urlopen(request, timeout=5).read())
        return sum(node["state"] == "ALIVE" for node in body["data"]["result"]["result"])

    def processes(self) -> list[psutil.Process]:
        """Every live process of this cluster: its nodes' process groups, and anything naming its folder."""
        marker, found = str(self.root), []
        for process in psutil.process_iter(["cmdline", "status"]):
            try:
                if process.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                if os.getpgid(process.pid) in self.groups or marker in " ".join(process.info["cmdline"] or []):
                    found.append(process)
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
        return found

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

    def stop(self) -> list[int]:
        """`local-cluster.sh stop`; returns the pids that survived it (then kills those too)."""
        try:
            self.script("stop")
        finally:
            time.sleep(1)
            survivors = self.processes()
            for process in survivors:
                process.kill()
        return [process.pid for process in survivors]


@pytest.fixture
def cluster():
    # a short path: Ray's unix sockets live under the temp dir and a socket path is limited to 107 characters
    root = Path(tempfile.mkdtemp(prefix="uray-", dir="/tmp"))
    cluster = LocalCluster(root)
    try:
        cluster.start(workers=1)
        yield cluster
    finally:
        survivors = cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert not survivors, f"processes of the test cluster survived local-cluster.sh stop: {survivors}"


def run_to_end(client, job: str, args: list[str], environ: dict) -> str:
    submission = submit(CLI, job, args, client=client, environ=environ)
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
    # the job's exit code comes back through `submit --wait`: here the same ingest again, which finds nothing new
    again = submit(CLI, "ingest", [f"s3://{s3_bucket}/raw", "--out", clips, "--labels-from-dirs", "--frames", "8",
                                   "--short-side", "40", "--size", "32"], client=client, environ=environ)
    follow(client, again.job_id, write=lambda text: None, timeout_s=JOB_TIMEOUT_S)
    assert exit_code_of(client, again.job_id) == ExitCode.NOTHING_NEW

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
