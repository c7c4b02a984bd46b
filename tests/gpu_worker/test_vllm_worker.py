"""The worker on the real vLLM engine and the default model (one shared process: `real_worker`)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from infermesh.v1 import worker_pb2
from tokenizers import Tokenizer

from tests.gpu_worker.helpers import eventually, generate, metric, request, stub

pytestmark = pytest.mark.engine

TEXTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain what a CPU does in one sentence.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 12?",
    "Name a famous painter.",
    "Why is the sky blue?",
]
PARITY_TOKENS = 16


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def chat_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n",
                            add_special_tokens=False).ids


@pytest.fixture(scope="module")
def prompts(tokenizer: Tokenizer) -> list[list[int]]:
    return [chat_ids(tokenizer, t) for t in TEXTS]


@pytest.fixture(scope="module")
def offline_ids(model_dir: Path, prompts: list[list[int]], tmp_path_factory: pytest.TempPathFactory) -> list[list[int]]:
    """vLLM's offline greedy ids, from a separate process with the real worker's engine settings."""
    work = tmp_path_factory.mktemp("offline")
    spec = {"prompts": prompts, "max_tokens": PARITY_TOKENS,
            "engine": {"enforce_eager": True, "max_num_seqs": 64, "enable_prefix_caching": True}}
    (work / "in.json").write_text(json.dumps(spec))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"}
    done = subprocess.run([sys.executable, "-m", "tests.gpu_worker.offline_greedy", str(model_dir),
                           str(work / "in.json"), str(work / "out.json")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((work / "out.json").read_text())


@pytest.fixture
async def worker(real_worker):
    channel, client = stub(real_worker.address)
    async with channel:
        yield client


async def test_greedy_parity_with_offline_vllm(offline_ids, real_worker, prompts) -> None:
    channel, worker = stub(real_worker.address)
    async with channel:
        for ids, expected in zip(prompts, offline_ids, strict=True):
            result = await generate(worker, ids, max_tokens=PARITY_TOKENS, temperature=0)
            assert result.ids == expected
            assert result.prompt_tokens == len(ids)
            assert result.finish == ("length" if len(expected) == PARITY_TOKENS else "stop")


async def test_info_and_load_report(worker, real_worker) -> None:
    info = await worker.Info(worker_pb2.InfoRequest())
    assert (info.engine, info.simulated, info.model) == ("vllm", False, real_worker.model)
    assert info.max_model_len == 8192 and info.max_num_seqs == 64 and info.kv_capacity_tokens > 10_000
    report = await worker.WatchLoad(worker_pb2.WatchLoadRequest(watcher="t")).read()
    assert report.kv_capacity_tokens == info.kv_capacity_tokens and report.max_model_len == 8192
    assert report.seq >= 1 and not report.draining


async def test_eos_and_max_tokens(worker, tokenizer) -> None:
    answer = await generate(worker, chat_ids(tokenizer, TEXTS[0]), max_tokens=40, temperature=0)
    assert tokenizer.decode(answer.ids, skip_special_tokens=True).strip() == "The capital of France is Paris."
    assert (answer.finish, answer.choices[0].stop_token_id, answer.ids[-1]) == ("stop", 2, 2)
    capped = await generate(worker, chat_ids(tokenizer, TEXTS[0]), max_tokens=3, temperature=0)
    assert (capped.ids, capped.finish) == (answer.ids[:3], "length")
    past_eos = await generate(worker, chat_ids(tokenizer, TEXTS[0]), max_tokens=12, temperature=0, ignore_eos=True)
    assert len(past_eos.ids) == 12 and past_eos.finish == "length"


async def test_stop_token_ids(worker, prompts) -> None:
    full = await generate(worker, prompts[1], max_tokens=10, temperature=0, ignore_eos=True)
    stop = full.ids[4]
    stopped = await generate(worker, prompts[1], max_tokens=10, temperature=0, stop_token_ids=[stop])
    assert stopped.ids == full.ids[:full.ids.index(stop) + 1]
    assert (stopped.finish, stopped.choices[0].stop_token_id) == ("stop", stop)


async def test_resume_continues_like_one_run(worker, prompts) -> None:
    whole = await generate(worker, prompts[2], max_tokens=12, temperature=0, ignore_eos=True)
    resumed = await generate(worker, prompts[2], generated=whole.ids[:5], max_tokens=12, temperature=0,
                             ignore_eos=True)
    assert resumed.ids == whole.ids[5:] and resumed.finish == "length"
    assert resumed.prompt_tokens == len(prompts[2])


async def test_seed_reproducible_at_temperature_one(worker, prompts) -> None:
    runs = [await generate(worker, prompts[3], max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)
            for _ in range(2)]
    assert runs[0].ids == runs[1].ids
    others = [await generate(worker, prompts[3], max_tokens=12, temperature=1.0, seed=s, ignore_eos=True)
              for s in (1, 2, 3)]
    assert any(o.ids != runs[0].ids for o in others)


async def test_n_and_logprobs(worker, prompts) -> None:
    result = await generate(worker, prompts[4], max_tokens=4, temperature=1.0, seed=7, n=2, logprobs=3,
                            ignore_eos=True)
    assert sorted(result.choices) == [0, 1]
    for choice in result.choices.values():
        assert len(choice.token_ids) == 4 and choice.finish_reason == "length"
        assert [lp.token_id for lp in choice.logprobs] == choice.token_ids
        assert all(len(lp.top) == 3 and lp.logprob <= 0 for lp in choice.logprobs)


async def test_32_concurrent_streams(worker, prompts) -> None:
    results = await asyncio.gather(*[
        generate(worker, prompts[i % 8] + [100 + i], max_tokens=8, ignore_eos=True, seed=i) for i in range(32)])
    assert all(len(r.ids) == 8 and r.finish == "length" for r in results)


async def test_cancel_frees_the_engine(worker, real_worker, prompts) -> None:
    calls = [worker.Generate(request(prompts[i] + [7] * i, max_tokens=500, ignore_eos=True)) for i in range(8)]
    for call in calls:
        assert (await call.read()).token_ids
    text = real_worker.metrics_text()
    assert metric(text, "vllm:num_requests_running") + metric(text, "vllm:num_requests_waiting") >= 1
    for call in calls:
        call.cancel()

    def idle() -> bool:
        text = real_worker.metrics_text()
        return metric(text, "vllm:num_requests_running") + metric(text, "vllm:num_requests_waiting") == 0

    assert await eventually(idle, 2.0)
    after = await generate(worker, prompts[0], max_tokens=3, temperature=0)
    assert len(after.ids) == 3


BAD_INPUT = [
    ({"prompt": []}, grpc.StatusCode.INVALID_ARGUMENT, "prompt_ids must not be empty"),
    ({"prompt": [49152]}, grpc.StatusCode.INVALID_ARGUMENT, "outside the vocabulary"),
    ({"prompt": [1] * 9000}, grpc.StatusCode.INVALID_ARGUMENT, "maximum context length"),
    ({"max_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens must be in [1, "),
    ({"max_tokens": 10**9}, grpc.StatusCode.INVALID_ARGUMENT, "maximum context length"),
    ({"top_p": 2.0}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    ({"model": "no-such-model"}, grpc.StatusCode.NOT_FOUND, "no-such-model"),
]


async def test_bad_input_is_refused_and_the_worker_keeps_serving(worker, prompts) -> None:
    for case, code, words in BAD_INPUT:
        case = dict(case)
        prompt = case.pop("prompt", prompts[0])
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(worker, prompt, **case)
        assert err.value.code() == code and words in err.value.details(), case
    assert len((await generate(worker, prompts[0], max_tokens=2)).ids) == 2


async def test_metrics_under_vllm_names(worker, real_worker, prompts) -> None:
    before = real_worker.metrics_text()
    await generate(worker, prompts[5], max_tokens=5, ignore_eos=True)
    after = real_worker.metrics_text()
    assert metric(after, "vllm:generation_tokens_total") - metric(before, "vllm:generation_tokens_total") == 5
    assert metric(after, "vllm:prompt_tokens_total") - metric(before, "vllm:prompt_tokens_total") == len(prompts[5])
    assert metric(after, "vllm:request_success_total") - metric(before, "vllm:request_success_total") == 1
    for name in ("vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
                 "vllm:e2e_request_latency_seconds_count", "vllm:kv_cache_usage_perc"):
        metric(after, name)


async def test_abort_rpc_ends_the_stream_with_abort(worker, prompts) -> None:
    call = worker.Generate(request(prompts[6], max_tokens=500, ignore_eos=True, request_id="abort-me"))
    assert (await call.read()).token_ids
    assert (await worker.Abort(worker_pb2.AbortRequest(request_id="abort-me"))).found
    last = await asyncio.wait_for(call.read(), 5.0)
    while last.finish_reason == "":
        last = await asyncio.wait_for(call.read(), 5.0)
    assert last.finish_reason == "abort" and await call.read() == grpc.aio.EOF


def test_serving_threads_stay_off_the_models_cores(real_worker) -> None:
    """--cpus auto: the worker and the engine's unbound processes run where vLLM's model threads do not."""
    from infermesh.common import cpus

    pid = real_worker.proc.proc.pid
    machine = cpus.allowed()
    tree = [pid, *cpus.descendants(pid)]
    affinity = {p: set(os.sched_getaffinity(p)) for p in tree}
    model = set().union(*(a for a in affinity.values() if a < machine))
    assert model, f"vLLM bound no process to some of the cores: {affinity}"
    if model == machine:  # one core: nowhere else to go
        return
    for p in tree:
        for task in Path(f"/proc/{p}/task").iterdir():
            threads = set(os.sched_getaffinity(int(task.name)))
            assert threads <= model or not threads & model, f"pid {p} thread {task.name} on {threads}, model {model}"
    serving = affinity[pid]
    assert serving == machine - model
    assert [p for p in tree if affinity[p] == serving], "the worker itself was not moved"
    assert len([p for p in tree if affinity[p] == serving]) >= 2, "the engine's own loop was not moved"
