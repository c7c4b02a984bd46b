"""The simulated engine and its prefix cache, in process (no gRPC)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from infermesh.gpu_worker.engine import GenerateRequest
from infermesh.gpu_worker.prefix_cache import PrefixCache
from infermesh.gpu_worker.sim_engine import SimEngine, SimOptions
from tokenizers import Tokenizer


def engine(model_dir: Path | None, **options: object) -> SimEngine:
    return SimEngine("m", model_dir, SimOptions(**options))  # type: ignore[arg-type]


async def run(eng: SimEngine, req: GenerateRequest) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    async for d in eng.generate(req):
        out.setdefault(d.index, []).extend(d.token_ids)
    return out


def test_prefix_cache_counts_leading_full_blocks_and_evicts_lru() -> None:
    cache = PrefixCache(capacity_blocks=4, block_size=4)
    a = list(range(10))  # two full blocks
    assert cache.lookup_and_insert(a) == 0
    assert cache.lookup_and_insert(a) == 8
    assert cache.lookup_and_insert(a[:4] + [99] * 6) == 4  # shares the first block only
    assert cache.hit_rate() == pytest.approx(12 / 30)
    cache.lookup_and_insert(list(range(100, 116)))  # four new blocks push out everything older
    assert len(cache) == 4
    assert cache.lookup_and_insert(a) == 0


def test_prefix_cache_evicts_a_prompts_tail_before_its_head() -> None:
    # Room for 4 blocks; an older prompt of 3 blocks and a newer one of 2 do not both fit.
    cache = PrefixCache(capacity_blocks=4, block_size=4)
    older = list(range(12)) + [7]  # three full blocks
    assert cache.lookup_and_insert(older) == 0
    assert cache.lookup_and_insert(list(range(100, 108))) == 0  # two new blocks: one of older's must go
    assert len(cache) == 4
    # Its last block went (as in vLLM): the first two still serve it. An LRU taking the head first would
    # leave blocks 2 and 3 cached and useless, and this lookup would find nothing.
    assert cache.lookup_and_insert(older) == 8
    # A prompt longer than the whole cache keeps its head too.
    long = list(range(500, 524))  # six blocks
    cache.lookup_and_insert(long)
    assert cache.lookup_and_insert(long) == 16


def test_whole_prompt_cached_still_computes_last_token() -> None:
    cache = PrefixCache(capacity_blocks=8, block_size=4)
    cache.lookup_and_insert(list(range(8)))
    assert cache.lookup_and_insert(list(range(8))) == 7


async def test_output_is_words_of_the_model_vocabulary(model_dir: Path) -> None:
    eng = engine(model_dir, ttft_ms=0, itl_ms=0)
    out = await run(eng, GenerateRequest("r", [1, 2, 3], max_tokens=40, temperature=0))
    text = Tokenizer.from_file(str(model_dir / "tokenizer.json")).decode(out[0])
    words = text.split()
    assert len(words) >= 20 and all(w.strip(".,").isalpha() for w in words), text
    assert eng.info.vocab_size == 49152 and eng.info.max_model_len == 8192 and eng.info.simulated


async def test_deterministic_for_seed_and_greedy_and_resume(model_dir: Path) -> None:
    eng = engine(model_dir, ttft_ms=0, itl_ms=0)
    prompt = [5, 6, 7, 8]
    seeded = [await run(eng, GenerateRequest(f"s{i}", prompt, 12, seed=7)) for i in range(2)]
    assert seeded[0] == seeded[1]
    other = await run(eng, GenerateRequest("o", prompt, 12, seed=8))
    assert other != seeded[0]
    greedy = (await run(eng, GenerateRequest("g", prompt, 12, temperature=0)))[0]
    resumed = (await run(eng, GenerateRequest("r", prompt + greedy[:5], 7, temperature=0,
                                              resumed_tokens=5)))[0]
    assert resumed == greedy[5:]
    choices = await run(eng, GenerateRequest("n", prompt, 6, n=3, seed=1))
    assert sorted(choices) == [0, 1, 2] and len({tuple(c) for c in choices.values()}) == 3


async def test_stop_token_ids_respect_min_tokens(model_dir: Path) -> None:
    eng = engine(model_dir, ttft_ms=0, itl_ms=0)
    ids = (await run(eng, GenerateRequest("a", [9, 9], 30, temperature=0)))[0]
    stop = ids[3]
    deltas = [d async for d in eng.generate(GenerateRequest("b", [9, 9], 30, temperature=0, stop_token_ids=[stop]))]
    assert deltas[-1].finish_reason == "stop" and deltas[-1].stop_token_id == stop
    assert [t for d in deltas for t in d.token_ids] == ids[:ids.index(stop) + 1]
    later = [d async for d in eng.generate(GenerateRequest("c", [9, 9], 30, temperature=0, stop_token_ids=[stop],
                                                          min_tokens=ids.index(stop) + 1))]
    assert sum(len(d.token_ids) for d in later) > ids.index(stop) + 1


async def test_timing_and_prefix_hits_shorten_prefill(model_dir: Path) -> None:
    eng = engine(model_dir, ttft_ms=30, prompt_token_ms=0.2, itl_ms=10)
    prompt = list(range(1000, 1512))  # 512 tokens: 30 + 102 ms of prefill when uncached

    async def timed() -> tuple[float, float]:
        t0 = time.perf_counter()
        stamps = []
        async for _ in eng.generate(GenerateRequest(str(t0), prompt, 11, temperature=0)):
            stamps.append(time.perf_counter())
        return stamps[0] - t0, (stamps[-1] - stamps[0]) / 10

    cold_ttft, itl = await timed()
    warm_ttft, _ = await timed()
    assert 0.125 <= cold_ttft <= 0.20
    assert 0.030 <= warm_ttft <= 0.06  # 511 cached: 30 ms + 0.2 ms
    assert 0.009 <= itl <= 0.014
    assert eng.load().prefix_cache_hit_rate == pytest.approx(511 / 1024, abs=1e-6)


async def test_abort_and_load(model_dir: Path) -> None:
    eng = engine(model_dir, ttft_ms=0, itl_ms=10, max_num_seqs=2)
    stream = eng.generate(GenerateRequest("x", [1] * 10, 1000, n=2))
    first = await stream.__anext__()
    assert eng.load().running == 2 and 0 < eng.load().kv_cache_usage < 1
    assert await eng.abort("x") and not await eng.abort("nope")
    rest = [d async for d in stream]
    assert first.finish_reason is None and {d.finish_reason for d in rest if d.finish_reason} == {"abort"}
    assert eng.load().running == 0


async def test_sequences_beyond_capacity_wait(model_dir: Path) -> None:
    eng = engine(model_dir, ttft_ms=0, itl_ms=5, max_num_seqs=1)
    a = asyncio.ensure_future(run(eng, GenerateRequest("a", [1], 20)))
    b = asyncio.ensure_future(run(eng, GenerateRequest("b", [2], 20)))
    await asyncio.sleep(0.03)
    assert (eng.load().running, eng.load().waiting) == (1, 1)
    await asyncio.gather(a, b)
    assert (eng.load().running, eng.load().waiting) == (0, 0)
