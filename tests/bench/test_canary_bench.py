"""`python -m bench canary` end to end with tiny settings (~30 s): its own simulated mesh rolls back the failing
canary, clients see no failure, nothing reaches the canary after its rollback, and the healthy control stays."""

from __future__ import annotations

import json
from pathlib import Path

from bench import canary_bench


def test_the_failing_canary_is_rolled_back_and_the_healthy_one_is_not(tmp_path: Path) -> None:
    out = tmp_path / "canary.json"
    argv = ["--scenarios", "fail", "healthy", "--min-requests", "20", "--seconds", "6", "--after-s", "1",
            "--json", str(out)]
    assert canary_bench.main(argv) == 0
    results = {r["scenario"]: r for r in json.loads(out.read_text())["scenarios"]}
    fail, healthy = results["fail"], results["healthy"]
    assert fail["rolled_back"] and fail["reason"] == "error_rate", fail
    assert fail["client_failures"] == 0, fail["client_failure_examples"]
    assert fail["bad_version_requests"] >= 20 and fail["bad_version_failed"] >= 1
    assert fail["rule_met_reason"] == "error_rate" and fail["rule_met_to_rollback_s"] < 2.0
    assert fail["time_to_rollback_s"] < 6.0 and fail["overshoot"] >= 1.0
    assert set(fail["after"]["versions"]) == {"v1"}  # requests sent after the rollback: the stable version's
    assert not healthy["rolled_back"] and healthy["reason"] is None and healthy["client_failures"] == 0
    assert healthy["bad_version_requests"] >= 20  # it was judged: enough requests for the rule
    assert set(healthy["before"]["versions"]) == {"v1", "v2"}
