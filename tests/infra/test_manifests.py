"""The deployment in infra/ holds together: every manifest parses, every `uniformer` command it runs is a valid
invocation by the CLI's own parser (without running it), and images, Secrets, service accounts, config maps, volumes
and service addresses name things that exist, with credentials only ever referenced from Secrets."""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
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
    jobs = {argv[1] if argv[1] != "submit" else next(a for a in argv[2:] if not a.startswith("-"))
            for _, argv in commands}
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


def test_gpu_workers_autoscale_within_bounds():
    (cluster,) = of_kind("RayCluster")
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    (group,) = cluster["spec"]["workerGroupSpecs"]
    assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"] and group["maxReplicas"] > 0
    (worker,) = group["template"]["spec"]["containers"]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (cron,) = of_kind("CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid" and len(cron["spec"]["schedule"].split()) == 5


def test_local_cluster_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(INFRA / "local-cluster.sh")], check=True)
