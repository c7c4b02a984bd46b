"""`infermesh prepare-model` reuses a complete copy and redoes a half-written one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from infermesh.common.model_prep import MANIFEST, is_complete


def _run(target: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "infermesh.cli", "prepare-model", "--dir", str(target),
                           "--print-path"], capture_output=True, text=True, timeout=600)


def test_half_written_copy_is_detected_and_redone(model_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "SmolLM2-135M-Instruct"
    shutil.copytree(model_dir, target)
    assert is_complete(target)

    # An interrupted run: a truncated weights file and a leftover partial directory.
    with open(target / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    stale = tmp_path / "SmolLM2-135M-Instruct.partial-999999"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    assert not is_complete(target)

    result = _run(target)
    assert result.returncode == 0, result.stderr
    assert "incomplete; converting again" in result.stderr
    assert "remains of an interrupted run" in result.stderr
    assert result.stdout.strip() == str(target)
    assert is_complete(target) and not stale.exists()
    assert (target / "model.safetensors").stat().st_size == (model_dir / "model.safetensors").stat().st_size

    # A second run reuses it without converting.
    again = _run(target)
    assert again.returncode == 0 and "is ready in" in again.stderr and "dequantizing" not in again.stderr


def test_manifest_without_files_is_not_complete(tmp_path: Path) -> None:
    (tmp_path / MANIFEST).write_text(json.dumps({"format": 1, "files": {}}))
    assert not is_complete(tmp_path)
    (tmp_path / MANIFEST).write_text("not json")
    assert not is_complete(tmp_path)
