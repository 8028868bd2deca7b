"""What a training checkpoint holds and how it is written and read (torchtitan-style: one small component).

A checkpoint is a directory: `model.safetensors` (weights), `train_state.pt` (optimizer, scheduler, grad scaler:
tensors and plain containers only, read back with `weights_only=True`) and `progress.json` (epoch, step, data
position, config, MLflow run id). Ray Train persists the directory atomically when rank 0 reports it.

Randomness needs no stored generator state: every step reseeds from (seed, global step, rank), so a resumed run
draws the same dropout masks and crops as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
TRAIN_STATE = "train_state.pt"
PROGRESS = "progress.json"
# rank 0's local folder for a checkpoint until Ray Train has uploaded (and deleted) it: prefix, then the writer's pid
STAGING_PREFIX = "uniformer-checkpoint-"


@dataclass
class Progress:
    epoch: int = 0  # the epoch in progress
    step_in_epoch: int = 0  # optimizer steps done in it: the data position (rows = steps * rows per step)
    global_step: int = 0
    mlflow_run_id: str | None = None
    config: dict | None = None
    finished: bool = False
    metrics: dict | None = None  # the validation metrics at an epoch end (None mid-epoch): what --select ranks


def step_seed(seed: int, global_step: int, rank: int) -> int:
    return (seed * 1_000_003 + global_step * 7_919 + rank) % (2**63)


def staging_directory(root: str | None = None) -> str:
    """A new local folder to write a checkpoint into before Ray Train uploads it. A worker killed between the write and
    the end of the upload leaves its folder behind (1.6 GB at B/16 with AdamW's state, for every kill), so each new one
    first removes the folders of writers that are gone; the name carries the writer's pid."""
    root = root or tempfile.gettempdir()
    for orphan in orphaned_staging_directories(root):
        shutil.rmtree(orphan, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=root)


def orphaned_staging_directories(root: str | None = None) -> list[Path]:
    """Staging folders in `root` whose writing process no longer runs (a live writer's may still be uploading)."""
    orphans = []
    for entry in Path(root or tempfile.gettempdir()).glob(f"{STAGING_PREFIX}*-*"):
        writer = entry.name.removeprefix(STAGING_PREFIX).split("-", 1)[0]
        if writer.isdigit() and entry.is_dir() and not entry.is_symlink() and not psutil.pid_exists(int(writer)):
            orphans.append(entry)
    return orphans


def save(directory: str, net: torch.nn.Module, optimizer, scheduler, scaler, progress: Progress) -> None:
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, os.path.join(directory, WEIGHTS))
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()},
        os.path.join(directory, TRAIN_STATE),
    )
    with open(os.path.join(directory, PROGRESS), "w", encoding="utf-8") as handle:
        json.dump(asdict(progress), handle, indent=1)


def read_progress(directory: str) -> Progress:
    with open(os.path.join(directory, PROGRESS), encoding="utf-8") as handle:
        return Progress(**json.load(handle))


def load(directory: str, net: torch.nn.Module, optimizer, scheduler, scaler) -> None:
    """Restores model, optimizer, scheduler and scaler; `read_progress` reads where the run was."""
    net.load_state_dict(load_file(os.path.join(directory, WEIGHTS)))
    state = torch.load(os.path.join(directory, TRAIN_STATE), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
