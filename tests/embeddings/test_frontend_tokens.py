"""Embedding inputs tokenized in the frontend (request/embed_tokens.py): the tokenizer tier's ids exactly,
from the definition the frontend fetched, and the same limits as every other input."""

from __future__ import annotations

from pathlib import Path

import pytest
from infermesh.common.errors import ContextLengthExceeded
from infermesh.frontend.request import embed_tokens
from infermesh.frontend.request.detokenizer import TokenizerModel
from infermesh.frontend.request.embed_tokens import encode_inputs
from infermesh.frontend.request.embedding import EmbedParams, embed
from infermesh.tokenizer.models import ModelTokenizer

from tests.embeddings.fakes import MODEL, WINDOW, FakeEmbedBackends

TEXTS = [
    "A cat sits on the mat.",
    "Quarterly revenue rose by 4% (to $1,234.56) — après-ski, naïve café, Zürich.",
    "東京は日本の首都です。 Emoji too: 🚀🔥 and ZWJ 👩‍💻.",
    "  leading and trailing spaces, tabs\tand\nnewlines  ",
    "[CLS] special [SEP] tokens [MASK] written as text [PAD] [UNK]",
    "UPPER case Mixed CaSe, numbers 0123456789 and ünïcödé àccents",
    "x",
    " ".join(f"word{i}" for i in range(300)),  # longer than MiniLM's own truncation (128) and the window
    "",
]


@pytest.mark.parametrize("which", ["minilm", "smollm2"])
def test_the_same_ids_as_the_tokenizer_tier(which: str, minilm_dir: Path, model_dir: Path) -> None:
    directory = minilm_dir if which == "minilm" else model_dir
    tier = ModelTokenizer.load(directory.name, directory)
    # The frontend's model, built from the definition the tier hands out (GetTokenizer's tokenizer_json).
    model = TokenizerModel(tier.name, tier.tokenizer_json, tier.eos_token_ids)
    ours = encode_inputs(model, TEXTS)
    assert ours is not None
    assert ours == tier.encode_batch(TEXTS, add_special_tokens=True)
    if which == "minilm":
        assert len(ours[7]) > 300 and ours[7][0] == 101 and ours[7][-1] == 102  # not truncated, not padded
        assert ours[-1] == [101, 102]
    # The model's own decoding tokenizer is left as it was (its truncation and padding, if any).
    assert model.tokenizer.truncation == tier_definition_truncation(tier)


def tier_definition_truncation(tier: ModelTokenizer) -> object:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tier.tokenizer_json.decode()).truncation


def test_long_batches_go_to_the_tokenizer_tier(minilm_dir: Path) -> None:
    model = TokenizerModel(MODEL, (minilm_dir / "tokenizer.json").read_bytes(), [])
    assert encode_inputs(model, ["a" * embed_tokens.INPROCESS_CHARS]) is not None
    assert encode_inputs(model, ["a" * (embed_tokens.INPROCESS_CHARS // 2 + 1)] * 2) is None


async def test_an_input_longer_than_the_window_is_refused_in_the_frontend_as_before(minilm_dir: Path) -> None:
    fake = FakeEmbedBackends(minilm_dir)
    long = "the quick brown fox jumps over the lazy dog " * 40  # ~362 tokens
    n = len(fake.ids(long))
    assert n > WINDOW
    with pytest.raises(ContextLengthExceeded) as refused:
        await embed(fake, EmbedParams(model=MODEL, request_id="r"), texts=["short", long])
    assert refused.value.param == "input"
    assert str(refused.value.message) == (
        f"This model's maximum context length is {WINDOW} tokens. However, input[1] has {n} tokens. "
        "Please reduce the length of the input, or set truncate_prompt_tokens.")
    assert fake.encoded == [] and fake.admitted == []
    fake.admissions.append("a:1")
    fake.script("a:1", None)
    result = await embed(fake, EmbedParams(model=MODEL, request_id="r", truncate_prompt_tokens=WINDOW), texts=[long])
    (_, call), = fake.calls
    assert len(call.inputs[0].ids) == WINDOW == result.prompt_tokens
    assert fake.encoded == []
