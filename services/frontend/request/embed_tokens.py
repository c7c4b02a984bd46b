"""Embedding inputs tokenized in the frontend, from the tokenizer definition it already holds.

An embedding input is a plain text encoded with the model's special tokens: no
chat template, nothing the tokenizer tier knows that the frontend does not (it
fetched the same `tokenizer.json` for detokenizing). For a short input the
gRPC hop to the tokenizer tier costs more CPU than the encoding itself (a
sentence: ~0.06 ms to encode, ~1 ms of CPU for the Encode call on both sides),
so texts up to `INPROCESS_CHARS` together are encoded here, on the event loop;
longer batches still go to the tokenizer tier (its thread pool keeps them off
the frontend's loop).

The encoder is the tokenizer tier's exactly (`infermesh.tokenizer.models`): the
definition with its own truncation and padding turned off (all-MiniLM-L6-v2's
`tokenizer.json` truncates at 128 and pads to 128), so an input gets its own
ids and the context window is checked on them, as for every other input.
Texts are encoded one by one (`Tokenizer.encode`): the batch call fans out to
a thread pool, which costs more CPU than it saves on a busy machine; the ids
are the same.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

from infermesh.frontend.request.detokenizer import TokenizerModel
from tokenizers import Tokenizer

# Texts of at most this many characters together (an embeddings request of ~25 sentences: ~1.5 ms of
# encoding) are encoded in-process; longer ones by the tokenizer tier.
INPROCESS_CHARS = 4096

_encoders: weakref.WeakKeyDictionary[TokenizerModel, Tokenizer] = weakref.WeakKeyDictionary()


def encoder(model: TokenizerModel) -> Tokenizer:
    """The model's encoder: its definition without the truncation and padding it may carry."""
    enc = _encoders.get(model)
    if enc is None:
        enc = Tokenizer.from_str(model.tokenizer.to_str())
        enc.no_truncation()
        enc.no_padding()
        _encoders[model] = enc
    return enc


def encode_inputs(model: TokenizerModel, texts: Sequence[str]) -> list[list[int]] | None:
    """The texts' ids with the model's special tokens; None when they are too long to encode here."""
    if sum(len(t) for t in texts) > INPROCESS_CHARS:
        return None
    encode = encoder(model).encode
    return [encode(t, add_special_tokens=True).ids for t in texts]
