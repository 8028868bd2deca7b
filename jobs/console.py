"""What the jobs show on the console, configured once by the CLI (`uniformer -v|-q COMMAND ...`).

By default the console carries the jobs' own lines (plans, progress with rate and ETA, notices, summaries) and every
warning; Ray's internal logging (controller and worker lines, the actors' warnings, Ray Data's per-dataset execution
lines and progress bars) stays in Ray's log files (`/tmp/ray/session_latest/logs` of each node), and MLflow's info
lines are left out. `-v` brings Ray's and MLflow's lines to the console, `-vv` adds debug lines, and `-q` keeps
warnings and the summaries only.
"""

from __future__ import annotations

import logging
import os
import sys
import time

QUIET, NORMAL, VERBOSE, DEBUG = -1, 0, 1, 2

_verbosity = NORMAL


class _ConsoleFormatter(logging.Formatter):
    """The jobs' own info lines as they are; anything else says its level and where it comes from."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno == logging.INFO and record.name.split(".")[0] == "jobs":
            return message
        return f"{record.levelname} [{record.name}] {message}"


class _ConsoleHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a line is written (a test or a redirect may have swapped it, and closed
    the one there before), as logging's own last-resort handler does."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass  # StreamHandler.__init__ and setStream assign it; the console is always the current sys.stderr


def configure_logging(verbosity: int = NORMAL) -> None:
    """Sets the console up for `verbosity` (QUIET .. DEBUG); calling it again replaces the earlier set-up."""
    global _verbosity
    _verbosity = verbosity
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _ConsoleHandler)]:
        root.removeHandler(handler)
    handler = _ConsoleHandler()
    handler.setFormatter(_ConsoleFormatter())
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbosity >= DEBUG else logging.INFO if verbosity >= VERBOSE else logging.WARNING)
    logging.getLogger("jobs").setLevel(
        logging.DEBUG if verbosity >= DEBUG else logging.INFO if verbosity >= NORMAL else logging.WARNING
    )
    # MLflow logs through a handler of its own, set up at its import from MLFLOW_LOGGING_LEVEL: its info lines
    # (database migrations, input example validation) and its artifact download bars are for -v.
    mlflow_level = "INFO" if verbosity >= VERBOSE else "WARNING"
    os.environ["MLFLOW_LOGGING_LEVEL"] = mlflow_level
    logging.getLogger("mlflow").setLevel(mlflow_level)  # in case it was imported already
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "true" if verbosity >= VERBOSE else "false"


def init_ray(**options) -> None:
    """`ray.init(**options)` unless Ray is up, with Ray's console output as the verbosity asks: without -v, the
    output of Ray's worker processes (training workers, Ray Train's controller and helper actors, Ray Data tasks)
    stays in their log files instead of being copied to this console, and so do Ray Data's execution lines and
    progress bars of the datasets this process runs."""
    import ray

    if ray.is_initialized():
        return
    verbose = _verbosity >= VERBOSE
    ray.init(log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.WARNING, **options)
    quiet_ray_data(verbose)


def quiet_ray_data(verbose: bool) -> None:
    """Ray Data logs to its file (ray-data.log) and to the console through handlers of its own, the console one at
    info level: that one is raised to warnings, and progress bars are off, unless -v."""
    import ray.data

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):  # the console; the file handlers are plain Handlers
            handler.setLevel(logging.INFO if verbose else logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = verbose


def duration(seconds: float) -> str:
    """A short human duration: 42s, 3m05s, 2h07m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def rate(count: float, started: float, unit: str) -> str:
    """`12.3 clips/s`: `count` since `started` (time.monotonic()), start-up included."""
    elapsed = time.monotonic() - started
    return f"{count / elapsed:.3g} {unit}/s" if elapsed > 0 else f"- {unit}/s"


class Pace:
    """How long the rest of a run's items will take, at the pace measured since its first item was done: the time
    before it (Ray starting, actors loading, the first decodes) is start-up, which would make the first estimates
    many times too long. Until a second report there is no pace to tell."""

    def __init__(self):
        self._first: tuple[float, float] | None = None  # (time.monotonic(), done) at the first report with any done

    def eta(self, done: float, total: float) -> str:
        """`ETA 4m10s`, or `ETA -` while the pace is unknown."""
        now = time.monotonic()
        if done <= 0:
            return "ETA -"
        if self._first is None:
            self._first = (now, done)
        first_at, first_done = self._first
        if done <= first_done or now <= first_at:
            return "ETA -"
        return f"ETA {duration(max(0.0, total - done) * (now - first_at) / (done - first_done))}"