"""The deployment in infra/ holds together: every manifest parses, every `uniformer` command it runs is a valid
invocation by the CLI's own parser (without running it), and images, Secrets, service accounts, config maps, volumes
and service addresses name things that exist, with credentials only ever referenced from Secrets. The Ray cluster's
shape fits the jobs: whole 8-GPU pods for NCCL over NVLink, object stores inside a memory-backed /dev/shm, and a
CPU-only group for decoding."""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from fractions import Fraction
from pathlib import Path

import pytest
import yaml

from jobs.submit import SubmitError, check_invocation

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
SECRETS_TEMPLATE = K8S / "secrets.template.yaml"
CREDENTIAL_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL|_URI$", re.IGNORECASE)
SAFE_LITERAL_ENV = {"MLFLOW_TRACKING_URI"}  # a service address, not a credential (pointing at the in-cluster Service)
GPU = "nvidia.com/gpu"
# A GPU pod takes a whole 8-GPU node: the workers of one training run then share NVLink, not sockets between pods.
GPUS_PER_POD = 8
# The option that says how many GPUs a `--gpu` job uses: one per training worker, one per scoring model actor.
GPU_COUNT_OPTION = {"train": "--workers", "retrain": "--workers", "score": "--actors"}


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


def pod_specs() -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod the manifests run."""
    specs = []
    for _, doc in DOCUMENTS:
        kind, spec, label = doc.get("kind"), doc.get("spec", {}), doc.get("kind", "") + "/" + _name(doc)
        if kind == "RayCluster":
            specs.append((f"{label} head", spec["headGroupSpec"]["template"]["spec"]))
            specs += [(f"{label} {g['groupName']}", g["template"]["spec"]) for g in spec["workerGroupSpecs"]]
        elif kind == "RayJob":
            specs.append((f"{label} submitter", spec["submitterPodTemplate"]["spec"]))
        elif kind in ("Deployment", "Job", "StatefulSet"):
            specs.append((label, spec["template"]["spec"]))
        elif kind == "CronJob":
            specs.append((label, spec["jobTemplate"]["spec"]["template"]["spec"]))
    return specs


def containers() -> list[tuple[str, dict]]:
    return [(f"{where} {c['name']}", c) for where, spec in pod_specs()
            for c in spec.get("containers", []) + spec.get("initContainers", [])]


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


def uniformer_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after `uniformer`) of every `uniformer ...` the manifests run."""
    commands = []
    for doc in of_kind("RayJob"):
        argv = shlex.split(doc["spec"]["entrypoint"])
        commands.append((f"RayJob/{_name(doc)}", argv))
    for where, container in containers():
        argv = list(container.get("command", [])) + list(container.get("args", []))
        if argv and argv[0] == "uniformer":
            commands.append((where, argv))
    return commands


def job_of(argv: list[str]) -> str:
    """The uniformer command an argv runs: `uniformer train ...` or `uniformer submit --wait train ...` -> train."""
    return argv[1] if argv[1] != "submit" else next(a for a in argv[2:] if not a.startswith("-"))


def option_value(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


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
    assert {doc["kind"] for _, doc in DOCUMENTS} >= {"RayCluster", "RayJob", "CronJob", "Deployment", "Service",
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
            check_invocation(argv[1:])
        except SubmitError as error:
            failures.append(f"{where}: {error}")
    assert not failures, "invalid uniformer commands in infra/k8s:\n" + "\n".join(failures)


def test_the_cli_check_rejects_what_the_parser_rejects():
    # the check above must be able to fail: an option the command lacks, a missing required option, a bad type
    for argv in (["ingest", "s3://raw/", "--out", "s3://c/", "--frame", "8"], ["score", "s3://a/", "--out", "s3://s/"],
                 ["submit", "--wait", "train", "--data", "s3://c/", "--epochs", "many"]):
        with pytest.raises(SubmitError):
            check_invocation(argv)


def test_mlflow_server_arguments_parse_and_match_the_service_the_jobs_use():
    from mlflow.cli import cli as mlflow_cli

    (deployment,) = [d for d in of_kind("Deployment") if d["metadata"]["name"] == "mlflow"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["mlflow", "server"]
    env = env_of(container)
    for reference in re.findall(r"\$\((\w+)\)", " ".join(container["args"])):
        assert reference in env, f"$({reference}) is expanded by Kubernetes only from the container's own env"
    with mlflow_cli.commands["server"].make_context("server", list(container["args"])) as context:
        params = context.params
    assert params["backend_store_uri"] == "$(MLFLOW_BACKEND_STORE_URI)"
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "uniformer-mlflow-db"
    assert params["artifacts_destination"].startswith("s3://") and params["serve_artifacts"]

    (settings,) = [c for c in of_kind("ConfigMap") if c["metadata"]["name"] == "uniformer-settings"]
    uri = re.fullmatch(r"http://([\w.-]+):(\d+)", settings["data"]["MLFLOW_TRACKING_URI"])
    assert uri, settings["data"]["MLFLOW_TRACKING_URI"]
    host, port = uri.group(1), int(uri.group(2))
    (service,) = [s for s in of_kind("Service") if s["metadata"]["name"] == host]
    (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == port]
    assert service_port["targetPort"] in (port, *(p["name"] for p in container["ports"] if p["containerPort"] == port))
    assert int(params["port"]) == port and f"{host}:{port}" in params["allowed_hosts"].split(",")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


# ---- images --------------------------------------------------------------------------------------------------------
def test_every_pod_runs_the_image_the_dockerfile_builds_as_non_root():
    image = image_built_by_dockerfile()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert image == f"{project['name']}:{project['version']}"
    assert f"-t {image} " in dockerfile(), "the build command in the Dockerfile header tags another image"
    for where, container in containers():
        assert container["image"] == image, where
    users = re.findall(r"^USER\s+(\S+)", dockerfile(), re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    for where, spec in pod_specs():
        assert spec.get("securityContext", {}).get("runAsNonRoot") is True, where


def test_ray_and_cuda_versions_agree_between_base_image_pins_and_raycluster():
    base = re.search(r"^FROM\s+rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(cu\d+)", dockerfile(), re.MULTILINE)
    assert base, "the Dockerfile builds FROM a pinned rayproject/ray:VERSION-pyXY-cuNNN tag"
    ray_version, cuda = base.group(1), base.group(4)
    pins = dict(line.split("==") for line in (INFRA / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert pins["ray"] == ray_version
    assert re.search(rf"TORCH_INDEX_URL=https://download\.pytorch\.org/whl/{cuda}\b", dockerfile())
    for cluster in of_kind("RayCluster"):
        assert cluster["spec"]["rayVersion"] == ray_version
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    named = {re.split(r"[\[<>=!~ ]", dep)[0].lower() for dep in dependencies}
    assert named - {"torch"} <= {name.lower() for name in pins}, "every dependency is pinned for the image"


# ---- secrets, identities, references -------------------------------------------------------------------------------
def test_credentials_come_only_from_secrets_the_template_defines():
    template = {doc["metadata"]["name"]: set(doc.get("stringData", {})) | set(doc.get("data", {}))
                for doc in of_kind("Secret", include_template=True)}
    for secret in of_kind("Secret", include_template=True):
        for key, value in secret.get("stringData", {}).items():
            assert re.fullmatch(r"<[^>]+>", value), f"{secret['metadata']['name']}.{key} is a value, not a placeholder"
    assert not of_kind("Secret"), "Secrets live only in secrets.template.yaml (created out of band)"
    for _, doc in DOCUMENTS:
        for ref in walk(doc, "secretKeyRef"):
            assert ref["key"] in template.get(ref["name"], set()), f"{_name(doc)}: no Secret {ref['name']}/{ref['key']}"
        for ref in walk(doc, "secretRef"):
            assert ref["name"] in template, f"{_name(doc)}: no Secret {ref['name']}"
        for env in walk(doc, "env"):
            for entry in env:
                if CREDENTIAL_NAME.search(entry["name"]) and entry["name"] not in SAFE_LITERAL_ENV:
                    assert "value" not in entry, f"{_name(doc)}: {entry['name']} is inlined; use a secretKeyRef"
    for config in of_kind("ConfigMap"):
        assert not [key for key in config["data"] if CREDENTIAL_NAME.search(key) and key not in SAFE_LITERAL_ENV]


def test_everything_that_talks_to_ray_presents_the_clusters_token():
    (cluster,) = of_kind("RayCluster")
    token_ref = {"name": "uniformer-ray-auth", "key": "auth_token"}

    def authenticates(env: dict, mode_required: bool = True) -> bool:
        token = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
        return token == token_ref and (not mode_required or env.get("RAY_AUTH_MODE", {}).get("value") == "token")

    assert authenticates({e["name"]: e for e in cluster["spec"]["autoscalerOptions"]["env"]}), "autoscaler"
    for where, container in containers():
        if where.startswith(("RayCluster/", "RayJob/")):  # Ray nodes and `ray job submit` need RAY_AUTH_MODE too
            assert authenticates(env_of(container)), where
    for doc in of_kind("RayJob"):
        assert doc["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    head_service = f"http://{cluster['metadata']['name']}-head-svc:8265"  # the Service KubeRay creates for the head
    submitters = [(w, c) for w, c in containers()
                  if c.get("command") == ["uniformer"] and "submit" in c.get("args", [])]
    assert submitters
    for where, container in submitters:  # `uniformer submit` reads the token itself; RAY_AUTH_MODE is not needed
        env = env_of(container)
        assert env["RAY_ADDRESS"]["value"] == head_service and authenticates(env, mode_required=False), where


def test_service_accounts_config_maps_and_volumes_exist():
    accounts, configs, claims = names("ServiceAccount"), names("ConfigMap"), names("PersistentVolumeClaim")
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


# ---- the cluster's shape -------------------------------------------------------------------------------------------
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
    gpu_commands = [(where, argv) for where, argv in uniformer_commands() if "--gpu" in argv]
    assert gpu_commands
    for where, argv in gpu_commands:
        job = job_of(argv)
        assert job in GPU_COUNT_OPTION, f"{where}: how many GPUs does `{job} --gpu` use?"
        count = option_value(argv, GPU_COUNT_OPTION[job])
        # left out, score counts the GPUs present at its start: none while the GPU group is scaled to zero
        assert count is not None, f"{where}: {job} --gpu without {GPU_COUNT_OPTION[job]}"
        gpus = int(count)
        assert gpus <= GPUS_PER_POD or gpus % GPUS_PER_POD == 0, f"{where}: {gpus} GPUs leave a pod part-used"
        assert gpus <= capacity, f"{where}: {gpus} GPUs, the GPU groups scale to {capacity}"


def test_every_ray_pod_keeps_its_object_store_in_a_memory_backed_dev_shm_that_holds_it():
    for name, group in ray_groups():
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

    for name, group in ray_groups():
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
