"""The tokenizer with a versioned catalog: it loads each version's tokenizer under the version's served name
(`chat@v2`, the name the frontend renders with), at start and when a reloaded catalog adds a version."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from infermesh.common.catalog import load_catalog
from infermesh.tokenizer.main import TokenizerConfig, follow_catalog, model_specs, to_load
from infermesh.tokenizer.models import ModelRegistry, ModelTokenizer

PLAIN = "format: 1\nmodels:\n  - {{name: chat, weights: {{dir: {model}}}}}\n"
VERSIONED = """\
format: 1
models:
  - name: chat
    stable: v1
    versions:
      - {{name: v1, weights: {{dir: {model}}}}}
      - {{name: v2, weights: {{dir: {model}}}, traffic: 10}}
      - {{name: v3, weights: {{dir: {model}}}, workers: 0}}
  - {{name: other, weights: {{dir: {model}}}}}
"""


def test_every_version_is_loaded_under_its_served_name(tmp_path: Path, model_dir: Path) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text(VERSIONED.format(model=model_dir))
    catalog = load_catalog(path)
    # A version whose workers run elsewhere (workers: 0) is rendered for too.
    assert [m.name for m in to_load(catalog)] == ["chat@v1", "chat@v2", "chat@v3", "other"]
    assert [m.name for m in to_load(catalog, {"chat@v1", "other"})] == ["chat@v2", "chat@v3"]
    assert model_specs(TokenizerConfig(catalog=str(path))) == [
        f"chat@v1={model_dir}", f"chat@v2={model_dir}", f"chat@v3={model_dir}", f"other={model_dir}"]


def test_a_version_not_prepared_is_named_by_its_prepared_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERMESH_HOME", str(tmp_path))
    path = tmp_path / "catalog.yaml"
    path.write_text("format: 1\nmodels:\n  - name: chat\n    stable: v1\n    versions:\n"
                    "      - {name: v1, weights: {prepared: SmolLM2-135M-Instruct}}\n"
                    "      - {name: v2, weights: {prepared: SmolLM2-135M-Instruct}}\n")
    with pytest.raises(SystemExit, match=r"prepared models SmolLM2-135M-Instruct are not converted yet; "
                                         r"run `infermesh prepare-model SmolLM2-135M-Instruct`$"):
        model_specs(TokenizerConfig(catalog=str(path)))


async def test_a_reloaded_catalog_adds_its_versions_tokenizers(tmp_path: Path, model_dir: Path) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text(PLAIN.format(model=model_dir))
    registry = ModelRegistry([ModelTokenizer.load("chat", model_dir)])
    stop = follow_catalog(str(path), registry)
    try:
        replacement = tmp_path / "new.yaml"
        replacement.write_text(VERSIONED.format(model=model_dir))
        replacement.rename(path)  # as a ConfigMap update does
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while not {"chat@v1", "chat@v2", "chat@v3", "other"} <= set(registry.models):
            assert loop.time() < deadline, f"loaded only {sorted(registry.models)}"
            await asyncio.sleep(0.1)
    finally:
        stop()
    version = registry.get("chat@v2")
    assert version.name == "chat@v2" and version.vocab_size == registry.get("chat").vocab_size
    assert "chat" in registry.models  # what the catalog dropped stays: requests in flight may name it
