"""The incremental detokenizer on the default model's tokenizer: split UTF-8, specials, any chunking."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from infermesh.frontend.request.detokenizer import TokenizerModel

TEXTS = ["héllo wörld", "日本語のテキスト", "emoji 😀🎉 and 👩‍👩‍👧 family", "Ελληνικά, русский, العربية",
         "math ∑∫√ and € £ ¥", "plain ascii text with spaces", "mixed 中文 English 😀 done\nnew line"]


@pytest.fixture(scope="module")
def model(model_dir: Path) -> TokenizerModel:
    return TokenizerModel(model_dir.name, (model_dir / "tokenizer.json").read_bytes(), [2])


def stream(model: TokenizerModel, ids: list[int], sizes: list[int] | None = None) -> list[str]:
    detok = model.detokenizer()
    pieces, i, k = [], 0, 0
    while i < len(ids):
        n = sizes[k % len(sizes)] if sizes else 1
        pieces.append(detok.feed(ids[i:i + n]))
        i, k = i + n, k + 1
    return pieces


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_equals_whole_decode_and_never_shows_replacement(model: TokenizerModel, text: str) -> None:
    ids = model.tokenizer.encode(text, add_special_tokens=False).ids
    pieces = stream(model, ids)
    assert "".join(pieces) == model.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_a_character_split_across_tokens_comes_out_whole(model: TokenizerModel) -> None:
    ids = model.tokenizer.encode("😀", add_special_tokens=False).ids
    # The emoji's four bytes are spread over several byte-level tokens: each alone is not text.
    assert len(ids) > 1
    assert all("\ufffd" in model.decode([i]) for i in ids)
    pieces = stream(model, ids)
    assert pieces[:-1] == [""] * (len(ids) - 1)
    assert pieces[-1] == "😀"


def test_special_tokens_are_skipped(model: TokenizerModel) -> None:
    eos = model.tokenizer.token_to_id("<|im_end|>")
    assert eos is not None
    ids = model.tokenizer.encode("done", add_special_tokens=False).ids + [eos]
    assert "".join(stream(model, ids)) == "done"


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Cn", "Co")), min_size=1,
                    max_size=40),
       sizes=st.lists(st.integers(1, 5), min_size=1, max_size=6))
def test_any_chunking_gives_the_same_text(model: TokenizerModel, text: str, sizes: list[int]) -> None:
    ids = model.tokenizer.encode(text, add_special_tokens=False).ids
    whole = "".join(stream(model, ids))
    assert "".join(stream(model, ids, sizes)) == whole
    assert whole == model.decode(ids)


def test_token_text_for_logprobs(model: TokenizerModel) -> None:
    ids = model.tokenizer.encode(" hello world", add_special_tokens=False).ids
    assert "".join(model.token_text(i) for i in ids) == " hello world"


def test_an_unfinished_character_at_the_end_is_not_sent_as_replacement(model: TokenizerModel) -> None:
    ids = model.tokenizer.encode("ok 😀", add_special_tokens=False).ids
    pieces = stream(model, ids[:-1])  # the emoji's last byte never comes
    assert "".join(pieces) == "ok"
    assert "\ufffd" in model.decode(ids[:-1])  # what a naive decode would have shown
