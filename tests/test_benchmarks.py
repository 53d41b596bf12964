"""`make bench` keeps working: a short run of its cheap figures on the tiny model writes well-formed results.
(Speed itself is not asserted here: that is what benchmarks/ is for.)"""

import json
import math
import subprocess
import sys

from astrea_testing import REPO


def test_bench_writes_results_and_a_table(tmp_path):
    output = tmp_path / "results.json"
    command = [sys.executable, "benchmarks/run.py", "--configs", "tiny", "--only", "P1,P2,P4,P8,R1", "--repeats", "1"]
    result = subprocess.run([*command, "--output", str(output)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(output.read_text())
    assert [r["id"] for r in results] == ["P1", "P2", "P4", "P8", "R1"]
    for r in results:
        assert {"id", "name", "value", "limit", "config", "device", "details"} <= set(r)
        assert math.isfinite(r["value"]) and r["value"] > 0 and r["config"] == "tiny"
    assert results[0]["limit"] == 1.0 and results[0]["details"]["new_tokens"] == 32
    table = output.with_suffix(".md").read_text()
    assert table.startswith("| id | benchmark |") and table.count("\n") == len(results) + 2
