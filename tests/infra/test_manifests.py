"""The deployment in infra/ holds together: every manifest parses, every `uniformer` command it runs is a valid
invocation by the CLI's own parser (without running it), and images, Secrets, service accounts, config maps, volumes
and service addresses name things that exist, with credentials only ever referenced from Secrets. It is closed: the
MLflow server takes authenticated requests only and its clients have their password from a Secret, NetworkPolicies
admit only the pods that need MLflow and the Ray head, every image is pinned by digest and every Python package comes
from a lock with hashes. The Ray cluster's shape fits the jobs: whole 8-GPU pods for NCCL over NVLink, object stores
inside a memory-backed /dev/shm, and a CPU-only group for decoding. Serving (a RayService) runs `uniformer serve`'s
application with options the CLI resolves, on a cluster of its own that reaches MLflow and is reached on its HTTP port
by labelled clients only."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from base64 import b64encode
from functools import cache
from fractions import Fraction
from pathlib import Path

import pytest
import typer
import yaml

from jobs.cli import app
from jobs.credentials import carries_credentials, redact
from jobs.submit import SubmitError, check_invocation
from tests.conftest import MlflowServer

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
SECRETS_TEMPLATE = K8S / "secrets.template.yaml"
LOCK = INFRA / "requirements.lock"
DEV_LOCK = REPO / "dev.lock"
CLI = typer.main.get_command(app)  # what `uniformer submit` checks a command line against
CREDENTIAL_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL|_URI$", re.IGNORECASE)
SAFE_LITERAL_ENV = {"MLFLOW_TRACKING_URI"}  # a service address, not a credential (pointing at the in-cluster Service)
# variables that name a file the process reads its credential from; their value is a path in a mounted Secret
CREDENTIAL_FILE_ENV = {"RAY_AUTH_TOKEN_PATH", "AWS_SHARED_CREDENTIALS_FILE"}
# The only pod that takes Secrets as environment variables: `mlflow server` reads its database URI and auth settings
# from its environment only, and runs no job. Every other credential is a file, read by the process that needs it:
# a variable would be inherited by every process of every job submitted to the cluster.
SECRET_ENV_ALLOWED = {"Deployment/mlflow"}
GPU = "nvidia.com/gpu"
# A GPU pod takes a whole 8-GPU node: the workers of one training run then share NVLink, not sockets between pods.
GPUS_PER_POD = 8
# Where a job's resolved configuration says that it uses GPUs (`use_gpu` in this section; "" = the top level) and how
# many (this field of it): one per training worker, one per scoring model actor.
GPU_FIELDS = {"train": ("", "workers"), "retrain": ("train", "workers"), "score": ("", "actors")}
JOB_CONFIGS = "uniformer-jobs"  # the ConfigMap of the jobs' config files, generated from infra/k8s/jobs/
UNIFORMER = Path(sys.executable).with_name("uniformer")
DIGEST = r"sha256:[0-9a-f]{64}"
PLACEHOLDER_DIGEST = "sha256:" + "0" * 64  # what the repository holds until infra/pin-images.sh writes a real one
MLFLOW_PORT, RAY_GCS_PORT, RAY_JOBS_API_PORT = 5000, 6379, 8265
# Ports a Ray head may listen on: the GCS, the Jobs API, and those nothing here uses (Ray Client, Serve, metrics
# export, dashboard agent), which must stay closed to every pod but the Ray nodes themselves.
RAY_HEAD_PORTS = (RAY_GCS_PORT, RAY_JOBS_API_PORT, 10001, 8000, 8080, 52365)
SERVE_PORT = 8000
SERVE_CLIENT = {"uniformer.io/serve-client": "true"}  # the label of the pods that may call the endpoint


def load_documents() -> list[tuple[str, dict]]:
    documents = []
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                documents.append((path.name, document))
    return documents


DOCUMENTS = load_documents()


def of_kind(kind: str, include_template: bool = False) -> list[dict]:
    return [doc for name, doc in DOCUMENTS
            if doc.get("kind") == kind and (include_template or name != SECRETS_TEMPLATE.name)]


def names(kind: str) -> set[str]:
    return {doc["metadata"]["name"] for doc in of_kind(kind)}


def pod_templates() -> dict[str, dict]:
    """{where: pod template (metadata and spec)} of every pod the manifests run."""
    templates = {}
    for _, doc in DOCUMENTS:
        kind, spec, label = doc.get("kind"), doc.get("spec", {}), doc.get("kind", "") + "/" + _name(doc)
        if kind == "RayCluster":
            templates[f"{label} head"] = spec["headGroupSpec"]["template"]
            templates.update({f"{label} {g['groupName']}": g["template"] for g in spec["workerGroupSpecs"]})
        elif kind == "RayService":  # serving's own Ray cluster
            cluster = spec["rayClusterConfig"]
            templates[f"{label} head"] = cluster["headGroupSpec"]["template"]
            templates.update({f"{label} {g['groupName']}": g["template"] for g in cluster["workerGroupSpecs"]})
        elif kind == "RayJob":
            templates[f"{label} submitter"] = spec["submitterPodTemplate"]
        elif kind in ("Deployment", "Job", "StatefulSet"):
            templates[label] = spec["template"]
        elif kind == "CronJob":
            templates[label] = spec["jobTemplate"]["spec"]["template"]
    return templates


def pod_specs() -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod the manifests run."""
    return [(where, template["spec"]) for where, template in pod_templates().items()]


def pod_labels(where: str) -> dict:
    return pod_templates()[where].get("metadata", {}).get("labels", {})


def containers() -> list[tuple[str, dict]]:
    return [(f"{where} {c['name']}", c) for where, spec in pod_specs()
            for c in spec.get("containers", []) + spec.get("initContainers", [])]


def secret_files(container: dict, pod_spec: dict) -> dict[str, tuple[str, str]]:
    """{path in the container: (Secret, key)} of every Secret key the container mounts as a file."""
    volumes = {volume["name"]: volume["secret"] for volume in pod_spec.get("volumes", []) if "secret" in volume}
    files = {}
    for mount in container.get("volumeMounts", []):
        secret = volumes.get(mount["name"])
        for item in (secret or {}).get("items", []):
            files[f"{mount['mountPath']}/{item['path']}"] = (secret["secretName"], item["key"])
    return files


def containers_with_pods() -> list[tuple[str, dict, dict]]:
    """(where, container, its pod spec), the KubeRay autoscaler's sidecar included (it shares the head's volumes)."""
    found = [(f"{where} {c['name']}", c, spec) for where, spec in pod_specs()
             for c in spec.get("containers", []) + spec.get("initContainers", [])]
    for cluster in of_kind("RayCluster"):
        found.append((f"RayCluster/{_name(cluster)} autoscaler", cluster["spec"]["autoscalerOptions"],
                      cluster["spec"]["headGroupSpec"]["template"]["spec"]))
    for service in of_kind("RayService"):
        cluster = service["spec"]["rayClusterConfig"]
        found.append((f"RayService/{_name(service)} autoscaler", cluster["autoscalerOptions"],
                      cluster["headGroupSpec"]["template"]["spec"]))
    return found


def _name(doc: dict) -> str:
    metadata = doc.get("metadata", {})
    return metadata.get("name") or metadata.get("generateName") or doc["kind"]


def walk(node, key: str):
    """Every value stored under `key` anywhere in a nested document."""
    if isinstance(node, dict):
        for k, value in node.items():
            if k == key:
                yield value
            yield from walk(value, key)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, key)


def env_of(container: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def selects(selector: dict, labels: dict) -> bool:
    """Whether a Kubernetes label selector (matchLabels and matchExpressions) selects a pod with `labels`."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if operator == "In":
            matched = key in labels and labels[key] in values
        elif operator == "NotIn":
            matched = labels.get(key) not in values
        elif operator == "Exists":
            matched = key in labels
        elif operator == "DoesNotExist":
            matched = key not in labels
        else:
            raise ValueError(f"not a label selector operator: {operator!r}")
        if not matched:
            return False
    return True


def ingress_policies(where: str) -> list[dict]:
    """The NetworkPolicies that restrict connections to the pod `where`."""
    return [policy for policy in of_kind("NetworkPolicy")
            if "Ingress" in policy["spec"].get("policyTypes", ["Ingress"])
            and selects(policy["spec"]["podSelector"], pod_labels(where))]


def admitted(target: str, port: int) -> set[str]:
    """The pods of the manifests that the NetworkPolicies let open a TCP connection to pod `target` on `port`. The
    namespace of a peer is taken to be theirs (the manifests are applied to one namespace), and an ipBlock to hold
    every pod address: whatever a policy might let in counts as let in."""
    pods = pod_templates()
    policies = ingress_policies(target)
    if not policies:
        return set(pods)  # a pod that no policy selects takes every connection
    container_ports = {p.get("name"): p["containerPort"] for c in pods[target]["spec"]["containers"]
                       for p in c.get("ports", [])}

    def opens(entry: dict) -> bool:
        first = container_ports.get(entry["port"], entry["port"])  # a port by number or by the container's name
        return entry.get("protocol", "TCP") == "TCP" and first <= port <= entry.get("endPort", first)

    sources = set()
    for rule in (rule for policy in policies for rule in policy["spec"].get("ingress", [])):
        if "ports" in rule and not any(opens(entry) for entry in rule["ports"]):
            continue
        if "from" not in rule:
            return set(pods)
        for peer in rule["from"]:
            if "ipBlock" in peer:
                return set(pods)
            sources |= {where for where in pods if selects(peer.get("podSelector", {}), pod_labels(where))}
    return sources


def ray_nodes() -> set[str]:
    """The pods of every Ray cluster: the batch RayCluster's and serving's."""
    return batch_nodes() | serve_nodes()


def batch_nodes() -> set[str]:
    return {where for where in pod_templates() if where.startswith("RayCluster/")}


def serve_nodes() -> set[str]:
    return {where for where in pod_templates() if where.startswith("RayService/")}


def ray_head() -> str:
    (head,) = [where for where in batch_nodes() if where.endswith(" head")]
    return head


def serve_config() -> dict:
    """The RayService's serveConfigV2, read as Serve reads it."""
    (service,) = of_kind("RayService")
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def mlflow_server() -> str:
    (server,) = [where for where, template in pod_templates().items()
                 if any(c.get("command", [])[:2] == ["mlflow", "server"] for c in template["spec"]["containers"])]
    return server


def job_submitters() -> set[str]:
    """The pods that submit jobs through the Ray Jobs API: KubeRay's submitters and `uniformer submit` runners."""
    return {where for where, template in pod_templates().items()
            if where.startswith("RayJob/") or any(submits(c) for c in template["spec"]["containers"])}


def uniformer_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after `uniformer`) of every `uniformer ...` the manifests run."""
    commands = []
    for doc in of_kind("RayJob"):
        argv = shlex.split(doc["spec"]["entrypoint"])
        commands.append((f"RayJob/{_name(doc)}", argv))
    for where, container in containers():
        commands += [(where, argv) for argv in uniformer_runs(container)]
    return commands


def uniformer_runs(container: dict) -> list[list[str]]:
    """The `uniformer ...` argvs a container runs: its command itself, or the lines of its `sh -c` script."""
    argv = list(container.get("command", [])) + list(container.get("args", []))
    if argv[:1] == ["uniformer"]:
        return [argv]
    if argv[:2] in (["/bin/sh", "-c"], ["sh", "-c"]):
        return [shlex.split(line) for line in argv[2].splitlines() if line.split()[:1] == ["uniformer"]]
    return []


def command_of(argv: list[str]) -> str:
    """The sub-command of `uniformer [OPTIONS] COMMAND ...`."""
    return next(a for a in argv[1:] if not a.startswith("-"))


def submits(container: dict) -> bool:
    return any(command_of(argv) == "submit" for argv in uniformer_runs(container))


def job_of(argv: list[str]) -> str:
    """The uniformer command an argv runs: `uniformer train ...` or `uniformer submit --wait train ...` -> train."""
    command = command_of(argv)
    if command != "submit":
        return command
    return next(a for a in argv[argv.index("submit") + 1:] if not a.startswith("-"))


def option_value(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def generated_config_maps() -> dict[str, dict[str, Path]]:
    """{name: {key: file}} of the ConfigMaps kustomization.yaml generates from files."""
    kustomization = of_kind("Kustomization")[0]
    return {generator["name"]: {Path(file).name: K8S / file for file in generator["files"]}
            for generator in kustomization.get("configMapGenerator", [])}


def job_config_file(where: str, argv: list[str]) -> Path:
    """The file in infra/k8s/jobs/ that `uniformer JOB --config PATH` reads where its driver runs, the Ray head: PATH
    must be a key of the ConfigMap the head mounts there."""
    path = option_value(argv, "--config")
    assert path, f"{where}: `{shlex.join(argv)}` takes no --config file"
    head = pod_templates()[ray_head()]["spec"]
    (container,) = head["containers"]
    volumes = {v["name"]: v for v in head.get("volumes", [])}
    mounted = {m["mountPath"]: volumes[m["name"]]["configMap"]["name"] for m in container.get("volumeMounts", [])
               if "configMap" in volumes[m["name"]]}
    folder, name = str(Path(path).parent), Path(path).name
    assert mounted.get(folder) == JOB_CONFIGS, f"{where}: the Ray head has no ConfigMap {JOB_CONFIGS} at {folder}"
    files = generated_config_maps()[JOB_CONFIGS]
    assert name in files, f"{where}: {path} is not a key of {JOB_CONFIGS} ({sorted(files)})"
    return files[name]


@cache
def resolved_config(job: str, file: Path) -> dict:
    """The configuration `uniformer JOB --config FILE` runs with, as the CLI itself resolves it (`--print-config`):
    an unknown key or a bad value fails here as it would on the cluster."""
    result = subprocess.run([UNIFORMER, job, "--config", str(file), "--print-config"], capture_output=True, text=True)
    assert result.returncode == 0, f"uniformer {job} --config {file}:\n{result.stderr}"
    config = yaml.safe_load(result.stdout)
    assert isinstance(config, dict), result.stdout
    return config


_QUANTITY = re.compile(r"([+-]?(?:\d+(?:\.\d*)?|\.\d+))(?:[eE]([+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E))?")
_QUANTITY_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
                    "m": Fraction(1, 1000), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}


def quantity(value: str | int | float) -> Fraction:
    """A Kubernetes resource quantity (64Gi, 200G, 500m, 1.5Gi, 1e3, 8) as an exact number of units."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):  # YAML gives bare numbers as numbers
        return Fraction(value)
    match = _QUANTITY.fullmatch(str(value))
    if not match:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    number, exponent, suffix = match.groups()
    scale = Fraction(10) ** int(exponent) if exponent is not None else _QUANTITY_SUFFIX.get(suffix, 1)
    return Fraction(number) * scale


def ray_groups() -> list[tuple[str, dict]]:
    """(name, group spec) of the RayCluster's head and of each worker group."""
    (cluster,) = of_kind("RayCluster")
    spec = cluster["spec"]
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def serve_groups() -> list[tuple[str, dict]]:
    """(name, group spec) of serving's head and worker groups."""
    (service,) = of_kind("RayService")
    spec = service["spec"]["rayClusterConfig"]
    return [("serve head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay runs Ray in a pod's first container


def gpus_per_pod(group: dict) -> tuple[int, int]:
    """(requested, limited) GPUs of a group's Ray container; Kubernetes takes an unstated request as the limit."""
    resources = ray_container(group).get("resources", {})
    limit = resources.get("limits", {}).get(GPU, 0)
    return int(quantity(resources.get("requests", {}).get(GPU, limit))), int(quantity(limit))


def dockerfile() -> str:
    return (INFRA / "Dockerfile").read_text()


def image_built_by_dockerfile() -> str:
    labels = dict(re.findall(r'org\.opencontainers\.image\.(title|version)="([^"]+)"', dockerfile()))
    return f"{labels['title']}:{labels['version']}"


# ---- the manifests -------------------------------------------------------------------------------------------------
def test_every_manifest_parses_and_the_kustomization_lists_the_long_lived_ones():
    assert {doc["kind"] for _, doc in DOCUMENTS} >= {"RayCluster", "RayService", "RayJob", "CronJob", "Deployment", "Service",
                                                      "Secret", "ServiceAccount", "ConfigMap", "Kustomization"}
    for name, doc in DOCUMENTS:
        assert doc.get("apiVersion") and doc.get("kind"), name
        assert doc["kind"] == "Kustomization" or _name(doc), name
    kustomization = of_kind("Kustomization")[0]
    listed = set(kustomization["resources"])
    assert all((K8S / resource).is_file() for resource in listed), listed
    per_run = {path.name for path in K8S.glob("rayjob-*.yaml")}
    expected = {path.name for path in K8S.glob("*.yaml")} - per_run - {"kustomization.yaml", SECRETS_TEMPLATE.name}
    assert listed == expected, "kustomization.yaml must apply every long-lived manifest and no Secret template"


def test_every_uniformer_command_is_a_valid_invocation_of_the_cli():
    commands = uniformer_commands()
    jobs = {job_of(argv) for _, argv in commands}
    assert jobs >= {"ingest", "train", "score", "retrain"}, jobs
    failures = []
    for where, argv in commands:
        assert argv[0] == "uniformer", (where, argv)
        try:
            check_invocation(CLI, argv[1:])
        except SubmitError as error:
            failures.append(f"{where}: {error}")
    assert not failures, "invalid uniformer commands in infra/k8s:\n" + "\n".join(failures)


def test_the_cli_check_rejects_what_the_parser_rejects():
    # the check above must be able to fail: an option the command lacks, an extra argument, a bad type
    for argv in (["ingest", "s3://raw/", "--out", "s3://c/", "--frame", "8"],
                 ["score", "s3://a/", "s3://b/", "--out", "s3://s/"],
                 ["submit", "--wait", "train", "--data", "s3://c/", "--epochs", "many"]):
        with pytest.raises(SubmitError):
            check_invocation(CLI, argv)


def test_every_job_takes_its_options_from_a_config_file_the_ray_head_mounts():
    files = generated_config_maps()[JOB_CONFIGS]
    used = set()
    for where, argv in uniformer_commands():
        job = job_of(argv)
        # the options live in the file: the command names the job and the file, nothing else
        assert argv[argv.index(job):] in ([job, "--config", option_value(argv, "--config")],
                                          [job, f"--config={option_value(argv, '--config')}"]), (where, argv)
        file = job_config_file(where, argv)
        assert file.name == f"{job}.yaml", f"{where}: {job} reads {file.name}"
        used.add(file.name)
    assert used == set(files), f"config files no job reads: {set(files) - used}"


def test_every_job_config_file_resolves_through_the_cli():
    for where, argv in uniformer_commands():
        job = job_of(argv)
        assert resolved_config(job, job_config_file(where, argv)), where


def test_the_config_check_refuses_a_key_the_job_does_not_have(tmp_path):
    # the check above must be able to fail: a misspelt key, and a training option outside retrain's train: section
    misspelt = yaml.safe_load((K8S / "jobs" / "score.yaml").read_text()) | {"batch_sise": 8}
    outside = yaml.safe_load((K8S / "jobs" / "retrain.yaml").read_text()) | {"epochs": 3}
    for job, config in (("score", misspelt), ("retrain", outside)):
        file = tmp_path / f"{job}.yaml"
        file.write_text(yaml.safe_dump(config))
        with pytest.raises(AssertionError, match="unknown key"):
            resolved_config(job, file)


def mlflow_container() -> dict:
    (container,) = pod_templates()[mlflow_server()]["spec"]["containers"]
    return container


def test_mlflow_server_arguments_parse_and_match_the_service_the_jobs_use(monkeypatch):
    from mlflow.cli import cli as mlflow_cli

    (deployment,) = [d for d in of_kind("Deployment") if d["metadata"]["name"] == "mlflow"]
    container = mlflow_container()
    assert container["command"] == ["mlflow", "server"]
    env = env_of(container)
    monkeypatch.setenv("MLFLOW_BACKEND_STORE_URI", "postgresql://from-the-environment")
    with mlflow_cli.commands["server"].make_context("server", list(container["args"])) as context:
        params = context.params
    # the backend store's URI, password included, reaches the server through its environment, never an argument
    assert params["backend_store_uri"] == "postgresql://from-the-environment"
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "uniformer-mlflow-db"
    assert params["artifacts_destination"].startswith("s3://") and params["serve_artifacts"]

    (settings,) = [c for c in of_kind("ConfigMap") if c["metadata"]["name"] == "uniformer-settings"]
    uri = re.fullmatch(r"http://([\w.-]+):(\d+)", settings["data"]["MLFLOW_TRACKING_URI"])
    assert uri, settings["data"]["MLFLOW_TRACKING_URI"]
    host, port = uri.group(1), int(uri.group(2))
    (service,) = [s for s in of_kind("Service") if s["metadata"]["name"] == host]
    (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == port]
    assert service_port["targetPort"] in (port, *(p["name"] for p in container["ports"] if p["containerPort"] == port))
    assert int(params["port"]) == port == MLFLOW_PORT and f"{host}:{port}" in params["allowed_hosts"].split(",")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_mlflow_server_takes_authenticated_requests_only():
    from importlib.metadata import entry_points

    from mlflow.cli import cli as mlflow_cli

    container = mlflow_container()
    with mlflow_cli.commands["server"].make_context("server", list(container["args"])) as context:
        app_name = context.params["app_name"]
    assert app_name == "basic-auth" and app_name in {e.name for e in entry_points(group="mlflow.app")}
    env = env_of(container)
    secret = "uniformer-mlflow-auth"
    for name, key in (("MLFLOW_AUTH_ADMIN_PASSWORD", "admin_password"), ("MLFLOW_FLASK_SERVER_SECRET_KEY",
                                                                         "flask_secret_key")):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": key}, name
    # the auth config file: a Secret's key mounted where MLFLOW_AUTH_CONFIG_PATH points
    config_path = Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
    (volume,) = [v for v in pod_templates()[mlflow_server()]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == secret and mount.get("readOnly") is True
    assert {"key": "basic_auth.ini", "path": config_path.name} in volume["secret"]["items"]
    (template,) = [d for d in of_kind("Secret", include_template=True) if d["metadata"]["name"] == secret]
    config = configparser.ConfigParser()
    config.read_string(template["stringData"]["basic_auth.ini"])
    auth = config["mlflow"]
    assert auth["authorization_function"] == "mlflow.server.auth:authenticate_request_basic_auth"
    # what any authenticated user may do with what others created: read at most
    assert auth["default_permission"] in ("READ", "NO_PERMISSIONS") and auth["admin_username"]
    assert "admin_password" not in auth, "the admin's password comes from its own Secret key, not the config file"
    assert re.fullmatch(r"<postgresql://[^>]+>", auth["database_uri"]), "the user store is a PostgreSQL database"
    probes = [container[probe]["httpGet"]["path"] for probe in ("readinessProbe", "livenessProbe")]
    assert probes == ["/health", "/health"], "the auth app answers /health alone without credentials"


def auth_config_file(tmp_path: Path) -> Path:
    """The auth config file of the template's uniformer-mlflow-auth Secret, written under `tmp_path` with a sqlite
    user store in place of the PostgreSQL placeholder."""
    (template,) = [doc for doc in of_kind("Secret", include_template=True)
                   if doc["metadata"]["name"] == "uniformer-mlflow-auth"]
    config = re.sub(r"^database_uri = <[^>]+>$", f"database_uri = sqlite:///{tmp_path / 'auth.db'}",
                    template["stringData"]["basic_auth.ini"], flags=re.MULTILINE)
    assert "<" not in config
    (tmp_path / "basic_auth.ini").write_text(config)
    return tmp_path / "basic_auth.ini"


def http_status(url: str, user: str | None = None, password: str | None = None, body: dict | None = None) -> int:
    import json

    headers = {"Content-Type": "application/json"}
    if user is not None:
        headers["Authorization"] = "Basic " + b64encode(f"{user}:{password}".encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.mark.integration
def test_the_mlflow_server_as_deployed_answers_only_authenticated_requests(tmp_path):
    container = mlflow_container()
    # the manifest's options that say what the server is; its addresses and stores are the cluster's
    args = tuple(a for a in container["args"] if a.split("=")[0] in ("--app-name", "--serve-artifacts"))
    assert "--app-name=basic-auth" in args
    config_file = auth_config_file(tmp_path)
    admin_password, jobs_password = "admin-password-marker", "jobs-password-marker"
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(config_file), "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-key-marker"}
    assert set(env) <= set(env_of(container)), "the test sets what the manifest sets"
    server = MlflowServer(tmp_path, args=args, env=env)
    try:
        search = f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=1"
        assert http_status(f"{server.uri}/health") == 200  # the probes need no password
        assert http_status(search) == 401
        assert http_status(search, "admin", "wrong") == 401
        assert http_status(search, "admin", admin_password) == 200
        # the jobs' user, created as the template says, may create what it logs to; a wrong password may not
        assert http_status(f"{server.uri}/api/2.0/mlflow/users/create", "admin", admin_password,
                           {"username": "uniformer-jobs", "password": jobs_password}) == 200
        create = f"{server.uri}/api/2.0/mlflow/experiments/create"
        assert http_status(create, "uniformer-jobs", "wrong", {"name": "k400"}) == 401
        assert http_status(create, "uniformer-jobs", jobs_password, {"name": "k400"}) == 200
    finally:
        server.stop()


# ---- images --------------------------------------------------------------------------------------------------------
def test_every_pod_runs_the_image_the_dockerfile_builds_as_non_root():
    image = image_built_by_dockerfile()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert image == f"{project['name']}:{project['version']}"
    assert f"-t {image} " in dockerfile(), "the build command in the Dockerfile header tags another image"
    for where, container in containers():
        pinned = re.fullmatch(rf"(?P<image>[^@\s]+)@(?P<digest>{DIGEST})", container["image"])
        assert pinned and pinned["image"] == image, f"{where}: {container['image']} is not {image} pinned by digest"
    assert len({container["image"] for _, container in containers()}) == 1, "every pod runs the same build"
    users = re.findall(r"^USER\s+(\S+)", dockerfile(), re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    for where, spec in pod_specs():
        assert spec.get("securityContext", {}).get("runAsNonRoot") is True, where


def test_the_base_image_is_pinned_by_digest():
    (base,) = re.findall(r"^FROM\s+(\S+)", dockerfile(), re.MULTILINE)
    assert re.fullmatch(rf"rayproject/ray:[\w.-]+@{DIGEST}", base), f"FROM {base}: pin the base image by digest"


def test_pin_images_writes_one_digest_everywhere_and_refuses_what_is_not_a_digest(tmp_path):
    shutil.copytree(INFRA, tmp_path / "infra")
    script, digest = tmp_path / "infra" / "pin-images.sh", "sha256:" + "ab" * 32
    pushed = f"registry.example.com:5000/ml/{image_built_by_dockerfile()}@{digest}"
    subprocess.run([script, "app", pushed], check=True)
    subprocess.run([script, "base", digest], check=True)
    for path in (tmp_path / "infra" / "k8s").glob("*.yaml"):
        images = [value for document in yaml.safe_load_all(path.read_text()) for value in walk(document, "image")]
        assert all(image == pushed for image in images), (path.name, images)
    assert re.search(rf"^FROM rayproject/ray:\S+@{digest}$", (tmp_path / "infra" / "Dockerfile").read_text(), re.M)
    for refused in (["app", image_built_by_dockerfile()], ["app", f"other-image@{digest}"], ["base", "sha256:abc"],
                    ["base", "latest"]):
        result = subprocess.run([script, *refused], capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr, refused
    assert all(c["image"].endswith(f"@{PLACEHOLDER_DIGEST}") for _, c in containers()), "the copy only was pinned"


def lock_pins(lock=LOCK) -> dict[str, tuple[str, list[str]]]:
    """{package name: (version, sha256 hashes)} of a lock (infra/requirements.lock, dev.lock); each pin must be
    `name==version` with at least one --hash on its continuation lines."""
    pins, current = {}, None
    name = lock.name
    for line in lock.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not line[0].isspace():
            match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[\w,.-]+\])?==([\w.+!-]+)(\s*;[^\\]*)?\s*\\?", line)
            assert match, f"{name}: not an exact pin: {line}"
            current = match.group(1).lower().replace("_", "-")
            pins[current] = (match.group(3), [])
        else:
            hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", stripped)
            assert hashes, f"{name}: {current}: not a hash: {stripped}"
            pins[current][1].extend(hashes)
    assert pins
    for package, (version, hashes) in pins.items():
        assert hashes, f"{name}: {package}=={version} has no --hash"
    return pins


@pytest.mark.parametrize("lock, extra", [(LOCK, "cluster"), (DEV_LOCK, "test")])
def test_the_lock_pins_everything_with_hashes_and_covers_pyprojects_dependencies(lock, extra):
    from packaging.requirements import Requirement

    pins = lock_pins(lock)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for dependency in project["dependencies"] + project["optional-dependencies"][extra]:
        requirement = Requirement(dependency)
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{requirement.name} is a dependency of pyproject.toml but not in {lock.name}: infra/lock.sh"
        assert requirement.specifier.contains(pins[name][0], prereleases=True), (
            f"{lock.name} pins {name}=={pins[name][0]}, outside pyproject's {requirement}: run infra/lock.sh")
    if lock == LOCK:
        for package in ("psycopg2-binary", "flask-wtf"):  # the MLflow server's Postgres driver and its auth app's need
            assert package in pins, package
    else:  # the test servers and the torch build come from the lock too, not from the index of the day
        assert {"moto", "torch", "torchvision"} <= set(pins)


def test_the_dev_script_installs_from_its_lock_only():
    script = (REPO / "dev").read_text()
    installs = [" ".join(line.split()) for line in script.splitlines() if re.search(r"pip\S*\" install", line)]
    assert any("--require-hashes" in line and '-r "$lock"' in line for line in installs), installs
    for line in installs:  # the project's own package adds nothing the lock does not pin
        assert "--require-hashes" in line or "--no-deps" in line, line
    assert 'lock="$root/dev.lock"' in script


def test_the_image_installs_python_packages_from_the_lock_only():
    installs = [" ".join(command.split()) for command in re.findall(r"pip install ((?:[^\n&]|\\\n)+)", dockerfile())]
    assert installs, "the Dockerfile installs no Python package"
    from_lock = [command for command in installs if "requirements.lock" in command]
    assert len(from_lock) == 1 and "--require-hashes" in from_lock[0] and "--no-deps" in from_lock[0], from_lock
    for command in installs:  # the project's own package: built offline, nothing resolved besides the lock
        assert command in from_lock or {"--no-index", "--no-deps"} <= set(command.split()), command
    assert "infra/requirements.lock" in dockerfile() and "infra/requirements.lock" in (
        INFRA / "Dockerfile.dockerignore").read_text()


def test_ray_and_torch_versions_agree_between_base_image_lock_dev_script_and_raycluster():
    base = re.search(r"^FROM\s+rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-cu\d+@", dockerfile(), re.MULTILINE)
    assert base, "the Dockerfile builds FROM a pinned rayproject/ray:VERSION-pyXY-cuNNN tag"
    ray_version = base.group(1)
    pins = lock_pins()
    assert pins["ray"][0] == ray_version
    for cluster in of_kind("RayCluster"):
        assert cluster["spec"]["rayVersion"] == ray_version
    for service in of_kind("RayService"):
        assert service["spec"]["rayClusterConfig"]["rayVersion"] == ray_version
    assert f"--python-version {base.group(2)}.{base.group(3)}" in (INFRA / "lock.sh").read_text(), (
        "the lock is resolved for another Python than the base image's")
    dev_pins = lock_pins(DEV_LOCK)
    for name in ("torch", "torchvision", "ray"):  # the builds the tests run against are the ones the image gets
        assert pins[name][0] == dev_pins[name][0], f"the image's lock pins {name}=={pins[name][0]}, dev.lock " \
            f"{dev_pins[name][0]}"


# ---- secrets, identities, references -------------------------------------------------------------------------------
def is_placeholder(key: str, value: str) -> bool:
    """A template value says what to put there and holds none: `<...>`, or for a file (a key with a suffix) a text
    whose every credential-looking setting is `<...>`."""
    if re.fullmatch(r"<[^>]+>", value):
        return True
    if "." not in key and "\n" not in value:  # a file: a key with a suffix, or a text of several lines
        return False
    settings = re.findall(r"^\s*([\w.-]+)\s*[=:]\s*(.*?)\s*$", value, re.MULTILINE)
    return all(re.fullmatch(r"<[^>]+>", setting) for name, setting in settings if CREDENTIAL_NAME.search(name))


def test_credentials_come_only_from_secrets_the_template_defines():
    template = {doc["metadata"]["name"]: set(doc.get("stringData", {})) | set(doc.get("data", {}))
                for doc in of_kind("Secret", include_template=True)}
    for secret in of_kind("Secret", include_template=True):
        for key, value in secret.get("stringData", {}).items():
            assert is_placeholder(key, value), f"{secret['metadata']['name']}.{key} is a value, not a placeholder"
    assert not of_kind("Secret"), "Secrets live only in secrets.template.yaml (created out of band)"
    for _, doc in DOCUMENTS:
        for ref in walk(doc, "secretKeyRef"):
            assert ref["key"] in template.get(ref["name"], set()), f"{_name(doc)}: no Secret {ref['name']}/{ref['key']}"
        for ref in walk(doc, "secretRef"):
            assert ref["name"] in template, f"{_name(doc)}: no Secret {ref['name']}"
        for volume in walk(doc, "secret"):  # a Secret mounted as files
            assert volume["secretName"] in template, f"{_name(doc)}: no Secret {volume['secretName']}"
            for item in volume.get("items", []):
                assert item["key"] in template[volume["secretName"]], f"{_name(doc)}: no {volume['secretName']}/{item}"
        for env in walk(doc, "env"):
            for entry in env:
                if CREDENTIAL_NAME.search(entry["name"]) and entry["name"] not in SAFE_LITERAL_ENV | CREDENTIAL_FILE_ENV:
                    assert "value" not in entry, f"{_name(doc)}: {entry['name']} is inlined; use a Secret"
    for config in of_kind("ConfigMap"):
        assert not [key for key in config["data"] if CREDENTIAL_NAME.search(key) and key not in SAFE_LITERAL_ENV]


def test_the_placeholder_check_tells_a_value_from_a_placeholder():
    assert is_placeholder("password", "<openssl rand -hex 24>")
    assert is_placeholder("auth.ini", "[mlflow]\ndefault_permission = READ\ndatabase_uri = <postgresql://U:P@H/db>\n")
    assert not is_placeholder("password", "hunter2")
    assert not is_placeholder("auth.ini", "[mlflow]\ndatabase_uri = postgresql://mlflow:hunter2@db/auth\n")
    assert not is_placeholder("auth.ini", "[mlflow]\nadmin_password = hunter2\n")


def test_no_credential_in_a_command_an_argument_or_a_config_map():
    texts = [(f"RayJob/{_name(doc)}", doc["spec"]["entrypoint"]) for doc in of_kind("RayJob")]
    texts += [(f"RayService/{_name(doc)}", doc["spec"]["serveConfigV2"]) for doc in of_kind("RayService")]
    for where, container in containers():
        secret_env = {name for name, entry in env_of(container).items() if "valueFrom" in entry
                      and "secretKeyRef" in entry["valueFrom"]}
        for arg in container.get("command", []) + container.get("args", []):
            texts.append((where, arg))
            # Kubernetes expands $(NAME) into the argument, where every `ps` on the node shows it
            assert not set(re.findall(r"\$\((\w+)\)", arg)) & secret_env, f"{where}: a Secret's value in {arg!r}"
            option = re.match(r"--?([\w-]+)=", arg)
            assert not (option and CREDENTIAL_NAME.search(option.group(1).replace("-", "_"))), f"{where}: {arg!r}"
    texts += [(f"ConfigMap/{config['metadata']['name']}", value)
              for config in of_kind("ConfigMap") for value in config["data"].values()]
    # the generated ones as files: --print-config would show their credentials masked
    texts += [(f"ConfigMap/{name} {key}", file.read_text())
              for name, files in generated_config_maps().items() for key, file in files.items()]
    for where, text in texts:
        assert not carries_credentials(text), f"{where} holds a credential: {redact(text)!r}"


def test_everything_that_talks_to_ray_presents_the_clusters_token():
    (cluster,) = of_kind("RayCluster")

    def authenticates(container: dict, pod_spec: dict, mode_required: bool = True) -> bool:
        env = env_of(container)
        token_file = env.get("RAY_AUTH_TOKEN_PATH", {}).get("value")
        from_secret = secret_files(container, pod_spec).get(token_file) == ("uniformer-ray-auth", "auth_token")
        return from_secret and (not mode_required or env.get("RAY_AUTH_MODE", {}).get("value") == "token")

    talking = {where: (container, spec) for where, container, spec in containers_with_pods()}
    assert authenticates(*talking[f"RayCluster/{_name(cluster)} autoscaler"]), "autoscaler"
    for service in of_kind("RayService"):
        assert authenticates(*talking[f"RayService/{_name(service)} autoscaler"]), "serving's autoscaler"
    for where, (container, spec) in talking.items():
        if where.startswith(("RayCluster/", "RayService/", "RayJob/")):  # Ray nodes and `ray job submit` need RAY_AUTH_MODE too
            assert authenticates(container, spec), where
    for doc in of_kind("RayJob"):
        assert doc["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    head_service = f"http://{cluster['metadata']['name']}-head-svc:8265"  # the Service KubeRay creates for the head
    submitters = [(where, container, spec) for where, (container, spec) in talking.items()
                  if "volumeMounts" in container and submits(container)]
    assert submitters
    for where, container, spec in submitters:  # `uniformer submit` reads the token file itself; no RAY_AUTH_MODE
        assert env_of(container)["RAY_ADDRESS"]["value"] == head_service, where
        assert authenticates(container, spec, mode_required=False), where


def test_no_secret_reaches_a_ray_node_or_a_job_as_an_environment_variable():
    checked = 0
    for where, container, spec in containers_with_pods():
        if where.split(" ")[0] in SECRET_ENV_ALLOWED:
            continue
        checked += 1
        from_secrets = [entry["name"] for entry in container.get("env", [])
                        if "secretKeyRef" in entry.get("valueFrom", {})]
        from_secrets += [source["secretRef"]["name"] for source in container.get("envFrom", []) if "secretRef" in source]
        assert not from_secrets, f"{where}: {from_secrets} as environment variables; mount the Secret as a file"
        for name in CREDENTIAL_FILE_ENV & set(env_of(container)):
            assert env_of(container)[name]["value"] in secret_files(container, spec), f"{where}: {name} names no Secret"
    assert checked >= 8  # the Ray head, two worker groups, the autoscaler, three RayJob submitters, the CronJob


def test_service_accounts_config_maps_and_volumes_exist():
    accounts, claims = names("ServiceAccount"), names("PersistentVolumeClaim")
    configs = names("ConfigMap") | set(generated_config_maps())
    for where, spec in pod_specs():
        assert spec.get("serviceAccountName") in accounts, where
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, where
        mounted = {m["name"] for c in spec["containers"] for m in c.get("volumeMounts", [])}
        assert mounted <= {v["name"] for v in spec.get("volumes", [])}, where
    for _, doc in DOCUMENTS:
        for ref in walk(doc, "configMapRef"):
            assert ref["name"] in configs, _name(doc)
        for volume in walk(doc, "configMap"):
            assert volume["name"] in configs, _name(doc)


# ---- network policies and MLflow's clients -----------------------------------------------------------------------
def test_every_pod_is_closed_to_what_no_network_policy_opens():
    for where in pod_templates():
        assert ingress_policies(where), f"{where}: no NetworkPolicy selects it, so every pod may connect to it"


def test_only_the_ray_nodes_reach_mlflow():
    server = mlflow_server()
    assert admitted(server, MLFLOW_PORT) == ray_nodes()
    for port in RAY_HEAD_PORTS:
        assert not admitted(server, port), f"MLflow's pod admits connections on {port}"


def test_the_ray_head_admits_job_submitters_to_the_jobs_api_and_only_ray_nodes_elsewhere():
    head, submitters = ray_head(), job_submitters()
    assert {"CronJob/uniformer-retrain"} < submitters and not submitters & ray_nodes()
    assert admitted(head, RAY_JOBS_API_PORT) == batch_nodes() | submitters
    for port in set(RAY_HEAD_PORTS) - {RAY_JOBS_API_PORT}:
        assert admitted(head, port) == batch_nodes(), f"the Ray head's port {port}"
    assert mlflow_server() not in admitted(head, RAY_JOBS_API_PORT)
    (container,) = pod_templates()[head]["spec"]["containers"]
    assert {p["containerPort"] for p in container["ports"]} == {RAY_GCS_PORT, RAY_JOBS_API_PORT}, (
        "the head exposes the GCS and the dashboard only; nothing uses the Ray Client or Serve ports")
    for worker in batch_nodes() - {head}:
        for port in (*RAY_HEAD_PORTS, MLFLOW_PORT):
            assert admitted(worker, port) == batch_nodes(), f"{worker}: port {port}"


def test_serving_nodes_admit_each_other_and_labelled_clients_on_the_http_port_only():
    nodes = serve_nodes()
    assert nodes and not nodes & batch_nodes()
    clients = {where for where in pod_templates() if selects({"matchLabels": SERVE_CLIENT}, pod_labels(where))}
    for node in nodes:
        assert admitted(node, SERVE_PORT) == nodes | clients, f"{node}: the HTTP port"
        for port in (*set(RAY_HEAD_PORTS) - {SERVE_PORT}, MLFLOW_PORT):
            assert admitted(node, port) == nodes, f"{node}: port {port}"
    (head,) = [where for where in nodes if where.endswith(" head")]
    (container,) = pod_templates()[head]["spec"]["containers"]
    assert {p["containerPort"] for p in container["ports"]} == {RAY_GCS_PORT, RAY_JOBS_API_PORT, SERVE_PORT}
    assert serve_config()["http_options"] == {"host": "0.0.0.0", "port": SERVE_PORT}


def test_the_serve_application_is_uniformer_serve_with_options_the_cli_resolves(tmp_path):
    (application,) = serve_config()["applications"]
    assert application["import_path"] == "jobs.serve:app_builder" and application["route_prefix"] == "/"
    file = tmp_path / "serve.yaml"
    file.write_text(yaml.safe_dump(application["args"]))
    config = resolved_config("serve", file)  # an unknown key or a bad value fails as the app builder would
    assert config["model"].endswith("@champion"), "serving follows the alias retraining promotes"
    assert config["tracking_uri"] is None, "the replicas read the tracking URI from the uniformer-settings ConfigMap"
    # one replica per 1-GPU pod, and the autoscaler's replicas fit the pods the worker group scales to
    (service,) = of_kind("RayService")
    (group,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert config["gpus_per_replica"] == 1 and gpus_per_pod(group) == (1, 1)
    assert 1 <= config["min_replicas"] <= group["minReplicas"] <= group["maxReplicas"] == config["max_replicas"]
    assert config["cpus_per_replica"] <= quantity(ray_container(group)["resources"]["limits"]["cpu"])
    assert service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_the_only_peer_from_outside_the_deployment_is_kuberays_operator_on_the_jobs_api():
    for policy in of_kind("NetworkPolicy"):
        for rule in policy["spec"].get("ingress", []):
            assert "from" in rule, f"{policy['metadata']['name']} admits every pod in the cluster"
            for peer in rule["from"]:
                assert "ipBlock" not in peer, f"{policy['metadata']['name']}: {peer}"
                if "namespaceSelector" in peer:
                    assert peer.get("podSelector") == {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}
                    # one namespace by name: `{}` admits a pod with the operator's label in any namespace
                    assert list(peer["namespaceSelector"].get("matchLabels", {})) == ["kubernetes.io/metadata.name"], (
                        policy["metadata"]["name"], peer)
                    assert rule["ports"] == [{"protocol": "TCP", "port": RAY_JOBS_API_PORT}], policy["metadata"]["name"]
                    # a Ray head's: the batch cluster's Jobs API, or where it deploys serving's serveConfigV2
                    heads = [where for where in ray_nodes() if where.endswith(" head")]
                    assert [head for head in heads if selects(policy["spec"]["podSelector"], pod_labels(head))]
                    assert all(where in heads for where in pod_templates()
                               if selects(policy["spec"]["podSelector"], pod_labels(where)))


@pytest.mark.parametrize("selector, labels, expected", [
    ({}, {"a": "1"}, True),
    ({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}, True),
    ({"matchLabels": {"a": "1"}}, {"a": "2"}, False),
    ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "2"]}]}, {"a": "2"}, True),
    ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1"]}]}, {}, False),
    ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {}, True),
    ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {"a": ""}, True),
    ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"a": ""}, False),
])
def test_selects_reads_label_selectors_as_kubernetes_does(selector, labels, expected):
    assert selects(selector, labels) is expected


def test_every_mlflow_client_has_the_jobs_user_from_its_secret_and_nothing_else_has_it():
    # MLflow's client reads the user and password from ~/.mlflow/credentials; the image runs as `ray`, HOME /home/ray
    credentials = {"/home/ray/.mlflow/credentials": ("uniformer-mlflow-client", "credentials")}
    clients = admitted(mlflow_server(), MLFLOW_PORT)
    assert clients
    for where, template in pod_templates().items():
        for container in template["spec"]["containers"]:
            found = {path: source for path, source in secret_files(container, template["spec"]).items()
                     if source[0] == "uniformer-mlflow-client"}
            assert found == (credentials if where in clients else {}), f"{where} {container['name']}: {found}"
            assert not {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} & set(env_of(container)), where


# ---- the cluster's shape -------------------------------------------------------------------------------------------
def test_the_cronjob_and_every_rayjob_fail_on_a_failure_not_on_an_outcome_a_schedule_expects():
    # `uniformer --scheduled` exits 0 on nothing new, a rejected candidate and per-video errors
    # (tests/jobs/test_cli.py); KubeRay and Kubernetes Jobs know only success and failure
    (cron,) = of_kind("CronJob")
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    (argv,) = uniformer_runs(container)
    assert argv[:4] == ["uniformer", "--scheduled", "submit", "--wait"] and job_of(argv) == "retrain", argv
    rayjobs = of_kind("RayJob")
    assert rayjobs
    for doc in rayjobs:
        argv = shlex.split(doc["spec"]["entrypoint"])
        assert argv[:2] == ["uniformer", "--scheduled"], (_name(doc), argv)


def test_worker_groups_autoscale_within_bounds():
    (cluster,) = of_kind("RayCluster")
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    for name, group in ray_groups()[1:]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        assert group["maxReplicas"] > 0, name
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (cron,) = of_kind("CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid" and len(cron["spec"]["schedule"].split()) == 5


@pytest.mark.parametrize("text, value", [
    ("64Gi", 64 * 2**30), ("200G", 200 * 10**9), ("500m", Fraction(1, 2)), ("1.5Gi", 3 * 2**29), ("8", 8), (8, 8),
    ("0.5Ki", 512), ("1e3", 1000), ("1E", 10**18), ("1E3", 1000), ("4294967296", 2**32), (".5M", 500_000),
])
def test_quantity_reads_kubernetes_quantities(text, value):
    assert quantity(text) == value


@pytest.mark.parametrize("text", ["64GB", "64gi", "Gi", "1.2.3", "64 Gi", "", "1e", "0x10"])
def test_quantity_rejects_what_kubernetes_rejects(text):
    with pytest.raises(ValueError):
        quantity(text)


def test_gpu_pods_take_a_whole_8_gpu_node_and_gpu_jobs_fill_whole_pods():
    gpu_groups = [(name, group) for name, group in ray_groups() if any(gpus_per_pod(group))]
    assert gpu_groups, "no worker group has GPUs"
    for name, group in gpu_groups:
        requested, limited = gpus_per_pod(group)
        assert requested == limited == GPUS_PER_POD, (
            f"{name}: requests {requested} and limits {limited} GPUs per pod; one pod per node, all {GPUS_PER_POD}")
    capacity = sum(GPUS_PER_POD * group["maxReplicas"] for _, group in gpu_groups)
    gpu_jobs = []
    for where, argv in uniformer_commands():
        job = job_of(argv)
        config = resolved_config(job, job_config_file(where, argv))
        section, count_field = GPU_FIELDS.get(job, ("", None))
        options = config[section] if section else config
        if options.get("use_gpu"):
            gpu_jobs.append(where)
            assert count_field, f"{where}: how many GPUs does `{job}` with use_gpu use?"
            # left out, score counts the GPUs present at its start: none while the GPU group is scaled to zero
            assert options.get(count_field) is not None, f"{where}: {job} uses GPUs without {count_field}"
            gpus = int(options[count_field])
            assert gpus <= GPUS_PER_POD or gpus % GPUS_PER_POD == 0, f"{where}: {gpus} GPUs leave a pod part-used"
            assert gpus <= capacity, f"{where}: {gpus} GPUs, the GPU groups scale to {capacity}"
    assert gpu_jobs


def test_every_ray_pod_keeps_its_object_store_in_a_memory_backed_dev_shm_that_holds_it():
    for name, group in ray_groups() + serve_groups():
        params = group.get("rayStartParams") or {}
        # Ray's default (30% of the pod's memory, capped by /dev/shm) hides how large /dev/shm must be
        assert "object-store-memory" in params, f"{name}: set object-store-memory in rayStartParams"
        store = int(params["object-store-memory"])
        spec, container = group["template"]["spec"], ray_container(group)
        mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        assert len(mounts) == 1, f"{name}: /dev/shm is not mounted"
        (volume,) = [v for v in spec.get("volumes", []) if v["name"] == mounts[0]["name"]]
        empty_dir = volume.get("emptyDir") or {}
        assert empty_dir.get("medium") == "Memory" and "sizeLimit" in empty_dir, f"{name}: /dev/shm is {volume}"
        shm = quantity(empty_dir["sizeLimit"])
        assert shm >= store, f"{name}: /dev/shm {empty_dir['sizeLimit']} < object store {store} bytes"
        # tmpfs pages count against the container's memory limit: /dev/shm full must leave the processes room
        memory = quantity(container["resources"]["limits"]["memory"])
        assert shm < memory, f"{name}: /dev/shm {empty_dir['sizeLimit']} takes the whole memory limit"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's CLI module imports Serve's pydantic models
def test_ray_start_params_are_options_of_ray_start():
    import click
    from ray.scripts.scripts import start

    for name, group in ray_groups() + serve_groups():
        args = [f"--{key}={value}" for key, value in (group.get("rayStartParams") or {}).items()]
        try:  # KubeRay passes each as --KEY=VALUE to `ray start`; parse them as it would, without starting Ray
            with start.make_context("ray start", list(args)):  # click consumes the list it parses
                pass
        except click.ClickException as error:
            pytest.fail(f"{name}: ray start {' '.join(args)}: {error.format_message()}")


def test_a_cpu_only_worker_group_autoscales_for_decoding():
    cpu_groups = [(name, group) for name, group in ray_groups()[1:] if not any(gpus_per_pod(group))]
    assert cpu_groups, "decoding needs a CPU-only worker group, not the GPU pods' CPUs alone"
    for name, group in cpu_groups:
        assert (group.get("rayStartParams") or {}).get("num-gpus", "0") == "0", name
        assert group["minReplicas"] == 0 < group["maxReplicas"], f"{name}: scales from zero when decoding waits"
        assert quantity(ray_container(group)["resources"]["limits"]["cpu"]) >= 1, name
        # tolerating the GPU nodes' taint would let CPU pods take the CPUs the GPU pods are sized for
        tolerations = group["template"]["spec"].get("tolerations", [])
        gpu_taint = [t for t in tolerations if t.get("key") == GPU or t.get("operator") == "Exists" and "key" not in t]
        assert not gpu_taint, f"{name} tolerates the GPU nodes' taint: {gpu_taint}"


def test_local_cluster_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(INFRA / "local-cluster.sh")], check=True)


# ---- Pod Security Standards: "restricted" --------------------------------------------------------------------------
# https://kubernetes.io/docs/concepts/security/pod-security-standards/ (restricted), written out here as checks
_RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                            "projected", "secret"}
_ADDABLE_CAPABILITIES = {"NET_BIND_SERVICE"}


def restricted_violations(spec: dict) -> list[str]:
    """What keeps a pod spec from the "restricted" Pod Security Standard, plus a read-only root filesystem."""
    found = []
    pod = spec.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            found.append(f"{field} is set")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= _RESTRICTED_VOLUME_TYPES:
            found.append(f"volume {volume['name']} is of type {sorted(kinds)}")
    for container in spec.get("containers", []) + spec.get("initContainers", []):
        where, own = container["name"], container.get("securityContext") or {}

        def setting(name: str):
            return own.get(name, pod.get(name))

        if own.get("privileged"):
            found.append(f"{where}: privileged")
        if own.get("allowPrivilegeEscalation") is not False:
            found.append(f"{where}: allowPrivilegeEscalation is not false")
        capabilities = own.get("capabilities") or {}
        if "ALL" not in capabilities.get("drop", []):
            found.append(f"{where}: capabilities do not drop ALL")
        if set(capabilities.get("add", [])) - _ADDABLE_CAPABILITIES:
            found.append(f"{where}: adds capabilities {capabilities['add']}")
        if setting("runAsNonRoot") is not True or setting("runAsUser") == 0:
            found.append(f"{where}: may run as root")
        if (setting("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
            found.append(f"{where}: no RuntimeDefault or Localhost seccomp profile")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            found.append(f"{where}: a hostPort")
        if own.get("readOnlyRootFilesystem") is not True:
            found.append(f"{where}: the root filesystem is writable")
    return found


def test_every_pod_passes_the_restricted_pod_security_standard_with_a_read_only_root():
    violations = {where: found for where, spec in pod_specs() if (found := restricted_violations(spec))}
    assert not violations, violations
    (cluster,) = of_kind("RayCluster")  # the autoscaler sidecar KubeRay adds to the head pod
    sidecar = {"name": "autoscaler", "securityContext": cluster["spec"]["autoscalerOptions"]["securityContext"]}
    assert restricted_violations({"containers": [sidecar]}) == ["autoscaler: the root filesystem is writable"]


def test_the_restricted_check_finds_what_it_looks_for():
    loose = {"hostNetwork": True, "volumes": [{"name": "h", "hostPath": {"path": "/"}}],
             "containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": 80}],
                             "securityContext": {"privileged": True, "capabilities": {"add": ["SYS_ADMIN"]}}}]}
    assert restricted_violations(loose) == [
        "hostNetwork is set", "volume h is of type ['hostPath']", "c: privileged",
        "c: allowPrivilegeEscalation is not false", "c: capabilities do not drop ALL",
        "c: adds capabilities ['SYS_ADMIN']",
        "c: may run as root", "c: no RuntimeDefault or Localhost seccomp profile", "c: a hostPort",
        "c: the root filesystem is writable",
    ]


def test_job_submitters_carry_no_storage_identity():
    accounts = {doc["metadata"]["name"]: doc for doc in of_kind("ServiceAccount")}
    for where, spec in pod_specs():
        if where.endswith(" submitter") or any(submits(c) for c in spec["containers"]):
            account = accounts[spec["serviceAccountName"]]
            assert not account.get("metadata", {}).get("annotations"), (where, account["metadata"])
            assert account.get("automountServiceAccountToken") is False, where
