"""The reliability suite: every scenario reports what it measured.

`report("scenario", key=value, ...)` writes one line to the terminal as the
test runs (whatever the capture mode) and again in a "reliability report"
section at the end of the run, so that a run reads as a report.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

_LINES: list[str] = []


def _format(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Callable[..., None]:
    terminal = request.config.pluginmanager.get_plugin("terminalreporter")

    def write(scenario: str, **measured: Any) -> None:
        line = f"[{scenario}] " + " ".join(f"{k}={_format(v)}" for k, v in measured.items())
        _LINES.append(line)
        if terminal is not None:
            terminal.write_line("\n" + line)

    return write


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _LINES:
        terminalreporter.section("reliability report")
        for line in _LINES:
            terminalreporter.write_line(line)
