"""Shared fixtures: the prepared default model and real service processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import ServiceProcess, free_port


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The default model, prepared once (`make test` has already done it)."""
    from infermesh.common.model_prep import prepare_default_model

    return prepare_default_model()


@pytest.fixture(scope="session")
def model_name(model_dir: Path) -> str:
    return model_dir.name


@pytest.fixture(scope="session")
def tokenizer_proc(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """One tokenizer service process shared by the tests that need it."""
    port = free_port()
    proc = ServiceProcess("tokenizer", ["tokenizer", "--port", str(port), "--metrics-port", str(free_port()),
                                        "--model", str(model_dir)],
                          port=port, log_dir=tmp_path_factory.mktemp("logs"))
    proc.start().wait_healthy(timeout=60)
    yield proc
    proc.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `kills_real_worker` run last (they end the session's shared real-engine worker)."""
    items.sort(key=lambda item: item.get_closest_marker("kills_real_worker") is not None)


# Fixture modules, one per area, so that each can grow without touching this file.
pytest_plugins = ["tests.fixtures.worker", "tests.fixtures.scheduler", "tests.fixtures.mesh", "tests.fixtures.embed",
                  "tests.fixtures.catalog", "tests.fixtures.redis"]
