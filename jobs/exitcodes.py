"""What `uniformer` exits with, so that schedulers and scripts can tell outcomes apart (README: Exit codes)."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    SUCCESS = 0
    FAILURE = 1  # the job stopped on an error it explains on stderr (storage, registry, a bad dataset, ...)
    USAGE = 2  # click's: a bad flag or argument, a bad config file
    NOTHING_NEW = 3  # ingest, score, retrain: nothing to do, nothing written
    REJECTED = 4  # retrain: the candidate was registered but did not beat the champion, which stays
    PARTIAL = 5  # ingest, score: finished, and some videos are rows of the errors table instead


class OptionError(ValueError):
    """An option whose value the driver found unusable before the work started (a dataset that is not there, one
    without labels): the command exits with USAGE and one line naming the option."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option = option
