"""How every benchmark ends: its figures as one JSON object on stdout, and in `--output FILE` when given."""

from __future__ import annotations

import json
import os
from pathlib import Path


def emit(result: dict, output: str | os.PathLike | None) -> None:
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if output:
        Path(output).write_text(text + "\n")
