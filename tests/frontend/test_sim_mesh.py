"""The frontend as a real process in a simulated mesh (zero-latency engines): API shape, errors, gRPC."""

from __future__ import annotations

import json

import grpc
import httpx
import openai
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from infermesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from tests.fixtures.mesh import Mesh, http_get, start_frontend
from tests.frontend.sse import metric_value, stream_sse
from tests.harness import free_port

CHAT = {"messages": [{"role": "user", "content": "Tell me a story."}]}


@pytest.fixture
async def http(sim_mesh: Mesh):
    async with httpx.AsyncClient(base_url=sim_mesh.url, timeout=30) as client:
        yield client


async def still_serving(client: httpx.AsyncClient, model: str) -> None:
    reply = await client.post("/v1/completions", json={"model": model, "prompt": "still there?", "max_tokens": 3})
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 3


async def test_sse_stream_format_and_equality_with_whole_response(sim_mesh: Mesh, http: httpx.AsyncClient) -> None:
    body = {"model": sim_mesh.model, **CHAT, "max_tokens": 40, "seed": 3, "stream_options": {"include_usage": True}}
    streamed = await stream_sse(http, "/v1/chat/completions", body)
    assert streamed.status == 200
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert streamed.headers["cache-control"] == "no-cache"
    assert streamed.headers["x-accel-buffering"] == "no"
    assert streamed.events[-1] == "[DONE]"
    assert streamed.chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in streamed.chunks)
    whole = (await http.post("/v1/chat/completions", json=body)).json()
    assert whole["object"] == "chat.completion"
    assert streamed.text() == whole["choices"][0]["message"]["content"] != ""
    assert streamed.finish() == whole["choices"][0]["finish_reason"] == "length"
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [streamed.usage[k] for k in counts] == [whole["usage"][k] for k in counts]
    # The second request found the first one's prompt in the prefix cache.
    assert whole["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert whole["usage"]["completion_tokens"] == 40


async def test_slow_reader_gets_fewer_larger_chunks(sim_mesh: Mesh, http: httpx.AsyncClient) -> None:
    body = {"model": sim_mesh.model, "prompt": "Once upon a time", "max_tokens": 1500, "seed": 9,
            "stream_options": {"include_usage": True}}
    slow = await stream_sse(http, "/v1/completions", body, read_delay=0.05)
    whole = (await http.post("/v1/completions", json={**body, "stream": False})).json()
    assert slow.text() == whole["choices"][0]["text"]
    assert slow.usage["completion_tokens"] == 1500
    # 1,500 tokens, but the reader paused after every read: the frontend sent what had piled up together.
    assert len(slow.chunks) < 300, len(slow.chunks)


async def test_stop_strings_across_tokens_are_cut(sim_mesh: Mesh, http: httpx.AsyncClient) -> None:
    body = {"model": sim_mesh.model, "prompt": "Say something", "max_tokens": 60, "seed": 5}
    full = (await http.post("/v1/completions", json=body)).json()["choices"][0]["text"]
    words = full.split(" ")
    stop = words[5][-2:] + " " + words[6][:2]  # spans two tokens (sim tokens are whole words)
    cut = full[:full.find(stop)]
    whole = (await http.post("/v1/completions", json={**body, "stop": [stop, "zzzz-never"]})).json()
    assert whole["choices"][0]["text"] == cut
    assert whole["choices"][0]["finish_reason"] == "stop"
    streamed = await stream_sse(http, "/v1/completions", {**body, "stop": stop})
    assert streamed.text() == cut and streamed.finish() == "stop"


async def test_n_choices_and_openai_async_client(sim_mesh: Mesh) -> None:
    client = openai.AsyncOpenAI(base_url=sim_mesh.base_url, api_key="unused")
    reply = await client.chat.completions.create(model=sim_mesh.model, n=3, max_tokens=12, **CHAT)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) == 3
    assert reply.usage.completion_tokens == 36
    stream = await client.chat.completions.create(model=sim_mesh.model, n=3, max_tokens=12, stream=True, **CHAT)
    texts = ["", "", ""]
    async for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert all(t for t in texts)
    await client.close()


async def test_models_are_listed_and_marked_simulated(sim_mesh: Mesh) -> None:
    models = openai.OpenAI(base_url=sim_mesh.base_url, api_key="unused").models.list()
    [card] = [m for m in models.data if m.id == sim_mesh.model]
    assert card.model_extra["simulated"] is True


@pytest.mark.parametrize("case", ["malformed_json", "wrong_type", "missing_messages", "negative_max_tokens",
                                  "prompt_too_long", "unknown_model", "oversized_body", "too_many_ids"])
async def test_errors_have_openai_bodies_and_the_mesh_keeps_serving(case: str, sim_mesh: Mesh,
                                                                    http: httpx.AsyncClient) -> None:
    model = sim_mesh.model
    cases = {
        "malformed_json": (dict(content=b'{"model": '), 400),
        "wrong_type": (dict(json={"model": model, **CHAT, "temperature": "hot"}), 400),
        "missing_messages": (dict(json={"model": model}), 400),
        "negative_max_tokens": (dict(json={"model": model, **CHAT, "max_tokens": -1}), 400),
        "prompt_too_long": (dict(json={"model": model, "messages": [
            {"role": "user", "content": "word " * 9000}]}), 400),
        "unknown_model": (dict(json={"model": "no-such-model", **CHAT}), 404),
        "oversized_body": (dict(json={"model": model, "messages": [
            {"role": "user", "content": "x" * 5_000_000}]}), 413),
        "too_many_ids": (dict(json={"model": model, **CHAT, "max_tokens": 100_000}), 400),
    }
    kwargs, status = cases[case]
    for stream in (False, True):
        if "json" in kwargs:
            kwargs = {"json": {**kwargs["json"], "stream": stream}}
        reply = await http.post("/v1/chat/completions", **kwargs)
        assert reply.status_code == status, reply.text
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if case == "prompt_too_long":
        assert "maximum context length" in error["message"]
    await still_serving(http, model)


async def test_openai_client_raises_typed_errors(sim_mesh: Mesh) -> None:
    client = openai.OpenAI(base_url=sim_mesh.base_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", max_tokens=2, **CHAT)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=sim_mesh.model, prompt="x", max_tokens=0)


async def test_grpc_generate_list_models_reflection_and_errors(sim_mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(sim_mesh.frontend.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        request = inference_pb2.GenerateRequest(
            model=sim_mesh.model, prompt="hello there", sampling=common_pb2.SamplingParams(max_tokens=20, seed=4))
        replies = [r async for r in stub.Generate(request)]
        assert replies[-1].finish_reason == "length"
        assert replies[-1].usage.completion_tokens == 20 == sum(len(r.token_ids) for r in replies)
        text = "".join(r.text for r in replies)
        async with httpx.AsyncClient(base_url=sim_mesh.url) as http:
            same = (await http.post("/v1/completions", json={"model": sim_mesh.model, "prompt": "hello there",
                                                             "max_tokens": 20, "seed": 4})).json()
        assert text == same["choices"][0]["text"]
        models = await stub.ListModels(common_pb2.ListModelsRequest())
        assert any(m.id == sim_mesh.model and m.simulated for m in models.models)
        for bad, code in ((inference_pb2.GenerateRequest(model="nope", prompt="x"), grpc.StatusCode.NOT_FOUND),
                          (inference_pb2.GenerateRequest(model=sim_mesh.model), grpc.StatusCode.INVALID_ARGUMENT),
                          (inference_pb2.GenerateRequest(model=sim_mesh.model, prompt="x",
                                                         sampling=common_pb2.SamplingParams(temperature=9)),
                           grpc.StatusCode.INVALID_ARGUMENT)):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                [r async for r in stub.Generate(bad)]
            assert info.value.code() == code and info.value.details()
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = reflection.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        reply = await call.read()
        await call.done_writing()
        assert "infermesh.v1.Inference" in {s.name for s in reply.list_services_response.service}


async def test_metrics_are_exported(sim_mesh: Mesh, http: httpx.AsyncClient) -> None:
    await still_serving(http, sim_mesh.model)
    text = (await http.get("/metrics")).text
    for name in ("infermesh_time_to_first_token_seconds_count", "infermesh_inter_token_latency_seconds_count",
                 "infermesh_e2e_request_latency_seconds_count", "infermesh_prompt_tokens_total",
                 "infermesh_generation_tokens_total"):
        assert metric_value(text, name) > 0, name
    assert 'infermesh_http_requests_total{code="200",route="/v1/completions"}' in text
    assert "infermesh_active_streams" in text


def test_api_keys_are_enforced_and_each_is_a_tenant(sim_mesh: Mesh, tmp_path) -> None:
    front = start_frontend(tmp_path, sim_mesh.tokenizer.address, sim_mesh.scheduler.address,
                           env={"INFERMESH_API_KEYS": "alice:sk-alice-123,bob:sk-bob-456"})
    try:
        front.wait_ready()
        ok = openai.OpenAI(base_url=front.url + "/v1", api_key="sk-bob-456")
        assert ok.completions.create(model=sim_mesh.model, prompt="hi", max_tokens=2).usage.completion_tokens == 2
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=front.url + "/v1", api_key="wrong", max_retries=0).completions.create(
                model=sim_mesh.model, prompt="hi", max_tokens=2)
        reply = httpx.post(front.url + "/v1/completions", json={"model": sim_mesh.model, "prompt": "hi"})
        assert reply.status_code == 401 and reply.json()["error"]["type"] == "authentication_error"
        with grpc.insecure_channel(front.address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            request = inference_pb2.GenerateRequest(model=sim_mesh.model, prompt="hi",
                                                    sampling=common_pb2.SamplingParams(max_tokens=2))
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Generate(request))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            replies = list(stub.Generate(request, metadata=[("authorization", "Bearer sk-alice-123")]))
            assert replies[-1].usage.completion_tokens == 2
        assert "sk-alice-123" not in front.log() and "sk-bob-456" not in front.log()
    finally:
        front.stop()


def test_health_is_503_without_workers_and_requests_get_503(sim_mesh: Mesh, tmp_path) -> None:
    from tests.fixtures.mesh import start_scheduler

    empty = start_scheduler(tmp_path, [f"127.0.0.1:{free_port()}"])
    front = start_frontend(tmp_path, sim_mesh.tokenizer.address, empty.address)
    try:
        status, body = http_get(front.url + "/health")
        assert status == 503 and body["ready_workers"] == "0"
        reply = httpx.post(front.url + "/v1/completions", json={"model": sim_mesh.model, "prompt": "x"}, timeout=30)
        assert reply.status_code == 503, reply.text
        assert reply.json()["error"]["type"] == "service_unavailable_error"
    finally:
        front.stop()
        empty.stop()
    assert json.loads(json.dumps(body))  # the health body is JSON


async def test_completion_logprobs(sim_mesh: Mesh, http: httpx.AsyncClient) -> None:
    body = {"model": sim_mesh.model, "prompt": "Count with me", "max_tokens": 6, "logprobs": 2, "seed": 1}
    whole = (await http.post("/v1/completions", json=body)).json()
    lp = whole["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == 6
    assert "".join(lp["tokens"]) == whole["choices"][0]["text"]
    assert all(len(top) >= 1 for top in lp["top_logprobs"])
    streamed = await stream_sse(http, "/v1/completions", body)
    tokens = [t for c in streamed.chunks for ch in c["choices"] if ch["logprobs"] for t in ch["logprobs"]["tokens"]]
    assert tokens == lp["tokens"]
