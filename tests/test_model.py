"""The converted default model is right: it answers like the original."""

from __future__ import annotations

import json
from pathlib import Path

from infermesh.common.model_prep import MANIFEST, is_complete


def test_prepared_directory_is_a_complete_hf_model(model_dir: Path) -> None:
    assert is_complete(model_dir)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (model_dir / name).is_file(), name
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert json.loads((model_dir / MANIFEST).read_text())["files"]["model.safetensors"] > 100_000_000


def test_greedy_answer_names_paris(model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=True, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
