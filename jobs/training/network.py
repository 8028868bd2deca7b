"""The network a run trains: its model configuration, its initial weights with the head's rows, and the label files
that shape them (class maps, flip pairs). Used by the driver (checks before the run) and by the workers."""

from __future__ import annotations

import logging
import tempfile

import torch
import torch.distributed as dist

import model
from jobs.training.config import TrainConfig

log = logging.getLogger(__name__)


def model_overrides(cfg: TrainConfig, frames: int) -> dict:
    overrides = {"t_size": frames, "input_normalization": cfg.input_normalization, **cfg.model_overrides}
    if cfg.activation_checkpointing:
        overrides["use_checkpoint"] = True
    return overrides


def build_model(cfg: TrainConfig, num_classes: int, frames: int) -> torch.nn.Module:
    return model.create_model(cfg.model, num_classes=num_classes, **model_overrides(cfg, frames))


def read_class_map(path: str) -> dict[str, int | str]:
    """A class map file: the dataset's class name -> the pretrained head's row (an index) or class name, as a JSON
    object or a two-column CSV (`target,source`). ValueError naming the file and the line otherwise."""
    import csv
    import json

    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read the class map {path}: {error}") from None
    if path.endswith(".json"):
        try:
            mapping = json.loads(text)
        except ValueError as error:
            raise ValueError(f"class map {path} is not valid JSON: {error}") from None
        if not isinstance(mapping, dict):
            raise ValueError(f"class map {path} must be a JSON object of target class -> source row or name")
    else:
        mapping = {}
        for number, row in enumerate(csv.reader(text.splitlines()), start=1):
            if not row or row[0].startswith("#"):
                continue
            if len(row) != 2:
                raise ValueError(f"class map {path} line {number}: expected `target,source`, got {row!r:.80}")
            mapping[row[0].strip()] = int(row[1]) if row[1].strip().isdigit() else row[1].strip()
    for target, source in mapping.items():
        if not (isinstance(source, str) or (type(source) is int and source >= 0)):
            raise ValueError(f"class map {path}: {target!r} maps to {source!r}, not a row index or a class name")
    return mapping


def read_flip_pairs(path: str) -> list[tuple[str, str]]:
    """Class names that a horizontal flip turns into each other, one `a,b` pair per line of a CSV (Something-
    Something's "pushing left to right" and "pushing right to left"). ValueError naming the file and line."""
    import csv

    try:
        with open(path, encoding="utf-8") as handle:
            rows = list(csv.reader(handle.read().splitlines()))
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read the flip pairs {path}: {error}") from None
    pairs, seen = [], set()
    for number, row in enumerate(rows, start=1):
        if not row or row[0].startswith("#"):
            continue
        if len(row) != 2 or row[0].strip() == row[1].strip():
            raise ValueError(f"flip pairs {path} line {number}: expected two different class names, got {row!r:.80}")
        pair = (row[0].strip(), row[1].strip())
        if seen & set(pair):
            raise ValueError(f"flip pairs {path} line {number}: {sorted(seen & set(pair))} already has a mirror")
        seen |= set(pair)
        pairs.append(pair)
    return pairs


def flip_swap(pairs: list[tuple[str, str]], class_names: list[str], device=None) -> torch.Tensor:
    """Class id -> the id its clips get when flipped: the pair's other class, or itself."""
    ids = {name: index for index, name in enumerate(class_names)}
    unknown = sorted({name for pair in pairs for name in pair} - set(ids))
    if unknown:
        raise ValueError(f"the flip pairs name classes the dataset does not have: {', '.join(unknown[:10])}")
    swap = torch.arange(len(class_names))
    for a, b in pairs:
        swap[ids[a]], swap[ids[b]] = ids[b], ids[a]
    return swap.to(device) if device is not None else swap


def head_rows(class_names: list[str], class_map: dict[str, int | str] | None,
              source_names: list[str] | None) -> list[int | None] | None:
    """For each of the dataset's classes, the pretrained head's row it starts from (None: a fresh row), by the class
    map, else by name when the source's class names are known (a registered model's card); None when neither says."""
    if class_map is None and not source_names:
        return None
    position = {name: row for row, name in enumerate(source_names or [])}
    rows = []
    for name in class_names:
        source = class_map.get(name) if class_map is not None else name
        if isinstance(source, str):
            if class_map is not None and source not in position:
                raise ValueError(f"the class map maps {name!r} to {source!r}, which the pretrained head does not name")
            source = position.get(source)
        rows.append(source)
    return rows


def load_initial_weights(net: torch.nn.Module, source: str, tracking_uri: str, class_names: list[str] | None = None,
                         class_map: dict[str, int | str] | None = None) -> None:
    """A checkpoint file in any supported layout, or a registered model (`models:/NAME/VERSION`). The head's rows
    follow the dataset's classes (`class_names`) by `class_map`, or by name from a registered model's card. Rank 0
    prints what was loaded, inflated, interpolated, mapped, kept and ignored, so that a run started from the wrong
    file shows at once."""
    with tempfile.TemporaryDirectory() as scratch:
        if source.startswith("models:/"):
            from jobs.registry import resolve_model

            resolved = resolve_model(source, scratch, tracking_uri)
            weights, source_names = resolved.weights_path, resolved.card.class_names
        else:
            weights, source_names = source, None
        rows = head_rows(class_names, class_map, source_names) if class_names else None
        report = model.load_pretrained(net, weights, rows)
    if not dist.is_initialized() or dist.get_rank() == 0:
        lines = report.summary()
        if report.head_fresh:
            fresh = [class_names[row] for row in report.head_fresh]
            lines += f"\nhead          initialised for: {', '.join(fresh[:20])}{' ...' if len(fresh) > 20 else ''}"
        log.info("initial weights from %s (%s layout):\n%s", source, report.layout, lines)
