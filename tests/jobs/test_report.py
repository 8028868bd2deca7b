from jobs.report import error_lines, table_lines
from pipeline.schema import ErrorRecord


def test_counts_line_up_and_errors_stop_at_the_limit():
    assert table_lines([("listed", 12), ("errored", 3)]) == ["  listed         12", "  errored         3"]
    assert table_lines([("versions", [1, 2]), ("seconds", 3)], value_width=0) == ["  versions  [1, 2]", "  seconds   3"]
    errors = [ErrorRecord(f"s3://b/v{i}.mp4", "e", "decode", "DecodeError", "x" * 300) for i in range(4)]
    lines = error_lines(errors, "s3://b/clips/errors/v1.parquet", max_errors=2)
    assert lines[0] == "  errors (s3://b/clips/errors/v1.parquet):"
    assert lines[1] == f"    decode  DecodeError        s3://b/v0.mp4: {'x' * 120}"
    assert len(lines) == 4 and lines[-1] == "    ... 2 more"
    assert error_lines([], None, max_errors=2) == []
