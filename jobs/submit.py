"""Submit a `uniformer` job to a Ray cluster through the Ray Jobs API, the way `ray job submit` does.

The job runs as `uniformer JOB ARGS` on the cluster, in a runtime_env that ships this checkout as `working_dir` (when
run from one) and forwards an allow-list of the settings the jobs read (MLflow URI, S3 endpoint, client settings),
plus the `--env` names that do not look secret. Credentials never travel in the runtime_env: the dashboard shows it
to anyone who can list jobs; they reach the cluster through the nodes' own environment (instance role, Kubernetes
Secret). An address that holds credentials (`http://user:password@mlflow`) is refused, not forwarded without them.

Ray token authentication: the client sends `Authorization: Bearer TOKEN`, with the token found where Ray looks for
it (RAY_AUTH_TOKEN, then the file RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token), whether or not RAY_AUTH_MODE=token
is set in the submitting shell; RAY_AUTH_MODE=disabled sends none.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import shlex
import sys
import time
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from jobs.credentials import ADDRESSES, CLIENT_SETTINGS, carries_credentials, looks_secret, redact

# Settings the jobs read that are safe to show in the dashboard; forwarded when set in the submitting environment.
PASSTHROUGH_ENV = (*ADDRESSES, *CLIENT_SETTINGS)
# What a checkout holds besides the code; Ray also honours .gitignore, this keeps the upload small without it.
WORKING_DIR_EXCLUDES = [".git/", ".venv/", "__pycache__/", "*.pyc", "runs/", "mlruns/", "mlflow.db", "demo-output/",
                        ".pytest_cache/", "*.egg-info/", "build/"]
_PROJECT_NAME = 'name = "uniformer-pipeline"'


class SubmitError(Exception):
    """The job could not be submitted (bad address, refused variable, failed authentication, invalid command)."""


@dataclass(frozen=True)
class Submission:
    address: str
    job_id: str
    entrypoint: str


def check_invocation(group, argv: Sequence[str]) -> None:
    """Parse `uniformer ARGV` with the CLI's own parser, `group` (the click group of jobs.cli), without running it;
    raise SubmitError when it would fail. `submit JOB ARGS` is checked through to the inner JOB ARGS."""
    import typer

    # `uniformer`'s own flags (-v, -q, --scheduled) go before the command; --version and --help end it there
    own = {name for param in group.params for name in (*param.opts, *param.secondary_opts)}
    argv = list(argv)
    while argv and argv[0].startswith("-"):
        if argv[0] in ("--version", "--help") or not (argv[0] in own or set(argv[0][1:]) == {"v"}):
            raise SubmitError(f"'uniformer {argv[0]}' is not an option that runs a command")
        argv.pop(0)
    if not argv:
        raise SubmitError("no command given")
    name, rest = argv[0], list(argv[1:])
    if "--help" in rest:
        raise SubmitError(f"'uniformer {name} --help' prints help instead of running")
    with group.context_class(group, info_name="uniformer") as parent:
        command = group.get_command(parent, name)
        if command is None:
            known = ", ".join(sorted(group.list_commands(parent)))
            raise SubmitError(f"'{name}' is not a uniformer command (one of: {known})")
        try:
            with command.make_context(name, rest, parent=parent) as context:
                params = dict(context.params)
                _resolve_configuration(command, context)
        except (typer.Exit, typer.Abort):  # --help and other eager options exit before the job would run
            raise SubmitError(f"'uniformer {name}' with these options exits without running") from None
        except typer.TyperException as error:  # click's usage errors, raised by typer's bundled click
            raise SubmitError(f"uniformer {name}: {error.format_message()}") from None
    if name == "submit":
        check_invocation(group, [params["job"], *(params["args"] or [])])


def _resolve_configuration(command, context) -> None:
    """Resolve a job's configuration as `--print-config` does, which refuses a missing or bad option that the parser
    alone cannot (it may come from the config file). A config file that is not here is the cluster's: left alone."""
    import typer

    config_file = context.params.get("config_file")
    if "print_config" not in context.params or (config_file and not os.path.isfile(config_file)):
        return
    context.params["print_config"] = True
    try:
        with redirect_stdout(io.StringIO()):
            command.invoke(context)
    except typer.Exit:
        pass  # the configuration resolved


def refuse_credentials_in(args: Sequence[str]) -> None:
    """SubmitError for an argument holding a credential (a URI's password, `token=...`): the entrypoint is shown to
    everyone who can list the cluster's jobs (`ray job list`, the dashboard)."""
    for arg in args:
        if carries_credentials(arg):
            raise SubmitError(
                f"refusing to submit the argument {redact(arg)}: it holds credentials, and a job's entrypoint is "
                "visible to anyone who can list jobs; give the address without them and keep the credentials in the "
                "cluster's secret store (a Kubernetes Secret mounted as MLflow's ~/.mlflow/credentials or an AWS "
                "shared credentials file, or an instance role)"
            )


def entrypoint_for(job: str, args: Sequence[str]) -> str:
    return shlex.join(["uniformer", job, *args])


def default_working_dir() -> Path | None:
    """This source checkout when `jobs` is imported from one; None when it is an installed package (in the image)."""
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and _PROJECT_NAME in pyproject.read_text():
        return root
    return None


def forwarded_env(names: Sequence[str] = (), environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """PASSTHROUGH_ENV plus `names`, with their local values, for those that are set; refuses names that look secret,
    Ray's own variables, and any value that holds credentials."""
    environ = os.environ if environ is None else environ
    for name in names:
        if name.upper().startswith("RAY_"):
            raise SubmitError(f"refusing to forward {name}: the Ray job supervisor sets RAY_* variables itself")
        if looks_secret(name):
            raise SubmitError(
                f"refusing to forward {name}: its name says it holds a credential, and the job's runtime_env is "
                "visible to anyone who can list jobs; give the cluster's nodes their credentials (instance role, "
                "Kubernetes Secret) instead"
            )
    forwarded = {name: environ[name] for name in (*PASSTHROUGH_ENV, *names) if environ.get(name)}
    for name, value in forwarded.items():
        if carries_credentials(value):
            raise SubmitError(
                f"refusing to forward {name}={redact(value)}: it holds credentials, and the job's runtime_env is "
                f"visible to anyone who can list jobs; configure {name} on the cluster instead (the nodes' "
                "environment, a Kubernetes Secret), or the service's own credentials there (e.g. MLflow's "
                f"~/.mlflow/credentials file), and unset {name} for `uniformer submit`"
            )
    return forwarded


def runtime_env_for(working_dir: str | Path | None, pip: Sequence[str] = (),
                    env_vars: Mapping[str, str] | None = None) -> dict:
    runtime_env: dict = {}
    if working_dir is not None:
        folder = Path(working_dir)
        if not folder.is_dir():
            raise SubmitError(f"working dir {folder} is not a folder")
        runtime_env["working_dir"] = str(folder)
        runtime_env["excludes"] = list(WORKING_DIR_EXCLUDES)
    if pip:
        runtime_env["pip"] = list(pip)
    if env_vars:
        runtime_env["env_vars"] = dict(env_vars)
    return runtime_env


def auth_token(environ: Mapping[str, str] | None = None, home: Path | None = None) -> str | None:
    """Ray's token, looked up in Ray's order; None when there is none or RAY_AUTH_MODE=disabled."""
    environ = os.environ if environ is None else environ
    if environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return environ["RAY_AUTH_TOKEN"].strip()
    if environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as error:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path} cannot be read: {error.strerror}") from None
        if not token:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path} is empty")
        return token
    default = (home or Path.home()) / ".ray" / "auth_token"
    if default.is_file() and default.read_text().strip():
        return default.read_text().strip()
    return None


def resolve_address(address: str | None, environ: Mapping[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    address = address or environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    if not re.match(r"^https?://", address):
        raise SubmitError(f"{address!r} is not a Ray dashboard address; jobs are submitted to http://HEAD:8265 "
                          "(the dashboard), not to the GCS port")
    return address.rstrip("/")


def connect(address: str | None = None):
    """A JobSubmissionClient for the cluster at `address` (or RAY_ADDRESS), authenticated when a token exists."""
    from ray.job_submission import JobSubmissionClient

    address = resolve_address(address)
    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    with explained_errors(address):
        return JobSubmissionClient(address, headers=headers)


@contextmanager
def explained_errors(address: str):
    """Turn Ray's connection and authentication errors into a SubmitError that says what to do."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as error:
        raise SubmitError(f"{address} refused the request: {_first_line(error)} (set RAY_AUTH_TOKEN or "
                          "RAY_AUTH_TOKEN_PATH to the cluster's token; `ray get-auth-token` on the head prints it)"
                          ) from None
    except ConnectionError as error:
        raise SubmitError(f"no Ray dashboard at {address}: {_first_line(error)}") from None


def submit(group, job: str, args: Sequence[str] = (), *, address: str | None = None, client=None,
           working_dir: str | Path | None | bool = True, pip: Sequence[str] = (), env: Sequence[str] = (),
           environ: Mapping[str, str] | None = None, submission_id: str | None = None) -> Submission:
    """Submit `uniformer JOB ARGS` to the cluster, once `group` (the click group of jobs.cli) parses them; returns at
    once with the job id (see `follow`).

    working_dir: True ships this checkout (nothing when installed as a package), None/False ships nothing, or a
    folder. env: extra variable names whose local values are forwarded besides PASSTHROUGH_ENV."""
    check_invocation(group, [job, *args])
    refuse_credentials_in(args)
    if working_dir is True:
        working_dir = default_working_dir()
    runtime_env = runtime_env_for(working_dir or None, pip, forwarded_env(env, environ))
    client = client or connect(address)
    entrypoint = entrypoint_for(job, args)
    with explained_errors(client.get_address()):
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id,
                                   metadata={"uniformer_job": job})
    return Submission(address=client.get_address(), job_id=job_id, entrypoint=entrypoint)


def follow(client, job_id: str, write: Callable[[str], object] | None = None, timeout_s: float | None = None,
           poll_s: float = 1.0):
    """Stream the job's logs to `write` until it ends; returns its final JobStatus. TimeoutError after timeout_s."""
    write = write or _stdout_write
    deadline = None if timeout_s is None else time.monotonic() + timeout_s

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    try:
        asyncio.run(asyncio.wait_for(tail(), timeout=timeout_s))
    except asyncio.TimeoutError:
        raise TimeoutError(f"job {job_id} still running after {timeout_s} s") from None
    except RuntimeError as error:  # the log stream broke off; the status below still tells how the job ended
        write(f"[log stream interrupted: {_first_line(error)}; waiting for the job to end]\n")
    while not (status := client.get_job_status(job_id)).is_terminal():
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still running after {timeout_s} s")
        time.sleep(poll_s)
    return status


def exit_code_of(client, job_id: str) -> int:
    """The ended job's own exit code (jobs.exitcodes: nothing new, candidate rejected, ... pass through), or 1 for a
    job that failed without one (stopped, or its driver killed by a signal)."""
    info = client.get_job_info(job_id)
    if info.status.value == "SUCCEEDED":
        return 0
    code = info.driver_exit_code
    return code if code is not None and code > 0 else 1


def _stdout_write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
