"""Embeddings for real: vLLM's pooling runner on all-MiniLM-L6-v2 behind a scheduler and a frontend.

The vectors are compared with sentence-transformers' for the same inputs (cosine >= 0.9999; the worker
runs the embed model in float32). The mesh also serves a (simulated) generate model, which the
embeddings endpoint refuses, as the generation endpoints refuse the embed model.
"""

from __future__ import annotations

import asyncio
import base64
import struct
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import openai
import pytest
from infermesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from tests.fixtures.mesh import Mesh

pytestmark = pytest.mark.engine

SENTENCES = [
    "A cat sits on the mat.",
    "A kitten is sitting on a rug.",
    "Quarterly revenue rose by 4% on strong demand for cloud services.",
    "Der schnelle braune Fuchs springt über den faulen Hund — 速い茶色の狐。",
    "embeddings",
]
LONG = "The mesh admits every request through one queue, fairly between tenants. " * 30  # ~420 tokens


@pytest.fixture(scope="module")
def st_model(minilm_dir: Path) -> Any:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_dir), device="cpu")
    assert model.max_seq_length == 256
    return model


def reference(st_model: Any, texts: list[str]) -> np.ndarray:
    """sentence-transformers' vectors (mean pooling, normalised; inputs truncated at 256 tokens)."""
    return np.asarray(st_model.encode(texts, convert_to_numpy=True, normalize_embeddings=True), dtype=np.float64)


def cosines(a: Any, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return np.asarray((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))


@pytest.fixture(scope="module")
def client(embed_mesh: Mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=embed_mesh.base_url, api_key="unused", max_retries=0)


def post(mesh: Mesh, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(mesh.url + "/v1/embeddings", json=body, timeout=60)


def hf_ids(minilm_dir: Path, texts: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(minilm_dir)(texts)["input_ids"])


def test_openai_client_floats_match_sentence_transformers(client: openai.OpenAI, embed_mesh: Mesh,
                                                          st_model: Any, minilm_dir: Path) -> None:
    reply = client.embeddings.create(model=embed_mesh.model, input=SENTENCES, encoding_format="float")
    assert reply.object == "list" and reply.model == "all-MiniLM-L6-v2"
    assert [d.index for d in reply.data] == list(range(len(SENTENCES)))
    assert {d.object for d in reply.data} == {"embedding"} and {len(d.embedding) for d in reply.data} == {384}
    vectors = np.array([d.embedding for d in reply.data])
    assert cosines(vectors, reference(st_model, SENTENCES)).min() >= 0.9999
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert float(vectors[0] @ vectors[1]) > 0.5 > float(vectors[0] @ vectors[2])  # meaning, not noise
    tokens = sum(len(ids) for ids in hf_ids(minilm_dir, SENTENCES))
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == tokens


def test_base64_is_the_same_float32_vectors(client: openai.OpenAI, embed_mesh: Mesh, st_model: Any) -> None:
    # The openai client asks for base64 unless told otherwise, and decodes it.
    decoded = client.embeddings.create(model=embed_mesh.model, input=SENTENCES)
    assert cosines([d.embedding for d in decoded.data], reference(st_model, SENTENCES)).min() >= 0.9999
    raw = post(embed_mesh, {"model": embed_mesh.model, "input": SENTENCES[:2], "encoding_format": "base64"})
    floats = post(embed_mesh, {"model": embed_mesh.model, "input": SENTENCES[:2]})
    assert raw.status_code == floats.status_code == 200
    for b64, flt in zip(raw.json()["data"], floats.json()["data"], strict=True):
        packed = base64.b64decode(b64["embedding"])
        assert len(packed) == 384 * 4
        values = struct.unpack("<384f", packed)  # little-endian float32, as OpenAI's
        assert values == pytest.approx(flt["embedding"], abs=1e-6)


def test_token_id_inputs_give_the_texts_vectors(embed_mesh: Mesh, minilm_dir: Path, st_model: Any) -> None:
    ids = hf_ids(minilm_dir, SENTENCES[:3])
    lists = post(embed_mesh, {"model": embed_mesh.model, "input": ids})
    one = post(embed_mesh, {"model": embed_mesh.model, "input": ids[0]})
    text = post(embed_mesh, {"model": embed_mesh.model, "input": SENTENCES[0]})
    assert lists.status_code == one.status_code == text.status_code == 200
    expected = reference(st_model, SENTENCES[:3])
    assert cosines([d["embedding"] for d in lists.json()["data"]], expected).min() >= 0.9999
    assert cosines([one.json()["data"][0]["embedding"]], expected[:1]).min() >= 0.9999
    assert cosines([text.json()["data"][0]["embedding"]], expected[:1]).min() >= 0.9999
    assert lists.json()["usage"]["prompt_tokens"] == sum(map(len, ids))


def test_a_long_input_is_refused_unless_truncation_is_asked_for(embed_mesh: Mesh, st_model: Any) -> None:
    refused = post(embed_mesh, {"model": embed_mesh.model, "input": ["short", LONG]})
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["param"] == "input" and "256" in error["message"] and "input[1]" in error["message"]
    truncated = post(embed_mesh, {"model": embed_mesh.model, "input": ["short", LONG], "truncate_prompt_tokens": -1})
    assert truncated.status_code == 200, truncated.text
    # sentence-transformers truncates at the model's 256 tokens too, keeping [CLS] and [SEP].
    vectors = [d["embedding"] for d in truncated.json()["data"]]
    assert cosines(vectors, reference(st_model, ["short", LONG])).min() >= 0.9999
    assert truncated.json()["usage"]["prompt_tokens"] == 256 + 3


@pytest.mark.parametrize("body, status, param", [
    ({"input": []}, 400, "input"),
    ({"input": ""}, 400, "input"),
    ({"input": ["fine", ""]}, 400, "input"),
    ({"input": ["word"] * 2049}, 400, "input"),
    ({"input": [[101, 40000, 102]]}, 400, "input"),
    ({"input": "x", "dimensions": 100}, 400, "dimensions"),
    ({"input": "x", "encoding_format": "hex"}, 400, "encoding_format"),
    ({"input": "x", "truncate_prompt_tokens": 1000}, 400, "truncate_prompt_tokens"),
    ({"input": "x", "model": "SmolLM2-135M-Instruct"}, 400, "model"),
    ({"input": "x", "model": "no-such-model"}, 404, "model"),
])
def test_bad_requests_are_clear_4xx_naming_the_parameter(embed_mesh: Mesh, body: dict[str, Any], status: int,
                                                         param: str) -> None:
    reply = post(embed_mesh, {"model": embed_mesh.model, **body})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["type"] in ("invalid_request_error", "not_found_error")


def test_the_model_s_own_dimension_and_the_user_field_are_accepted(client: openai.OpenAI, embed_mesh: Mesh) -> None:
    reply = client.embeddings.create(model=embed_mesh.model, input="hello", dimensions=384, user="tenant-7",
                                     encoding_format="float")
    assert len(reply.data[0].embedding) == 384
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=embed_mesh.model, input="hello", dimensions=128)
    assert refused.value.body["param"] == "dimensions"  # type: ignore[index]


def test_the_generation_endpoints_refuse_the_embed_model(embed_mesh: Mesh) -> None:
    reply = httpx.post(embed_mesh.url + "/v1/completions", json={"model": embed_mesh.model, "prompt": "Hello",
                                                                  "max_tokens": 4}, timeout=60)
    assert reply.status_code == 400, reply.text


def test_models_lists_each_model_s_task(embed_mesh: Mesh) -> None:
    cards = {m["id"]: m for m in httpx.get(embed_mesh.url + "/v1/models", timeout=10).json()["data"]}
    assert cards["all-MiniLM-L6-v2"]["task"] == "embed" and cards["all-MiniLM-L6-v2"]["max_model_len"] == 256
    assert cards["SmolLM2-135M-Instruct"]["task"] == "generate"


async def test_grpc_embed_matches_http_and_sentence_transformers(embed_mesh: Mesh, st_model: Any,
                                                                 minilm_dir: Path) -> None:
    async with grpc.aio.insecure_channel(embed_mesh.frontend.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        texts = await stub.Embed(inference_pb2.EmbedRequest(model=embed_mesh.model, texts=SENTENCES), timeout=60)
        ids = hf_ids(minilm_dir, SENTENCES[:2])
        by_ids = await stub.Embed(inference_pb2.EmbedRequest(
            model=embed_mesh.model, token_ids=[common_pb2.TokenIds(ids=i) for i in ids]), timeout=60)
        cards = {c.id: c for c in (await stub.ListModels(common_pb2.ListModelsRequest(), timeout=10)).models}
        with pytest.raises(grpc.aio.AioRpcError) as both:
            await stub.Embed(inference_pb2.EmbedRequest(model=embed_mesh.model, texts=["a"],
                                                        token_ids=[common_pb2.TokenIds(ids=[101])]), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as chat_model:
            await stub.Embed(inference_pb2.EmbedRequest(model="SmolLM2-135M-Instruct", texts=["a"]), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as too_long:
            await stub.Embed(inference_pb2.EmbedRequest(model=embed_mesh.model, texts=[LONG]), timeout=10)
    assert texts.model == "all-MiniLM-L6-v2" and texts.id
    assert [d.index for d in texts.data] == list(range(len(SENTENCES)))
    expected = reference(st_model, SENTENCES)
    assert cosines([list(d.embedding) for d in texts.data], expected).min() >= 0.9999
    assert cosines([list(d.embedding) for d in by_ids.data], expected[:2]).min() >= 0.9999
    assert texts.usage.prompt_tokens == texts.usage.total_tokens == sum(map(len, hf_ids(minilm_dir, SENTENCES)))
    assert (cards["all-MiniLM-L6-v2"].task, cards["all-MiniLM-L6-v2"].embedding_dim) == ("embed", 384)
    assert both.value.code() == chat_model.value.code() == too_long.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "256" in (too_long.value.details() or "")


async def test_concurrent_requests_are_each_served_their_own_vectors(embed_mesh: Mesh, st_model: Any) -> None:
    texts = [f"request {i}: {SENTENCES[i % len(SENTENCES)]}" for i in range(32)]
    async with httpx.AsyncClient(base_url=embed_mesh.url, timeout=120) as http:
        replies = await asyncio.gather(*(http.post("/v1/embeddings", json={"model": embed_mesh.model, "input": t})
                                         for t in texts))
    assert {r.status_code for r in replies} == {200}
    vectors = [r.json()["data"][0]["embedding"] for r in replies]
    assert cosines(vectors, reference(st_model, texts)).min() >= 0.9999
