"""How every benchmark ends: its figures as one JSON object on stdout, and in `--output FILE` when given."""

from __future__ import annotations

import json
import os
import socket
import statistics
from pathlib import Path


def emit(result: dict, output: str | os.PathLike | None) -> None:
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if output:
        Path(output).write_text(text + "\n")


def status_mb(field: str, pid: int | str = "self") -> float:
    """A memory figure of a process's /proc/PID/status (Linux), in MB: `VmRSS` now, `VmHWM` its own peak (which exec
    resets; `ru_maxrss` would also count the pages of the parent a process was forked from)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(f"no {field} in /proc/{pid}/status")


def spread(values, digits: int = 3) -> dict:
    """A figure measured over interleaved rounds: its median (what a goal is judged by), min and max, and the rounds."""
    values = list(values)
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "rounds": [round(value, digits) for value in values]}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a server a benchmark starts."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
