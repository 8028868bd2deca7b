"""The retraining gate against a real MLflow server and real registered models, evaluated on a real clip dataset."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import mlflow
import pytest
import torch

import jobs.retrain
import model
from jobs.config import build
from jobs.ingest import run_ingest
from jobs.options import IngestConfig, RetrainConfig
from jobs.registry import CHAMPION, ChampionUnknown, champion_version, log_model, model_versions
from jobs.retrain import PromotionLock, gate, promote_if_better, run_retrain
from model.package import ModelCard, save_package
from pipeline import generate_motion_dataset, load_manifest, parse_uri
from pipeline.lease import Lease, LeaseHeld, LeaseLost
from pipeline.manifest import content_fingerprint, write_manifest
from pipeline.storage import Storage
from tests.conftest import start_local_ray

pytestmark = pytest.mark.integration
CLASSES = ["down", "left", "right", "up"]


@pytest.fixture(scope="module")
def left_only_validation(tmp_path_factory) -> str:
    """A validation set whose every clip is `left`: a model that always answers `left` scores 1.0, any other 0.0."""
    root = tmp_path_factory.mktemp("gate")
    generate_motion_dataset(root / "videos", 3, classes=("left",), size=(40, 40), num_frames=16, seed=4)
    start_local_ray()
    run_ingest(
        build(
            IngestConfig,
            dict(
                src=str(root / "videos"), out=str(root / "val"), labels_from_dirs=True, frames=8, size=32, short_side=40
            ),
        )
    )
    return str(root / "val") + "@1"


def register_constant_model(name: str, answer: str, tracking_uri: str, tmp_path) -> int:
    """A real registered tiny UniFormerV2 whose head always picks `answer`."""
    net = model.create_model("uniformerv2_tiny", num_classes=4, t_size=8)
    with torch.no_grad():
        net.head.fc.weight.zero_()
        net.head.fc.bias.copy_(torch.tensor([10.0 if c == answer else 0.0 for c in CLASSES]))
    card = ModelCard(model="uniformerv2_tiny", num_classes=4, overrides={"t_size": 8}, class_names=CLASSES,
                     frames=8, crop_size=32, short_side=40)
    weights, _ = save_package(net, card, tmp_path / f"{answer}-{name}")
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("gate-tests")
    with mlflow.start_run() as run:
        pass
    return log_model(run.info.run_id, weights, card, tracking_uri, register_as=name)[1]


def lock_for(uri: str, name: str) -> PromotionLock:
    """A retrain's promotion lock: in the registry at `uri`, wherever the retrain's storage is."""
    return PromotionLock(mlflow.MlflowClient(uri), name, wait_s=120)


def champion_of(name: str, uri: str) -> int:
    return int(mlflow.MlflowClient(uri).get_model_version_by_alias(name, CHAMPION).version)


def test_gate_rule():
    assert gate(0.5, None, 0.1)[0]
    assert gate(0.8, 0.7, 0.05)[0]
    assert not gate(0.72, 0.7, 0.05)[0]
    assert not gate(0.7, 0.7, 0.0)[0]  # a tie does not beat the champion


def test_first_model_becomes_champion_and_better_replaces_it_but_worse_does_not(
    left_only_validation, mlflow_server, tmp_path
):
    uri, name = mlflow_server.uri, "gate-sequence"
    weak = register_constant_model(name, "right", uri, tmp_path)
    first = promote_if_better(name, weak, 0.0, left_only_validation, 0.0, lock_for(uri, name), uri)
    assert first.promoted and champion_of(name, uri) == weak

    strong = register_constant_model(name, "left", uri, tmp_path)
    better = promote_if_better(name, strong, 1.0, left_only_validation, 0.5, lock_for(uri, name), uri)
    assert better.promoted and better.champion_score == 0.0 and champion_of(name, uri) == strong

    worse = register_constant_model(name, "up", uri, tmp_path)
    rejected = promote_if_better(name, worse, 0.0, left_only_validation, 0.0, lock_for(uri, name), uri)
    assert not rejected.promoted and rejected.champion_score == 1.0 and champion_of(name, uri) == strong
    tags = mlflow.MlflowClient(uri).get_model_version(name, str(worse)).tags
    assert tags["gate.decision"] == "rejected" and tags["gate.champion_version"] == str(strong)


def test_a_model_whose_champion_version_was_deleted_is_judged_against_its_best_judged_version(
    left_only_validation, mlflow_server, tmp_path
):
    uri, name = mlflow_server.uri, "gate-deleted-champion"
    client = mlflow.MlflowClient(uri)
    weak = register_constant_model(name, "right", uri, tmp_path)
    promote_if_better(name, weak, 0.0, left_only_validation, 0.0, lock_for(uri, name), uri)
    strong = register_constant_model(name, "left", uri, tmp_path)
    promote_if_better(name, strong, 1.0, left_only_validation, 0.0, lock_for(uri, name), uri)
    client.delete_model_version(name, str(strong))  # the champion alias goes with its version
    assert champion_version(client, name) is None

    poor = register_constant_model(name, "up", uri, tmp_path)
    decision = promote_if_better(name, poor, 0.0, left_only_validation, 0.0, lock_for(uri, name), uri)
    assert not decision.promoted and decision.champion_version == weak, decision
    assert decision.reason.startswith(f"no champion alias: judged against v{weak}, the best version the gate judged")
    assert champion_version(client, name) is None  # not "no champion yet": nothing was promoted

    # judged only on another validation set: nothing to compare with, nothing promoted
    with pytest.raises(ChampionUnknown, match="none of its 2 judged versions was judged on elsewhere@1"):
        promote_if_better(name, poor, 0.0, "elsewhere@1", 0.0, lock_for(uri, name), uri)
    better = register_constant_model(name, "left", uri, tmp_path)
    decision = promote_if_better(name, better, 1.0, left_only_validation, 0.0, lock_for(uri, name), uri)
    assert decision.promoted and champion_of(name, uri) == better


def test_two_retrains_promoting_at_once_do_not_both_promote(left_only_validation, mlflow_server, tmp_path):
    uri, name = mlflow_server.uri, "gate-race"
    weak = register_constant_model(name, "right", uri, tmp_path)
    promote_if_better(name, weak, 0.0, left_only_validation, 0.0, lock_for(uri, name), uri)
    candidates = [register_constant_model(name, "left", uri, tmp_path) for _ in range(2)]

    decisions, start = {}, threading.Barrier(2)

    def promote(version: int) -> None:
        start.wait()
        decisions[version] = promote_if_better(name, version, 1.0, left_only_validation, 0.0,
                                               lock_for(uri, name), uri)

    threads = [threading.Thread(target=promote, args=(v,)) for v in candidates]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    promoted = [v for v, d in decisions.items() if d.promoted]
    assert len(decisions) == 2 and len(promoted) == 1
    loser = next(d for v, d in decisions.items() if not d.promoted)
    assert loser.champion_version == promoted[0] and loser.champion_score == 1.0
    assert champion_of(name, uri) == promoted[0]


class StorageLease(Lease):
    """pipeline.lease under test here (training's run lock is one); promotion's lock is in the registry."""

    name, contender = "storage lease", "another holder"


def crash_holding(storage: Storage, location) -> None:
    """What a retrain that died holding the lease leaves: a lease object that has expired."""
    storage.put_bytes(location, json.dumps({"owner": "crashed", "expires_at": time.time() - 1}).encode(),
                      if_absent=True)


def test_an_expired_storage_lease_of_a_crashed_holder_is_taken_over(tmp_path):
    location = parse_uri(str(tmp_path / "locks" / "m.lock"))
    crash_holding(Storage(), location)
    with StorageLease(Storage(), location) as lease:
        assert lease.owner in Storage().read_bytes(lease.location).decode()
    held = StorageLease(Storage(), parse_uri(str(tmp_path / "locks" / "n.lock")))
    with held, pytest.raises(TimeoutError, match="held by another holder"):
        StorageLease(Storage(), held.location, wait_s=0.5).__enter__()


def contend_at_once(contenders: list) -> list[str]:
    """Each lease (storage or registry) tried at the same moment by its own thread: "held" or "gave up" each, the
    holder keeping it until every other has given up."""
    outcomes, start, tried = {}, threading.Barrier(len(contenders)), threading.Barrier(len(contenders))

    def contend(lease) -> None:
        start.wait()
        try:
            lease.__enter__()
        except TimeoutError:
            outcomes[lease.owner] = "gave up"
            tried.wait()
            return
        outcomes[lease.owner] = "held"
        tried.wait()
        lease.__exit__(None, None, None)

    threads = [threading.Thread(target=contend, args=(lease,)) for lease in contenders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return list(outcomes.values())


def test_two_contenders_over_an_expired_lease_exactly_one_holds_it(storage_folder):
    storage, folder = storage_folder
    for round_ in range(5):
        location = folder.join(f"round-{round_}.lock")
        crash_holding(storage, location)
        contenders = [StorageLease(storage, location, wait_s=1.0) for _ in range(2)]
        assert sorted(contend_at_once(contenders)) == ["gave up", "held"], f"round {round_}"


class StaleReads(Storage):
    """A waiter whose reads of the lease lag behind: it keeps seeing the lease as it was when it first looked."""

    def __init__(self, storage: Storage, snapshot: tuple[bytes, str]):
        super().__init__(storage.endpoint_url)
        self.snapshot, self.served = snapshot, 0

    def read_versioned(self, location):
        self.served += 1
        return self.snapshot


def test_a_waiter_that_saw_the_lease_expire_cannot_replace_it_once_taken_over(storage_folder):
    storage, folder = storage_folder
    location = folder.join("m.lock")
    crash_holding(storage, location)
    late = StaleReads(storage, storage.read_versioned(location))
    with StorageLease(storage, location) as first:
        with pytest.raises(TimeoutError):
            StorageLease(late, location, wait_s=0.5).__enter__()
        assert late.served >= 1 and json.loads(late.snapshot[0])["owner"] == "crashed"  # it did see it expired
        assert json.loads(storage.read_bytes(location))["owner"] == first.owner


def test_a_held_lease_is_renewed_and_released_for_the_next_retrain(storage_folder):
    storage, folder = storage_folder
    location = folder.join("m.lock")
    with StorageLease(storage, location, ttl_s=2.0, renew_every_s=0.2) as holder:
        first = json.loads(storage.read_bytes(location))["expires_at"]
        while time.time() < first + 0.5:  # past the expiry of the lease as first written
            time.sleep(0.05)
        assert json.loads(storage.read_bytes(location))["expires_at"] > first
        holder.ensure_held()
        with pytest.raises(TimeoutError):
            StorageLease(storage, location, wait_s=0.3).__enter__()
    with StorageLease(storage, location, wait_s=0.3) as next_one:
        assert json.loads(storage.read_bytes(location))["owner"] == next_one.owner


def test_releasing_a_lease_that_vanished_does_not_fail(storage_folder):
    storage, folder = storage_folder
    with StorageLease(storage, folder.join("m.lock")) as lock:
        storage.delete(lock.location)
        with pytest.raises(LeaseLost):
            lock.ensure_held()


def test_a_holder_whose_lease_expired_and_was_taken_over_cannot_move_the_alias(
    left_only_validation, mlflow_server, tmp_path, monkeypatch
):
    uri, name = mlflow_server.uri, "gate-lease-lost"
    client = mlflow.MlflowClient(uri)
    weak = register_constant_model(name, "right", uri, tmp_path)
    promote_if_better(name, weak, 0.0, left_only_validation, 0.0, lock_for(uri, name), uri)
    strong = register_constant_model(name, "left", uri, tmp_path)

    # A holder whose renewals never come (a stalled process): while it reads the champion, its lease expires and
    # another retrain takes it over.
    stalled = PromotionLock(client, name, ttl_s=0.5, renew_every_s=3600)
    thieves, lookups = [], []
    lookup = jobs.retrain.champion_version

    def lookup_while_taken_over(*args, **kwargs):
        lookups.append(args)
        if len(lookups) == 2:  # the read under the lease
            thieves.append(PromotionLock(client, name, wait_s=60).__enter__())
        return lookup(*args, **kwargs)

    monkeypatch.setattr(jobs.retrain, "champion_version", lookup_while_taken_over)
    with pytest.raises(LeaseLost, match="no longer held"):
        promote_if_better(name, strong, 1.0, left_only_validation, 0.0, stalled, uri)
    generations = thieves[0].generations()  # the takeover really happened: a newer generation, the thief's
    assert max(generations) == thieves[0].generation > 1 and generations[thieves[0].generation]["owner"] == \
        thieves[0].owner
    thieves[0].__exit__(None, None, None)
    assert champion_of(name, uri) == weak
    assert thieves[0].generations() == {}  # released: no lock model left in the registry


def test_the_promotion_lock_lives_in_the_registry_one_per_model_and_is_exclusive(mlflow_server):
    client, other_client = mlflow.MlflowClient(mlflow_server.uri), mlflow.MlflowClient(mlflow_server.uri)
    with PromotionLock(client, "lock-a") as held:
        assert held.generations() == {1: {"owner": held.owner, "expires_at": held.generations()[1]["expires_at"]}}
        # another process of the same tracking server (another storage, another machine) waits for it ...
        with pytest.raises(LeaseHeld, match="promotion lock .*lock-a.promotion-lock.N.* is held by another retrain"):
            PromotionLock(other_client, "lock-a", wait_s=0.5).__enter__()
        # ... a lock of another model does not, nor one whose name LIKE's wildcards would match
        with PromotionLock(other_client, "lock_a"), PromotionLock(other_client, "lock-ab"):
            pass
        held.ensure_held()
    with PromotionLock(other_client, "lock-a", wait_s=0.5) as next_one:
        assert next_one.generation == 1
    # a crashed holder's lease lapses and is taken over by a newer generation, which removes the older one
    crashed = PromotionLock(client, "lock-c", ttl_s=0.3, renew_every_s=3600)
    crashed.__enter__()
    with PromotionLock(other_client, "lock-c", wait_s=5) as successor:
        assert successor.generation == 2 and set(successor.generations()) == {2}
        with pytest.raises(LeaseLost):
            crashed.ensure_held()


def test_two_contenders_over_an_expired_promotion_lock_exactly_one_holds_it(mlflow_server):
    client = mlflow.MlflowClient(mlflow_server.uri)
    for round_ in range(3):
        name = f"lock-race-{round_}"
        PromotionLock(client, name, ttl_s=0.2, renew_every_s=3600).__enter__()  # crashed holder
        time.sleep(0.3)
        contenders = [PromotionLock(mlflow.MlflowClient(mlflow_server.uri), name, wait_s=1.0) for _ in range(2)]
        assert sorted(contend_at_once(contenders)) == ["gave up", "held"], f"round {round_}"


class FailingRegistry:
    """A proxy to the real MLflow server that answers 503 to the next `refusals` registered-model reads (the
    champion lookup and its retries: a short outage) and forwards everything else; `refused` lists the reads it
    answered 503."""

    def __init__(self, upstream: str, refusals: int):
        refused = self.refused = []

        class Handler(BaseHTTPRequestHandler):
            def relay(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if (self.command == "GET" and self.path.startswith("/api/2.0/mlflow/registered-models/")
                        and len(refused) < refusals):
                    refused.append(self.path)
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                request = urllib.request.Request(upstream + self.path, data=body or None, method=self.command,
                                                 headers={"Content-Type": self.headers.get("Content-Type", "")})
                try:
                    with urllib.request.urlopen(request, timeout=60) as response:
                        status, headers, payload = response.status, response.headers, response.read()
                except urllib.error.HTTPError as error:
                    status, headers, payload = error.code, error.headers, error.read()
                self.send_response(status)
                self.send_header("Content-Type", headers.get("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PATCH = do_DELETE = relay

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.uri = f"http://127.0.0.1:{self.server.server_port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


RETRIES = 1  # the MLflow client's own retries of a 5xx, kept few and without backoff


@pytest.fixture
def failing_registry(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(RETRIES))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    proxy = FailingRegistry(mlflow_server.uri, refusals=RETRIES + 1)
    yield proxy
    proxy.close()


def test_no_champion_only_when_the_model_or_its_alias_does_not_exist(mlflow_server, tmp_path):
    client = mlflow.MlflowClient(mlflow_server.uri)
    assert champion_version(client, "gate-never-registered") is None
    version = register_constant_model("gate-no-alias", "left", mlflow_server.uri, tmp_path)
    assert champion_version(client, "gate-no-alias") is None
    client.set_registered_model_alias("gate-no-alias", CHAMPION, str(version))
    assert champion_version(client, "gate-no-alias") == version


def test_a_registry_answering_5xx_stops_the_gate_with_nothing_promoted(
    left_only_validation, mlflow_server, failing_registry, tmp_path
):
    uri, name = mlflow_server.uri, "gate-registry-down"
    strong = register_constant_model(name, "left", uri, tmp_path)
    promote_if_better(name, strong, 1.0, left_only_validation, 0.0, lock_for(uri, name), uri)
    weak = register_constant_model(name, "right", uri, tmp_path)
    with pytest.raises(ChampionUnknown, match="nothing promoted"):
        promote_if_better(name, weak, 0.0, left_only_validation, 0.0, lock_for(uri, name), failing_registry.uri)
    assert len(failing_registry.refused) == RETRIES + 1  # the registry really answered 503 to every attempt
    assert champion_of(name, uri) == strong
    assert "gate.decision" not in mlflow.MlflowClient(uri).get_model_version(name, str(weak)).tags


def test_retrain_does_not_start_from_pretrained_weights_when_the_champion_cannot_be_read(
    left_only_validation, mlflow_server, failing_registry, tmp_path, monkeypatch
):
    uri, name = mlflow_server.uri, "retrain-registry-down"
    champion = register_constant_model(name, "left", uri, tmp_path)
    promote_if_better(name, champion, 1.0, left_only_validation, 0.0, lock_for(uri, name), uri)
    generate_motion_dataset(tmp_path / "videos", 1, classes=("left",), size=(40, 40), num_frames=16, seed=5)

    def train_without_champion(cfg):
        raise AssertionError(f"training started from {cfg.pretrained!r} instead of the champion")

    monkeypatch.setattr(jobs.retrain, "run_train", train_without_champion)
    config = build(RetrainConfig, dict(
        source=str(tmp_path / "videos"), dataset=str(tmp_path / "clips"), model_name=name, val=left_only_validation,
        train=dict(storage=str(tmp_path / "runs"), tracking_uri=failing_registry.uri),
        ingest=dict(labels_from_dirs=True, frames=8, size=32, short_side=40),
    ))
    with pytest.raises(ChampionUnknown, match="nothing promoted"):
        run_retrain(config, echo=lambda line: None)
    assert len(failing_registry.refused) == RETRIES + 1


def test_a_model_name_cannot_widen_or_redirect_the_versions_filter(mlflow_server, tmp_path):
    client = mlflow.MlflowClient(mlflow_server.uri)
    victim = register_constant_model("gate-victim", "left", mlflow_server.uri, tmp_path)
    assert [int(v.version) for v in model_versions(client, "gate-victim")] == [victim]
    assert model_versions(client, "gate-victim' AND name='gate-victim") == []
    quoted = register_constant_model("gate-o'brien", "left", mlflow_server.uri, tmp_path)
    assert [int(v.version) for v in model_versions(client, "gate-o'brien")] == [quoted]
    with pytest.raises(ValueError, match="both quote characters"):
        model_versions(client, """gate-'both"quotes""")


def test_retrain_skips_a_new_version_number_holding_the_data_the_champion_learnt(
    left_only_validation, mlflow_server, tmp_path, monkeypatch
):
    uri, name = mlflow_server.uri, "retrain-same-content"
    videos, clips = tmp_path / "videos", str(tmp_path / "clips")
    generate_motion_dataset(videos, 1, classes=("left",), size=(40, 40), num_frames=16, seed=7)
    ingest = {"labels_from_dirs": True, "frames": 8, "size": 32, "short_side": 40}
    run_ingest(build(IngestConfig, dict(src=str(videos), out=clips, **ingest)))
    first = load_manifest(clips)
    client = mlflow.MlflowClient(uri)
    champion = register_constant_model(name, "left", uri, tmp_path)
    # as training tags what it registers
    client.set_model_version_tag(name, str(champion), "dataset", f"{clips}@1")
    client.set_model_version_tag(name, str(champion), "dataset_fingerprint", content_fingerprint(first))
    client.set_registered_model_alias(name, CHAMPION, str(champion))
    # what a re-run that only decoded its failing videos again published: the same shards as the next version
    write_manifest(parse_uri(clips), dataclasses.replace(first, version=2, previous_version=1), Storage())
    monkeypatch.setattr(jobs.retrain, "run_train", lambda cfg: pytest.fail(f"trained again on {cfg.data}"))
    lines = []
    config = build(RetrainConfig, dict(source=str(videos), dataset=clips, model_name=name, val=left_only_validation,
                                       train=dict(storage=str(tmp_path / "runs"), tracking_uri=uri), ingest=ingest))
    result = run_retrain(config, echo=lines.append)
    assert (result.dataset_version, result.decision, result.messages) == (2, None, ["nothing new"])
    assert f"{clips}@2 holds the data {name} v{champion} was trained on" in lines[-1]
