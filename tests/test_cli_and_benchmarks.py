"""The command line and the benchmark harness run end to end (a quick CPU subset, no thresholds)."""

from __future__ import annotations

import json

from benchmarks import run as bench
from dcign_fast.cli import main


def test_info(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] and "cuda_extension_built" in info


def test_ops_suite_quick(tmp_path, capsys):
    assert bench.main(["--suite", "ops", "--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    (result,) = tmp_path.glob("ops-cpu-*.json")
    data = json.loads(result.read_text())
    assert data["machine"]["torch"] and data["rows"]
    backends = {row["backend"] for row in data["rows"]}
    assert {"reference", "torch"} <= backends
    assert all(row["median_ms"] > 0 for row in data["rows"])
    assert "paper150 decoder" in capsys.readouterr().out
