"""The plain-text summaries jobs print when they end: a column of named values and the first errors."""

from __future__ import annotations

from pipeline.schema import ErrorRecord


def table_lines(rows: list[tuple[str, object]], value_width: int = 8) -> list[str]:
    width = max(len(name) for name, _ in rows)
    return [f"  {name:<{width}}  {str(value):>{value_width}}" for name, value in rows]


def first_of_lines(first: list[str], total: int) -> list[str]:
    """The first few of `total` names a plan holds, one line each, and how many more it holds."""
    lines = [f"    {name}" for name in first]
    if total > len(first):
        lines.append(f"    ... {total - len(first)} more")
    return lines


def error_lines(errors: list[ErrorRecord], errors_uri: str | None, max_errors: int) -> list[str]:
    """The first `max_errors` errors, one line each, under the table they were written to."""
    if not errors:
        return []
    lines = [f"  errors ({errors_uri}):"]
    for error in errors[:max_errors]:
        lines.append(f"    {error.stage:<7} {error.error_type:<18} {error.source_uri}: {error.message[:120]}")
    if len(errors) > max_errors:
        lines.append(f"    ... {len(errors) - max_errors} more")
    return lines
