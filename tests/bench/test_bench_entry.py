"""`python -m bench` dispatches to the comparison by default and to the per-service benches by name."""

from __future__ import annotations

import sys

import pytest

import bench.__main__ as entry
from bench.compare.run import parse_args


def test_default_is_the_comparison(capsys):
    with pytest.raises(SystemExit) as exc:
        entry.main(["--help"])
    assert exc.value.code == 0
    assert "vLLM's own OpenAI server" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(entry.SERVICE_BENCHES))
def test_service_benches_stay_reachable(name, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["python -m bench"])  # the dispatcher rewrites it for the bench
    with pytest.raises(SystemExit) as exc:
        entry.main([name, "--help"])
    assert exc.value.code == 0
    assert f"bench.{name}_bench" in capsys.readouterr().out


def test_quick_changes_defaults_only():
    quick = parse_args(["--quick", "--drain", "7"])
    assert (quick.concurrency, quick.rounds, quick.overload_seconds, quick.drain) == ([1, 4], 1, 15.0, 7.0)
    full = parse_args([])
    assert (full.concurrency, full.rounds, full.overload_seconds, full.overload_factor) == ([1, 4, 16], 2, 60.0, 3.0)
    with pytest.raises(SystemExit):
        parse_args(["--scenarios", "nonsense"])
