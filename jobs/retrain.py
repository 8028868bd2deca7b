"""`uniformer retrain`: ingest what is new, train a candidate, and promote it to `champion` only if it beats the
current champion on the same fixed validation set, judged as production scores: `uniformer evaluate` (the scoring
pipeline on the cluster's workers) at the scoring views, top-1 by default. A version's figures on a dataset version
and views are kept on its tags, so a champion is evaluated once.

MLflow has no compare-and-set for aliases, so promotion runs under a lease kept in the registry itself, one per
registered model (see PromotionLock): holding it, a retrain reads the alias, re-evaluates the champion if it changed
since the gate was computed, checks that the lease is still its own, sets the alias and reads it back. Two retrains
of one model, whatever storage each trains into, therefore cannot both promote a model that the other has since
beaten. Only a model whose versions were never judged lets a candidate in unopposed: a registry that cannot be read
stops the retrain with nothing promoted.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field

from jobs.evaluate import evaluate_model
from jobs.ingest import run_ingest
from jobs.options import GATE_METRICS, EvaluateConfig, RetrainConfig, ScoreConfig, ScoreOptions
from jobs.registry import (
    CHAMPION,
    ChampionUnknown,
    RegistryLease,
    champion_version,
    model_versions,
    probe_tracking_server,
    resolve_model,
    tracking_uri,
    version_trained_on,
)
from jobs.train import run_train
from pipeline import load_manifest, parse_dataset_ref, parse_uri
from pipeline.manifest import content_fingerprint, latest_manifest
from pipeline.storage import Storage


@dataclass
class GateDecision:
    promoted: bool
    reason: str
    candidate_version: int
    candidate_score: float
    champion_version: int | None
    champion_score: float | None
    metric: str = "accuracy"  # what was compared (jobs.evaluate figures: top-1 by default)
    views: str = ScoreConfig.views


@dataclass
class RetrainResult:
    dataset_version: int
    new_videos: int
    decision: GateDecision | None  # None when there was nothing new to train on
    messages: list[str] = field(default_factory=list)


@dataclass
class RetrainPreview:
    """What a retrain would do (`dry_run`): the listing, the dataset and the registry read; nothing ingested,
    trained, registered or promoted."""

    new_videos: int  # what ingest would decode
    dataset_version: int | None  # the dataset's version now
    would_train: bool
    reason: str
    champion_version: int | None
    starts_from: str  # the candidate's initial weights
    dry_run: bool = True


def preview_retrain(config: RetrainConfig, client, echo=print) -> RetrainPreview:
    source, dataset, model_name = config.source, config.dataset, config.model_name
    ingest = run_ingest(config.ingest, dry_run=True, echo=echo)
    current = latest_manifest(parse_uri(dataset), Storage(config.endpoint_url))
    if ingest.to_decode or ingest.replaced_or_removed:
        would_train = True
        reason = (f"ingest would decode {ingest.to_decode} videos and drop the clips of "
                  f"{ingest.replaced_or_removed} changed or removed")
    elif current is None:
        would_train, reason = False, f"nothing to ingest from {source} and no dataset at {dataset}"
    else:
        learnt = version_trained_on(client, model_name, content_fingerprint(current))
        would_train = learnt is None
        reason = (f"{model_name} v{learnt.version} learnt {dataset}@{current.version}'s data" if learnt else
                  f"no gated version of {model_name} learnt {dataset}@{current.version}'s data")
    champion = champion_version(client, model_name)
    pretrained = config.train.pretrained or "random initialisation"
    starts_from = (f"models:/{model_name}/{champion}" if config.init == "champion" and champion is not None
                   else pretrained)
    preview = RetrainPreview(ingest.to_decode, current.version if current else None, would_train, reason, champion,
                             starts_from)
    if would_train:
        echo(f"[retrain] dry run: would train a candidate ({reason}) from {starts_from}, register it and gate it "
             f"against champion v{champion}; nothing written")
    else:
        echo(f"[retrain] dry run: nothing new ({reason}); nothing written")
    return preview


def evaluate_version(model_name: str, version: int, val_ref: str, views: str, metric: str, uri: str,
                     endpoint_url: str | None = None, options=None) -> float:
    """The gate's figure for one registered version: `uniformer evaluate` at the views scoring uses (decoding and the
    model run as Ray tasks on the cluster's workers, GPUs with `--gpu`), read back from the version's tags when it
    was already evaluated on this dataset version and views."""
    config = EvaluateConfig(val_ref, f"models:/{model_name}/{version}", views=views, options=options or ScoreOptions(),
                            tracking_uri=uri, endpoint_url=endpoint_url)
    evaluation = evaluate_model(config, use_cache=True)
    return evaluation.metrics[metric]


class PromotionLock(RegistryLease):
    """The promotion lease of one registered model, in its tracking server's registry: held by at most one retrain
    at a time, from reading the champion alias to reading it back after moving it."""

    name, contender, on_loss = "promotion lock", "another retrain", f"the {CHAMPION} alias is left as it is"

    def __init__(self, client, model_name: str, **lease_options):
        super().__init__(client, model_name, "promotion", **lease_options)


def best_judged_version(client, model_name: str, val_ref: str, metric: str, views: str) -> int | None:
    """What the gate compares with when the model has no champion alias: None for a model whose versions were never
    judged (its first candidate becomes champion), else the version the gate judged best on this validation set,
    metric and views. A model whose champion alias was removed (its version deleted, or the alias by hand) is not
    new: a candidate must still beat what the gate has seen. ChampionUnknown when none was judged like this one."""
    judged = [version for version in model_versions(client, model_name) if "gate.decision" in version.tags]
    if not judged:
        return None
    comparable = [
        version for version in judged
        if (version.tags.get("gate.val_dataset"), version.tags.get("gate.metric"), version.tags.get("gate.views"))
        == (val_ref, metric, views) and version.tags.get("gate.candidate_score")
    ]
    if not comparable:
        raise ChampionUnknown(
            f"{model_name} has no {CHAMPION} alias, and none of its {len(judged)} judged versions was judged on "
            f"{val_ref} by {metric} at {views} views: nothing promoted. Set the alias by hand (`mlflow` client "
            f"set_registered_model_alias({model_name!r}, {CHAMPION!r}, VERSION)) and run the retrain again"
        )
    best = max(comparable, key=lambda version: (float(version.tags["gate.candidate_score"]), int(version.version)))
    return int(best.version)


def gate(candidate_accuracy: float, champion_accuracy: float | None, min_gain: float,
         against: str = CHAMPION) -> tuple[bool, str]:
    if champion_accuracy is None:
        return True, "no champion yet: the first model becomes champion"
    gain = candidate_accuracy - champion_accuracy
    if gain > 0 and gain >= min_gain:
        return True, f"candidate beats {against} by {gain:+.4f} (>= {min_gain})"
    return False, f"candidate does not beat {against} by {min_gain} (gain {gain:+.4f})"


def promote_if_better(model_name: str, candidate_version: int, candidate_score: float, val_ref: str,
                      min_gain: float, lock: PromotionLock, uri: str, endpoint_url: str | None = None,
                      views: str = ScoreConfig.views, metric: str = "accuracy", options=None) -> GateDecision:
    """The guarded read-decide-set-verify of the champion alias. The champion is evaluated before the lease is taken
    (usually read from its version's tags); the lease covers reading the alias, comparing, setting the alias and
    reading it back, and an evaluation only when the champion moved in between."""
    import mlflow

    if metric not in GATE_METRICS:
        raise ValueError(f"gate metric must be one of {', '.join(GATE_METRICS)}, not {metric!r}")
    client = mlflow.MlflowClient(uri)

    def score(version: int) -> float:
        return evaluate_version(model_name, version, val_ref, views, metric, uri, endpoint_url, options)

    scores = {}
    expected = champion_version(client, model_name)
    if expected is not None and expected != candidate_version:
        scores[expected] = score(expected)
    with lock:
        champion = champion_version(client, model_name)
        if champion == candidate_version:
            return GateDecision(False, "candidate is already champion", candidate_version, candidate_score,
                                champion, candidate_score, metric, views)
        stand_in = None
        if champion is None:
            champion = stand_in = best_judged_version(client, model_name, val_ref, metric, views)
        champion_score = None
        if champion is not None:
            if champion not in scores:  # the alias moved since: its figures are on its tags when it was gated
                scores[champion] = score(champion)
            champion_score = scores[champion]
        if stand_in is None:
            promoted, reason = gate(candidate_score, champion_score, min_gain)
        else:
            promoted, reason = gate(candidate_score, champion_score, min_gain, f"v{stand_in}")
            reason = f"no {CHAMPION} alias: judged against v{stand_in}, the best version the gate judged; {reason}"
        if promoted:
            lock.ensure_held()  # the evaluation may have outlasted a lease that could not be renewed
            client.set_registered_model_alias(model_name, CHAMPION, str(candidate_version))
            now = client.get_model_version_by_alias(model_name, CHAMPION)
            if int(now.version) != candidate_version:
                raise RuntimeError(f"alias {CHAMPION} reads back version {now.version}, not {candidate_version}")
    decision = GateDecision(promoted, reason, candidate_version, candidate_score, champion, champion_score, metric,
                            views)
    tags = {
        "gate.decision": "promoted" if promoted else "rejected",
        "gate.reason": reason,
        "gate.val_dataset": val_ref,
        "gate.metric": metric,
        "gate.views": views,
        "gate.candidate_score": f"{candidate_score:.6f}",
        "gate.champion_version": str(champion),
        "gate.champion_score": "" if champion_score is None else f"{champion_score:.6f}",
    }
    for key, value in tags.items():
        client.set_model_version_tag(model_name, str(candidate_version), key, value)
    return decision


def run_retrain(config: RetrainConfig, *, dry_run: bool = False, echo=print) -> RetrainResult | RetrainPreview:
    """One scheduled retraining cycle; see the module docstring. With `dry_run`, what it would do."""
    import mlflow

    source, dataset, model_name, endpoint_url = config.source, config.dataset, config.model_name, config.endpoint_url
    gate_views, gate_metric = config.gate_views, config.gate_metric
    uri = tracking_uri(config.train.tracking_uri)
    probe_tracking_server(uri)
    client = mlflow.MlflowClient(uri)
    if dry_run:
        return preview_retrain(config, client, echo)
    summary = run_ingest(config.ingest, echo=echo)
    manifest = load_manifest(dataset, endpoint_url=endpoint_url)
    data_ref = f"{dataset}@{manifest.version}"
    val_ref = f"{parse_dataset_ref(config.val)[0]}@{load_manifest(config.val, endpoint_url=endpoint_url).version}"

    learnt = version_trained_on(client, model_name, content_fingerprint(manifest))
    if learnt is not None:
        echo(f"[retrain] nothing new in {source}: {data_ref} holds the data {model_name} v{learnt.version} was trained "
             f"on ({learnt.tags.get('dataset')}, content {learnt.tags['dataset_fingerprint']})")
        return RetrainResult(manifest.version, summary.ingested, None, ["nothing new"])

    cfg = dataclasses.replace(config.train)  # run_train makes its paths absolute: the configuration stays as given
    cfg.data, cfg.val_data, cfg.register_as, cfg.tracking_uri = data_ref, val_ref, model_name, uri
    cfg.endpoint_url = cfg.endpoint_url or endpoint_url
    with tempfile.TemporaryDirectory() as scratch:
        if config.init == "champion":
            version = champion_version(client, model_name)
            if version is None:  # the normal first run
                echo(f"[retrain] no champion of {model_name} yet: candidate starts from the configured weights")
            else:
                champion = resolve_model(f"models:/{model_name}/{version}", scratch, uri)
                # pinned by version: workers on other nodes fetch the same weights themselves
                cfg.pretrained = f"models:/{model_name}/{version}"
                echo(f"[retrain] candidate starts from {champion.identity.describe()}")
        result = run_train(cfg)
    options = ScoreOptions(use_gpu=cfg.use_gpu)
    score = evaluate_version(model_name, result.registered_version, val_ref, gate_views, gate_metric, uri,
                             cfg.endpoint_url, options)
    decision = promote_if_better(model_name, result.registered_version, score, val_ref, config.min_gain,
                                 PromotionLock(client, model_name), uri,
                                 cfg.endpoint_url, gate_views, gate_metric, options)
    for key, value in (("dataset", data_ref), ("val_dataset", val_ref), ("gate_decision", str(decision.promoted))):
        client.set_tag(result.mlflow_run_id, f"retrain.{key}", value)
    against = ("no champion" if decision.champion_score is None else
               f"champion v{decision.champion_version} {decision.champion_score:.4f}")
    echo(
        f"[retrain] {model_name} v{decision.candidate_version} {gate_metric} at {gate_views} views "
        f"{decision.candidate_score:.4f} vs {against}: "
        f"{'PROMOTED' if decision.promoted else 'kept champion'} ({decision.reason})"
    )
    return RetrainResult(manifest.version, summary.ingested, decision)
