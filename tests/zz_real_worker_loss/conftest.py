"""The reliability suite's report fixture, for the real-engine scenario."""

from tests.reliability.conftest import report  # noqa: F401
