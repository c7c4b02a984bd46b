"""`python -m bench canary` on tiny settings: a failing canary is rolled back with no client failure, the
healthy control is not, and the JSON says so."""

from __future__ import annotations

import json
from pathlib import Path

from bench import canary_bench


def test_the_canary_benchmark_rolls_back_the_bad_version_only(tmp_path: Path) -> None:
    out = tmp_path / "canary.json"
    assert canary_bench.main(["--scenarios", "fail", "healthy", "--min-requests", "20", "--seconds", "8",
                              "--after-s", "1", "--json", str(out)]) == 0
    scenarios = {s["scenario"]: s for s in json.loads(out.read_text())["scenarios"]}
    fail, healthy = scenarios["fail"], scenarios["healthy"]
    assert fail["rolled_back"] and fail["reason"] == "error_rate" and fail["client_failures"] == 0
    assert fail["bad_version_requests"] >= 20 and fail["rule_met_to_rollback_s"] <= 5.0
    assert not healthy["rolled_back"] and healthy["client_failures"] == 0
