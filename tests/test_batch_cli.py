"""Where `serve-app-batch` writes a batch's results: pure, no gateway."""

from __future__ import annotations

from serve_app.batch_cli import result_paths


def test_error_lines_go_beside_the_output_unless_told_otherwise():
    assert result_paths("batch_1", None, None) == ("batch_1.output.jsonl", "batch_1.errors.jsonl")
    assert result_paths("batch_1", "runs/res.jsonl", None) == ("runs/res.jsonl", "runs/res.errors.jsonl")
    assert result_paths("batch_1", "runs/res", None) == ("runs/res", "runs/res.errors.jsonl")
    assert result_paths("batch_1", "runs/res.jsonl", "bad.jsonl") == ("runs/res.jsonl", "bad.jsonl")
    assert result_paths("batch_1", None, "bad.jsonl") == ("batch_1.output.jsonl", "bad.jsonl")
