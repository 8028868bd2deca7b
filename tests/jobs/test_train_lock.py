"""One training run, one command: a second command with the same options and storage (the same run) fails at once
while the first holds the run's lock; a killed command's lock is taken over once it lapses. On the S3 server and on
local storage."""

from __future__ import annotations

import json
import time

import pytest

from jobs.train import RUN_LOCK, RunInProgress, exclusive_run
from jobs.training.config import TrainConfig

pytestmark = pytest.mark.integration


def config(storage, folder) -> TrainConfig:
    return TrainConfig(data="/clips@1", storage=folder.uri, endpoint_url=storage.endpoint_url, experiment="lock")


def test_a_second_command_for_a_run_in_progress_fails_at_once_naming_the_run(storage_folder):
    storage, folder = storage_folder
    cfg = config(storage, folder)
    lock = folder.join(cfg.name, RUN_LOCK)
    with exclusive_run(cfg):
        holder = json.loads(storage.read_bytes(lock))
        started = time.monotonic()
        with pytest.raises(RunInProgress) as refused:
            with exclusive_run(config(storage, folder)):
                pytest.fail("two commands hold one run")
        assert time.monotonic() - started < 10
        assert json.loads(storage.read_bytes(lock))["owner"] == holder["owner"]  # the first still holds it
    message = str(refused.value)
    assert f"training run {cfg.name} is already being trained into {folder.uri}" in message
    assert holder["owner"] in message and "--run-name" in message and "lapses at" in message
    with exclusive_run(config(storage, folder)):  # released when the first finished
        assert json.loads(storage.read_bytes(lock))["owner"] != holder["owner"]


def test_the_lapsed_lock_of_a_killed_command_is_taken_over(storage_folder):
    storage, folder = storage_folder
    cfg = config(storage, folder)
    lock = folder.join(cfg.name, RUN_LOCK)
    # what a command killed while training leaves: its lock, no longer renewed, past its expiry
    storage.put_bytes(lock, json.dumps({"owner": "killed", "expires_at": time.time() - 1}).encode(), if_absent=True)
    with exclusive_run(cfg):
        assert json.loads(storage.read_bytes(lock))["owner"] != "killed"
    # a live one is not taken over
    storage.put_bytes(lock, json.dumps({"owner": "alive", "expires_at": time.time() + 60}).encode())
    with pytest.raises(RunInProgress, match=r"\(alive\)"):
        with exclusive_run(cfg):
            pass
