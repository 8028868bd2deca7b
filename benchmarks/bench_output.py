"""How every benchmark ends: its figures as one JSON object on stdout, and in `--output FILE` when given."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path


def emit(result: dict, output: str | os.PathLike | None) -> None:
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if output:
        Path(output).write_text(text + "\n")


def spread(values, digits: int = 3) -> dict:
    """A figure measured over interleaved rounds: its median (what a goal is judged by), min and max, and the rounds."""
    values = list(values)
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "rounds": [round(value, digits) for value in values]}
