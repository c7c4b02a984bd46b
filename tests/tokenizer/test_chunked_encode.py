"""Chunked parallel encoding of long texts gives exactly the ids of one encode."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from infermesh.tokenizer.models import ModelTokenizer

PIECES = st.sampled_from(["word", " ", "  ", "\n", "\n\n", "\t", "é", "日本", "😀", "'s", "123", "<|im_start|>",
                          "<|im_end|>", ",", ".", "  x", " y ", "\u200b", "-", "__init__"])


@pytest.fixture(scope="module")
def model(model_dir: Path) -> ModelTokenizer:
    model = ModelTokenizer.load(model_dir.name, model_dir)
    assert model.chunked  # the default model's tokenizer qualifies
    return model


@settings(max_examples=60, deadline=None)
@given(parts=st.lists(st.one_of(PIECES, st.text(max_size=12)), min_size=200, max_size=900))
def test_chunked_equals_whole(model: ModelTokenizer, parts: list[str]) -> None:
    text = "".join(parts)
    expected = model.tokenizer.encode(text, add_special_tokens=False).ids
    assert model.encode(text, add_special_tokens=False) == expected
