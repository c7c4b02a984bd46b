"""The converted default model is right: it answers like the original."""

from __future__ import annotations

import json
from pathlib import Path

from infermesh.common.model_prep import MANIFEST, is_complete

from tests.harness import greedy_chat_answer


def test_prepared_directory_is_a_complete_hf_model(model_dir: Path) -> None:
    assert is_complete(model_dir)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (model_dir / name).is_file(), name
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert json.loads((model_dir / MANIFEST).read_text())["files"]["model.safetensors"] > 100_000_000


def test_greedy_answer_names_paris(model_dir: Path) -> None:
    assert "Paris" in greedy_chat_answer(model_dir, "What is the capital of France?")
