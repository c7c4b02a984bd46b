"""Every request limit at its bound and just past it, over HTTP and gRPC, on an idle and on a saturated mesh.

The limits are the one table in `infermesh.common.limits`; the worker checks the
same table, so what it would refuse must be refused at the edge, with 400 /
INVALID_ARGUMENT, however loaded the mesh is: never a 200 whose stream then
carries an error, never a 429 for a request that can never run.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
import httpx
import pytest
from infermesh.common.limits import INT32, INT64_MAX, INT64_MIN, MAX_LOGPROBS, MAX_N, MAX_STOP_CHARS, SAMPLING
from infermesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc

WINDOW = 256  # the simulated worker's context window (what it reports)
PROMPT = [1, 2, 3]  # token ids, so the prompt's length is known exactly

# (parameter, value, accepted): each SamplingParams field's bounds from the table, and one step past.
CASES: list[tuple[str, Any, bool]] = [
    ("temperature", 0.0, True), ("temperature", 2.0, True), ("temperature", 2.01, False),
    ("temperature", -0.01, False),
    ("top_p", 1.0, True), ("top_p", 0.001, True), ("top_p", 0.0, False), ("top_p", 1.01, False),
    ("top_k", -1, True), ("top_k", INT32, True), ("top_k", -2, False),
    ("min_p", 0.0, True), ("min_p", 1.0, True), ("min_p", 1.01, False), ("min_p", -0.01, False),
    ("presence_penalty", -2.0, True), ("presence_penalty", 2.0, True), ("presence_penalty", 2.01, False),
    ("presence_penalty", -2.01, False),
    ("frequency_penalty", -2.0, True), ("frequency_penalty", 2.0, True), ("frequency_penalty", 2.01, False),
    ("frequency_penalty", -2.01, False),
    ("repetition_penalty", 2.0, True), ("repetition_penalty", 0.01, True), ("repetition_penalty", 2.01, False),
    ("repetition_penalty", 0.0, False),
    ("n", 1, True), ("n", MAX_N, True), ("n", MAX_N + 1, False),
    ("logprobs", 0, True), ("logprobs", MAX_LOGPROBS, True), ("logprobs", MAX_LOGPROBS + 1, False),
    ("seed", INT64_MIN, True), ("seed", INT64_MAX, True),
    ("min_tokens", 2, True), ("min_tokens", 3, False),  # max_tokens is 2
    ("max_tokens", 1, True), ("max_tokens", 0, False),
    ("max_tokens", WINDOW - len(PROMPT), True), ("max_tokens", WINDOW - len(PROMPT) + 1, False),
    ("stop", ["x"] * 16, True), ("stop", ["x"] * 17, False),
    ("stop", ["y" * MAX_STOP_CHARS], True), ("stop", ["y" * (MAX_STOP_CHARS + 1)], False),
    ("stop_token_ids", [5] * 64, True), ("stop_token_ids", [5] * 65, False),
    ("stop_token_ids", [49151], True), ("stop_token_ids", [49152], False),  # the vocabulary has 49152 ids
]
HTTP_ONLY: list[tuple[str, Any, bool]] = [("seed", INT64_MAX + 1, False), ("top_k", INT32 + 1, False),
                                          ("max_tokens", 2 ** 32, False)]
REFUSED = [c for c in CASES + HTTP_ONLY if not c[2]]


def test_the_cases_cover_the_table() -> None:
    assert {name for name, _, _ in CASES} >= set(SAMPLING)


def http_body(name: str, value: Any, model: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "prompt": PROMPT, "max_tokens": 2, "stream": True}
    body[name] = value
    return body


def http_status(url: str, name: str, value: Any, model: str) -> int:
    with httpx.Client(timeout=30) as client, \
            client.stream("POST", url + "/v1/completions", json=http_body(name, value, model)) as reply:
        if reply.status_code == 200:
            events = [line for line in reply.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]"
            assert not any('"error"' in e for e in events), events  # a refusal never hides in a 200
        else:
            reply.read()
            assert reply.json()["error"]["type"], reply.text
        return reply.status_code


def grpc_code(address: str, name: str, value: Any, model: str) -> grpc.StatusCode:
    sampling = common_pb2.SamplingParams(max_tokens=2)
    if isinstance(value, list):
        getattr(sampling, name).extend(value)
    else:
        setattr(sampling, name, value)
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        # The gRPC API takes a text prompt: "a b c" is 3 tokens, as PROMPT, so the window cases are the same.
        try:
            for _ in stub.Generate(inference_pb2.GenerateRequest(model=model, prompt="a b c", sampling=sampling),
                                   timeout=30):
                pass
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def idle_mesh(model_dir, tokenizer_proc, tmp_path_factory):
    from tests.fixtures.mesh import build_sim_mesh

    mesh = build_sim_mesh(tmp_path_factory.mktemp("limits-idle"), model_dir, tokenizer_proc, workers=1,
                          sim_ttft_ms=0, sim_itl_ms=0, sim_prompt_token_ms=0, max_model_len=WINDOW,
                          max_num_seqs=32)
    yield mesh
    mesh.stop()


@pytest.mark.parametrize("name,value,accepted", CASES + HTTP_ONLY,
                         ids=[f"{n}={str(v)[:12]}" for n, v, _ in CASES + HTTP_ONLY])
def test_each_limit_on_an_idle_mesh(idle_mesh, name: str, value: Any, accepted: bool) -> None:
    status = http_status(idle_mesh.url, name, value, idle_mesh.model)
    assert status == (200 if accepted else 400), (name, value, status)
    if (name, value, accepted) in HTTP_ONLY:
        return
    code = grpc_code(idle_mesh.frontend.address, name, value, idle_mesh.model)
    assert code == (grpc.StatusCode.OK if accepted else grpc.StatusCode.INVALID_ARGUMENT), (name, value, code)


def test_refusals_are_the_same_on_a_saturated_mesh(sim_mesh_factory) -> None:
    mesh = sim_mesh_factory(workers=1, sim_itl_ms=100, max_model_len=WINDOW, max_num_seqs=2 * MAX_N,
                            scheduler={"queue_timeout": 1.0})
    stop = threading.Event()
    holding: list[int] = []

    def hold() -> None:  # n = MAX_N streams, twice: every sequence of the worker is taken
        body = {"model": mesh.model, "prompt": PROMPT, "max_tokens": WINDOW - len(PROMPT), "n": MAX_N,
                "stream": True, "ignore_eos": True}
        with httpx.Client(timeout=60) as client, client.stream("POST", mesh.url + "/v1/completions",
                                                               json=body) as reply:
            holding.append(reply.status_code)
            for _ in reply.iter_lines():
                if stop.is_set():
                    return
    threads = [threading.Thread(target=hold, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        until = time.monotonic() + 20
        while len(holding) < 2 and time.monotonic() < until:
            time.sleep(0.05)
        assert holding == [200, 200]
        # Saturated: a request that fits waits for a worker and runs out of queue time (429) ...
        assert http_status(mesh.url, "temperature", 1.0, mesh.model) == 429
        # ... while every request the worker would refuse is refused at once, as on an idle mesh.
        for name, value, _ in REFUSED:
            started = time.monotonic()
            assert http_status(mesh.url, name, value, mesh.model) == 400, (name, value)
            if (name, value, False) not in HTTP_ONLY:
                assert grpc_code(mesh.frontend.address, name, value, mesh.model) == \
                    grpc.StatusCode.INVALID_ARGUMENT, (name, value)
            assert time.monotonic() - started < 0.9, (name, value)  # not after waiting in the queue
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
