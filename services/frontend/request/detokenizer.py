"""Incremental detokenization in-process, from the tokenizer service's definition.

`Detokenizer` wraps the `tokenizers` library's `DecodeStream`, which holds back
tokens until they form whole UTF-8 characters: a character split across tokens
comes out once, complete, and a stream never shows U+FFFD for it. Streaming
and non-streaming responses both concatenate these pieces, so they are equal.
"""

from __future__ import annotations

from collections.abc import Sequence

from infermesh.common.errors import InternalError
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class TokenizerModel:
    """A model's tokenizer for decoding, built from a TokenizerDefinition."""

    def __init__(self, name: str, tokenizer_json: bytes, eos_token_ids: Sequence[int]) -> None:
        self.name = name
        self.tokenizer = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_token_ids = frozenset(eos_token_ids)
        self._token_text: dict[int, str] = {}

    def detokenizer(self, skip_special_tokens: bool = True) -> Detokenizer:
        return Detokenizer(self, skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token's own text (for logprobs); may be a partial character."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            if len(self._token_text) < 200_000:
                self._token_text[token_id] = text
        return text

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


class Detokenizer:
    """Turns token ids, fed in order, into text pieces."""

    __slots__ = ("model", "_stream", "_tokenizer")

    def __init__(self, model: TokenizerModel, skip_special_tokens: bool = True) -> None:
        self.model = model
        self._tokenizer = model.tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def feed(self, ids: Sequence[int]) -> str:
        """The new text the ids complete ("" while a character is still partial)."""
        step = self._stream.step
        tok = self._tokenizer
        if len(ids) == 1:
            try:
                return step(tok, ids[0]) or ""
            except Exception as exc:
                raise InternalError(f"cannot decode token id {ids[0]}: {exc}") from None
        parts = []
        for token_id in ids:
            try:
                piece = step(tok, token_id)
            except Exception as exc:
                raise InternalError(f"cannot decode token id {token_id}: {exc}") from None
            if piece:
                parts.append(piece)
        return "".join(parts)
