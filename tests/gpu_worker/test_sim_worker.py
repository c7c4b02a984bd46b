"""A simulated worker process over gRPC: capacity, load reports, leases, errors, metrics, drain."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import pytest
from infermesh.v1 import worker_pb2

from tests.gpu_worker.helpers import eventually, generate, metric, metrics_text, request, stub

MODEL = "SmolLM2-135M-Instruct"


async def test_info_says_simulated(sim_worker_factory) -> None:
    proc = sim_worker_factory(worker_id="sim-a", max_num_seqs=7, sim_kv_capacity_tokens=5000)
    channel, worker = stub(proc.address)
    async with channel:
        info = await worker.Info(worker_pb2.InfoRequest())
    assert (info.engine, info.simulated, info.model, info.worker_id) == ("sim", True, MODEL, "sim-a")
    assert (info.max_num_seqs, info.kv_capacity_tokens, info.block_size, info.max_model_len) == (7, 5000, 16, 8192)


async def test_timings_over_grpc(sim_worker_factory) -> None:
    proc = sim_worker_factory(sim_ttft_ms=40, sim_prompt_token_ms=0.1, sim_itl_ms=15)
    channel, worker = stub(proc.address)
    async with channel:
        await generate(worker, [1, 2], max_tokens=2)  # connection warm-up
        result = await generate(worker, list(range(1000, 1300)), max_tokens=21, temperature=0)
    gaps = [b - a for a, b in zip(result.choices[0].times, result.choices[0].times[1:], strict=False)]
    assert len(result.ids) == 21 and result.finish == "length" and result.prompt_tokens == 300
    assert 0.070 <= result.ttft <= 0.110  # 40 ms + 300 * 0.1 ms
    assert 0.012 <= sum(gaps) / len(gaps) <= 0.020


async def test_prefix_cache_hits_shorten_ttft_and_show_in_load(sim_worker_factory) -> None:
    proc = sim_worker_factory(sim_ttft_ms=10, sim_prompt_token_ms=0.5, sim_itl_ms=5)
    prompt = list(range(2000, 2200))  # 200 tokens: 12 full blocks of 16
    channel, worker = stub(proc.address)
    async with channel:
        cold = await generate(worker, prompt, max_tokens=2)
        warm = await generate(worker, prompt + [7, 7, 7], max_tokens=2)
        report = await worker.WatchLoad(worker_pb2.WatchLoadRequest(watcher="t")).read()
    assert (cold.cached_tokens, warm.cached_tokens) == (0, 192)
    assert cold.ttft >= 0.105 and warm.ttft <= 0.045
    assert report.prefix_cache_hit_rate == pytest.approx(192 / 403, abs=1e-3)


async def test_refuses_beyond_sequences_and_kv_capacity(sim_worker_factory) -> None:
    proc = sim_worker_factory(max_num_seqs=2, sim_kv_capacity_tokens=1000, sim_itl_ms=50)
    channel, worker = stub(proc.address)
    async with channel:
        long = [asyncio.ensure_future(generate(worker, [1] * 10, max_tokens=20)) for _ in range(2)]
        await asyncio.sleep(0.2)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await generate(worker, [1] * 10, max_tokens=5)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 of 2 sequences" in refused.value.details()
        assert dict(refused.value.trailing_metadata()).get("retry-after-ms") == "200"
        await asyncio.gather(*long)
        with pytest.raises(grpc.aio.AioRpcError) as too_big:
            await generate(worker, [1] * 10, max_tokens=991)
        assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "KV tokens" in too_big.value.details()
        assert (await generate(worker, [1] * 10, max_tokens=3)).finish == "length"


BAD_INPUT = [
    ({"prompt": []}, grpc.StatusCode.INVALID_ARGUMENT, "prompt_ids must not be empty"),
    ({"prompt": [49152]}, grpc.StatusCode.INVALID_ARGUMENT, "outside the vocabulary"),
    ({"prompt": [1] * 8192}, grpc.StatusCode.INVALID_ARGUMENT, "maximum context length"),
    ({"max_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens must be in [1, "),
    ({"max_tokens": 4_000_000_000}, grpc.StatusCode.INVALID_ARGUMENT, "maximum context length"),
    ({"temperature": 1e9}, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ({"temperature": -1.0}, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ({"top_p": 0.0}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    ({"n": 1000}, grpc.StatusCode.INVALID_ARGUMENT, "n must be"),
    ({"logprobs": 500}, grpc.StatusCode.INVALID_ARGUMENT, "logprobs"),
    ({"stop_token_ids": [10**6]}, grpc.StatusCode.INVALID_ARGUMENT, "stop_token_ids"),
    ({"generated": [5, 5], "max_tokens": 2}, grpc.StatusCode.INVALID_ARGUMENT, "generated_ids"),
    ({"model": "no-such-model"}, grpc.StatusCode.NOT_FOUND, "no-such-model"),
]


async def test_bad_input_is_refused_clearly_and_the_worker_keeps_serving(sim_worker_factory) -> None:
    proc = sim_worker_factory()
    channel, worker = stub(proc.address)
    async with channel:
        for case, code, words in BAD_INPUT:
            case = dict(case)
            prompt = case.pop("prompt", [1, 2, 3])
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await generate(worker, prompt, **case)
            assert err.value.code() == code and words in err.value.details(), (case, err.value.details())
        ok = await generate(worker, [1, 2, 3], model=MODEL, max_tokens=2)
    assert ok.finish == "length" and len(ok.ids) == 2


async def test_n_choices_logprobs_and_stop_ids_over_grpc(sim_worker_factory) -> None:
    proc = sim_worker_factory(sim_itl_ms=2, sim_ttft_ms=1)
    channel, worker = stub(proc.address)
    async with channel:
        many = await generate(worker, [4, 5, 6], max_tokens=5, n=3, seed=3, logprobs=2)
        first = await generate(worker, [4, 5, 6], max_tokens=10, temperature=0)
        stopped = await generate(worker, [4, 5, 6], max_tokens=10, temperature=0, stop_token_ids=[first.ids[2]])
    assert sorted(many.choices) == [0, 1, 2]
    for choice in many.choices.values():
        assert len(choice.token_ids) == 5 and choice.finish_reason == "length"
        assert [lp.token_id for lp in choice.logprobs] == choice.token_ids
        assert all(len(lp.top) == 2 and lp.logprob <= 0 for lp in choice.logprobs)
    stop_at = first.ids.index(first.ids[2])
    assert stopped.ids == first.ids[:stop_at + 1]
    assert (stopped.finish, stopped.choices[0].stop_token_id) == ("stop", first.ids[2])


async def test_watch_load_reports_leases_and_committed_tokens(sim_worker_factory) -> None:
    proc = sim_worker_factory(sim_itl_ms=20, worker_id="w1")
    channel, worker = stub(proc.address)
    async with channel:
        reports = worker.WatchLoad(worker_pb2.WatchLoadRequest(watcher="test", interval_ms=5000))
        t0 = time.perf_counter()
        first = await reports.read()
        assert time.perf_counter() - t0 < 1.0
        assert (first.worker_id, first.model, first.running, first.committed_tokens, first.draining) == \
            ("w1", MODEL, 0, 0, False)
        assert (first.max_num_seqs, first.kv_capacity_tokens, first.max_model_len) == (256, 1_048_576, 8192)
        task = asyncio.ensure_future(generate(worker, [1] * 30, max_tokens=10, lease_id="lease-1"))
        started = await asyncio.wait_for(reports.read(), 2.0)  # at once, not after the 5 s interval
        assert list(started.leases_started) == ["lease-1"] and list(started.leases_active) == ["lease-1"]
        assert started.committed_tokens == 40 and started.seq > first.seq
        await task
        finished = await asyncio.wait_for(reports.read(), 2.0)
        while not finished.leases_finished:
            finished = await asyncio.wait_for(reports.read(), 2.0)
        assert list(finished.leases_finished) == ["lease-1"] and not finished.leases_active
        assert finished.committed_tokens == 0 and finished.running == 0
        periodic = worker.WatchLoad(worker_pb2.WatchLoadRequest(watcher="fast", interval_ms=50))
        t0 = time.perf_counter()
        for _ in range(5):
            await periodic.read()
        assert 0.15 <= time.perf_counter() - t0 <= 1.0
        periodic.cancel()
        reports.cancel()


async def test_cancel_and_abort_free_the_engine(sim_worker_factory) -> None:
    proc = sim_worker_factory(sim_itl_ms=10)
    channel, worker = stub(proc.address)
    async with channel:
        reports = worker.WatchLoad(worker_pb2.WatchLoadRequest(watcher="t", interval_ms=50))
        calls = [worker.Generate(request([1, 2, 3], max_tokens=1000, lease_id=f"c{i}")) for i in range(8)]
        for call in calls:
            await call.read()
        text = metrics_text(proc.metrics_port)
        assert metric(text, "vllm:num_requests_running") == 8
        for call in calls:
            call.cancel()
        assert await eventually(lambda: metric(metrics_text(proc.metrics_port), "vllm:num_requests_running")
                                + metric(metrics_text(proc.metrics_port), "vllm:num_requests_waiting") == 0, 2.0)
        finished: set[str] = set()
        while len(finished) < 8:
            finished |= set((await asyncio.wait_for(reports.read(), 2.0)).leases_finished)
        assert finished == {f"c{i}" for i in range(8)}
        aborted = worker.Generate(request([1, 2, 3], max_tokens=1000, request_id="to-abort"))
        await aborted.read()
        assert (await worker.Abort(worker_pb2.AbortRequest(request_id="to-abort"))).found
        last = await aborted.read()
        while last.finish_reason == "":
            last = await aborted.read()
        assert last.finish_reason == "abort" and await aborted.read() == grpc.aio.EOF
        assert not (await worker.Abort(worker_pb2.AbortRequest(request_id="to-abort"))).found
        reports.cancel()


async def test_metrics_use_vllm_names(sim_worker_factory) -> None:
    proc = sim_worker_factory(sim_itl_ms=2, sim_ttft_ms=1)
    channel, worker = stub(proc.address)
    async with channel:
        results = [await generate(worker, list(range(10, 30)), max_tokens=6) for _ in range(3)]
    # One inter-token sample per token after the first message (a late event loop may send a
    # few tokens in one message: they share its gap, as in vLLM).
    inter_token = sum(sum(c.sizes[1:]) for r in results for c in r.choices.values())
    assert inter_token >= 3  # each request streamed more than one message
    text = metrics_text(proc.metrics_port)
    assert metric(text, "vllm:prompt_tokens_total") == 60
    assert metric(text, "vllm:generation_tokens_total") == 18
    assert metric(text, "vllm:request_success_total") == 3
    assert metric(text, "vllm:time_to_first_token_seconds_count") == 3
    assert metric(text, "vllm:inter_token_latency_seconds_count") == inter_token
    assert metric(text, "vllm:e2e_request_latency_seconds_count") == 3
    assert 'vllm:kv_cache_usage_perc{model_name="SmolLM2-135M-Instruct"}' in text


async def test_sigterm_drains_in_flight_and_refuses_new_work(sim_worker_factory) -> None:
    proc = sim_worker_factory(sim_itl_ms=20, grace_period=20)
    channel, worker = stub(proc.address)
    async with channel:
        reports = worker.WatchLoad(worker_pb2.WatchLoadRequest(watcher="t", interval_ms=1000))
        await reports.read()
        in_flight = asyncio.ensure_future(generate(worker, [1, 2, 3], max_tokens=60))  # ~1.2 s
        await asyncio.sleep(0.2)
        proc.signal(signal.SIGTERM)
        draining = await asyncio.wait_for(reports.read(), 2.0)
        assert draining.draining
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await generate(worker, [1, 2, 3], max_tokens=2)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in refused.value.details()
        result = await in_flight
        assert len(result.ids) == 60 and result.finish == "length"
        assert await asyncio.to_thread(proc.wait, 10) == 0


async def test_engine_failure_turns_not_serving_and_exits_non_zero(sim_worker_factory) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    proc = sim_worker_factory(sim_fail_after_tokens=20, sim_itl_ms=5)
    channel, worker = stub(proc.address)
    async with channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await generate(worker, [1, 2, 3], max_tokens=100)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE and "failed" in failed.value.details()
    assert await asyncio.to_thread(proc.wait, 10) == 1
    assert "the engine has failed; the worker stops" in proc.log()
