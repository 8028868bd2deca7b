"""`uniformer serve`: the registered model behind a Ray Serve HTTP application.

Each replica holds the model as the registered pyfunc holds it (jobs.serving.pyfunc_model, built from the package
files that `jobs.registry.resolve_model` fetches), so a video is decoded and predicted as `score` and `predict` do
it. Videos of concurrent requests are gathered into one model call (`@serve.batch`). With a `models:/NAME@ALIAS`
reference each replica looks at the alias every `poll_s` seconds and, when it points to another version, loads that
version beside the one answering and then swaps: a request is answered whole by the version that held the replica
when it arrived, and the response names it.

    POST /  {"videos": [{"video": BASE64} | {"uri": "s3://... or a path on the replica, under --allow-uris"}, ...],
             "top_k": 5, "views": "4x3"}                       (top_k and views optional)
         -> {"model": {name, version, alias, ...}, "predictions": [{"top_k": [{id, name, prob}], "error": null}, ...]}
    GET  /  -> {"model": {...}}

A video that cannot be read or decoded is answered with its own error; a request that is not of this form gets a 400.
The tracking URI travels to the replicas only when it holds no credentials (jobs.credentials): otherwise each replica
reads MLFLOW_TRACKING_URI from its own environment.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from jobs.console import init_ray
from jobs.credentials import adopt_mlflow_env, mlflow_env_for_workers, redact
from jobs.options import ServeConfig
from jobs.registry import alias_of, alias_version, resolve_model
from jobs.registry import tracking_uri as resolve_tracking_uri
from pipeline.storage import uri_within
from pipeline.views import parse_views

APP_NAME = "uniformer"
DEPLOYMENT = "UniFormerV2"
MAX_VIDEOS_PER_REQUEST = 64

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request body that is not of the form the endpoint takes: a 400 with this message."""


@dataclass(frozen=True)
class Served:
    """One loaded version: its identity (as `resolve_model` pins it) and the pyfunc classifier."""

    identity: Any  # jobs.registry.ModelIdentity
    classifier: Any  # jobs.serving.pyfunc_model.UniFormerV2Classifier

    @property
    def model(self) -> dict:
        return self.identity.to_dict()


@dataclass(frozen=True)
class Video:
    """One video of a request, on its way through a batch: the version its request is pinned to, its pyfunc row."""

    served: Served
    row: dict  # {"video": base64 text} or {"uri": ...}
    views: str
    top_k: int


def parse_request(
    body, default_views: str, default_top_k: int, uri_prefixes: tuple[str, ...] = ()
) -> tuple[list[dict], str, int]:
    """The videos of a request body as pyfunc rows, with its views and top-k. A video named by URI must lie under
    one of `uri_prefixes` (none by default: a client could otherwise make the replica read any file or object it can
    reach)."""
    if not isinstance(body, dict) or not isinstance(body.get("videos"), list):
        raise RequestError('expected a JSON object {"videos": [{"video": BASE64} or {"uri": URI}, ...]}')
    unknown = sorted(set(body) - {"videos", "views", "top_k"})
    if unknown:
        raise RequestError(f"unknown keys {unknown}; a request has videos, views and top_k")
    videos = body["videos"]
    if not 1 <= len(videos) <= MAX_VIDEOS_PER_REQUEST:
        raise RequestError(f"a request holds 1 to {MAX_VIDEOS_PER_REQUEST} videos, got {len(videos)}")
    rows = []
    for index, video in enumerate(videos):
        given = [key for key in ("video", "uri") if isinstance(video, dict) and isinstance(video.get(key), str)]
        if len(given) != 1 or len(video) != 1:
            raise RequestError(f"videos[{index}]: expected {{\"video\": BASE64}} or {{\"uri\": URI}}")
        if given == ["uri"] and not uri_within(video["uri"], uri_prefixes):
            raise RequestError(f"videos[{index}]: {video['uri']!r} is not under a prefix this endpoint reads "
                               "(--allow-uris); send the video's bytes instead")
        rows.append({"video": video.get("video"), "uri": video.get("uri")})
    views = body.get("views", default_views)
    top_k = body.get("top_k", default_top_k)
    try:
        parse_views(views)
    except (TypeError, ValueError, AttributeError) as error:
        raise RequestError(f"views: {error}") from None
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise RequestError(f"top_k must be an integer >= 1, got {top_k!r}")
    return rows, views, top_k


def load_version(reference: str, tracking_uri: str | None, use_gpu: bool) -> Served:
    """`reference` resolved through the registry and built as the registered pyfunc builds it."""
    from jobs.serving.pyfunc_model import UniFormerV2Classifier

    with tempfile.TemporaryDirectory(prefix="uniformer-serve-") as directory:
        resolved = resolve_model(reference, directory, tracking_uri)
        classifier = UniFormerV2Classifier().load(resolved.weights_path, resolved.config_path, use_gpu=use_gpu)
    return Served(resolved.identity, classifier)


class AliasFollower:
    """Looks at the alias every `poll_s` seconds in a thread of its own and, when it names another version than
    `current()`, calls `load()` and hands the result to `swap`. A registry that fails is told in the log, and the
    version already loaded keeps answering."""

    def __init__(self, client, name: str, alias: str, poll_s: float, current: Callable[[], int | None],
                 load: Callable[[], Served], swap: Callable[[Served], None]):
        self.client, self.name, self.alias, self.poll_s = client, name, alias, poll_s
        self.current, self.load, self.swap = current, load, swap
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"follow {name}@{alias}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.poll_s):
            try:
                version = alias_version(self.client, self.name, self.alias)
                if version is None:
                    log.warning("alias %s of %s is not set; version %s keeps answering", self.alias, self.name,
                                self.current())
                elif version != self.current():
                    started = time.monotonic()
                    loaded = self.load()
                    self.swap(loaded)
                    log.info("now answering with %s (loaded in %.1f s)", loaded.identity.describe(),
                             time.monotonic() - started)
            except Exception as error:  # noqa: BLE001 - the registry or a download failing: keep the loaded version
                log.warning("following %s@%s failed (%s: %s); version %s keeps answering", self.name, self.alias,
                            type(error).__name__, redact(str(error)), self.current())


@serve.deployment(name=DEPLOYMENT)
class VideoClassifier:
    """One replica: the model of the reference, followed when it names an alias."""

    def __init__(self, config: ServeConfig, mlflow_env: dict, use_gpu: bool):
        import mlflow

        adopt_mlflow_env(mlflow_env)  # the replica's own MLFLOW_TRACKING_URI when the driver's holds a password
        if config.endpoint_url:
            os.environ["AWS_ENDPOINT_URL"] = config.endpoint_url  # what the pyfunc's Storage() reads
        self.config = config
        tracking_uri = resolve_tracking_uri(None) if config.model.startswith("models:/") else None

        def load() -> Served:
            return load_version(config.model, tracking_uri, use_gpu)

        self.served = load()
        self.predict_batch.set_max_batch_size(config.options.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(config.options.batch_wait_s)
        self.follower = None
        if followed := alias_of(config.model):
            self.follower = AliasFollower(mlflow.MlflowClient(tracking_uri), *followed, config.poll_s,
                                          lambda: self.served.identity.version, load, self._swap)

    def describe(self) -> dict:
        return self.served.model

    def _swap(self, served: Served) -> None:
        self.served = served  # one assignment: requests already pinned to the old version finish with it

    async def __call__(self, request: Request) -> JSONResponse:
        served = self.served  # the version that answers this whole request
        if request.method == "GET":
            return JSONResponse({"model": served.model})
        if request.method != "POST":
            return JSONResponse({"error": "GET the model or POST videos"}, status_code=405)
        try:
            try:
                body = await request.json()
            except ValueError as error:
                raise RequestError(f"the body is not JSON: {error}") from None
            rows, views, top_k = parse_request(body, self.config.views, self.config.top_k, self.config.uri_prefixes)
        except RequestError as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        predictions = await asyncio.gather(*(self.predict_batch(Video(served, row, views, top_k)) for row in rows))
        return JSONResponse({"model": served.model, "predictions": list(predictions)})

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def predict_batch(self, videos: list[Video]) -> list[dict]:
        """The videos of one batch, one pyfunc call per (version, views) among them (one, unless the alias just moved
        or requests name different views); the pyfunc runs in a thread, so that the replica keeps taking requests."""
        answers: list[dict | None] = [None] * len(videos)
        groups: dict[tuple[int, str], list[int]] = {}
        for index, video in enumerate(videos):
            groups.setdefault((id(video.served), video.views), []).append(index)
        for (_, views), indices in groups.items():
            classifier = videos[indices[0]].served.classifier
            frame = pd.DataFrame([videos[i].row for i in indices], columns=["video", "uri"])
            top_k = max(videos[i].top_k for i in indices)
            rows = await asyncio.to_thread(classifier.predict, None, frame, {"views": views, "top_k": top_k})
            for i, row in zip(indices, rows.to_dict("records")):
                answers[i] = answer(row, videos[i].top_k)
        return answers


def answer(row: dict, top_k: int) -> dict:
    """A pyfunc row as the endpoint answers it: the top-k as `uniformer predict --json` gives it, or the error."""
    if row["error"]:
        return {"top_k": None, "error": row["error"]}
    top = zip(row["top_k_ids"], row["top_k_names"], row["top_k_probs"])
    return {"top_k": [{"id": int(i), "name": name, "prob": float(prob)} for i, name, prob in list(top)[:top_k]],
            "error": None}


def build_app(config: ServeConfig) -> serve.Application:
    """The application of `config` for the connected Ray cluster: replicas on GPUs when it has them (or as
    `gpus_per_replica` says), autoscaled between the replica bounds."""
    options = config.options
    gpus = options.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    deployment = VideoClassifier.options(
        ray_actor_options={"num_cpus": options.cpus_per_replica, "num_gpus": gpus},
        autoscaling_config={"min_replicas": options.min_replicas, "max_replicas": options.max_replicas,
                            "initial_replicas": max(1, options.min_replicas),
                            "target_ongoing_requests": options.target_ongoing_requests},
        # a request brings up to MAX_VIDEOS_PER_REQUEST videos, each one item of a batch
        max_ongoing_requests=max(2 * options.max_batch_size, 8),
    )
    # the tracking URI stays out of what travels: a replica reads it from its environment, and mlflow_env_for_workers
    # passes it on by value only when it holds no password
    return deployment.bind(dataclasses.replace(config, tracking_uri=None), mlflow_env_for_workers(), gpus > 0)


def app_builder(args: dict) -> serve.Application:
    """The application as a Ray Serve config file (a RayService's serveConfigV2) names it:
    `import_path: jobs.serve:app_builder`, `args:` the options of `uniformer serve` (snake_case, as `--print-config`
    writes them; the tracking URI from the environment, never here)."""
    from jobs.config import ConfigError, build

    try:
        return build_app(build(ServeConfig, args))
    except ConfigError as error:
        raise ValueError(f"uniformer serve: {error}") from None


def start(config: ServeConfig, echo: Callable[[str], None] = print) -> dict:
    """Starts Ray Serve on the connected (or a new local) Ray with the HTTP proxy at host:port, deploys the
    application and waits until it answers. Returns the summary: the model that answers and the address."""
    if config.tracking_uri:
        # replicas read it from their environment (a local Ray hands them this process's); only a URI without
        # credentials travels with the deployment (jobs.credentials.mlflow_env_for_workers)
        os.environ["MLFLOW_TRACKING_URI"] = resolve_tracking_uri(config.tracking_uri)
    init_ray()  # joins RAY_ADDRESS when set, else starts a local Ray
    serve.start(http_options={"host": config.host, "port": config.port})
    handle = serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    model = handle.describe.remote().result()
    url = f"http://{config.host}:{config.port}/"
    following = f", following alias {model['alias']} every {config.poll_s:g} s" if alias_of(config.model) else ""
    echo(f"serving {model['name']} version {model['version']} at {url}{following}")
    return {"url": url, "model": model}


def run_serve(config: ServeConfig, echo: Callable[[str], None] = print) -> dict:
    """`start`, then serve until interrupted (Ctrl-C or SIGTERM); Serve is shut down on the way out. Returns
    `start`'s summary."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt

    summary = start(config, echo)
    # after `start`: Ray's core worker, initialised there, installs a SIGTERM handler of its own that ends the process
    # without shutting Serve down
    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        echo("shutting down")
    finally:
        serve.shutdown()
    return summary
