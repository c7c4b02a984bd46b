"""The tokenizer service renders exactly what transformers' apply_chat_template does."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from infermesh.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc

from tests.harness import ServiceProcess
from tests.tokenizer.conversations import CONVERSATIONS, PROMPTS


@pytest.fixture(scope="module")
def hf_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def stub(tokenizer_proc: ServiceProcess):
    with grpc.insecure_channel(tokenizer_proc.address) as channel:
        yield tokenizer_pb2_grpc.TokenizerStub(channel)


def _ids(encoded) -> list[int]:
    ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
    return list(ids)


def test_enough_varied_conversations() -> None:
    assert len(CONVERSATIONS) >= 30


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_chat_render_matches_transformers(index: int, stub, hf_tokenizer, model_name: str) -> None:
    messages = CONVERSATIONS[index]
    expected = _ids(hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True))
    reply = stub.Render(tokenizer_pb2.RenderRequest(
        model=model_name, messages=[common_pb2.ChatMessage(**m) for m in messages]))
    assert list(reply.token_ids) == expected

    # Decoding the rendered ids gives back the rendered text.
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    decoded = stub.Decode(tokenizer_pb2.DecodeRequest(model=model_name,
                                                      items=[common_pb2.TokenIds(ids=reply.token_ids)]))
    assert decoded.texts[0] == text


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_chat_without_generation_prompt(index: int, stub, hf_tokenizer, model_name: str) -> None:
    messages = CONVERSATIONS[index]
    expected = _ids(hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=False))
    reply = stub.Render(tokenizer_pb2.RenderRequest(
        model=model_name, messages=[common_pb2.ChatMessage(**m) for m in messages], add_generation_prompt=False))
    assert list(reply.token_ids) == expected


@pytest.mark.parametrize("prompt", [p for p in PROMPTS if p])
def test_prompt_encode_matches_transformers(prompt: str, stub, hf_tokenizer, model_name: str) -> None:
    expected = hf_tokenizer(prompt)["input_ids"]
    reply = stub.Render(tokenizer_pb2.RenderRequest(model=model_name, prompt=prompt))
    assert list(reply.token_ids) == list(expected)
    batch = stub.Encode(tokenizer_pb2.EncodeRequest(model=model_name, texts=[prompt, prompt + "!"],
                                                    add_special_tokens=False))
    assert list(batch.items[0].ids) == hf_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert list(batch.items[1].ids) == hf_tokenizer(prompt + "!", add_special_tokens=False)["input_ids"]
    decoded = stub.Decode(tokenizer_pb2.DecodeRequest(model=model_name, items=[batch.items[0]]))
    assert decoded.texts[0] == hf_tokenizer.decode(batch.items[0].ids)
