"""The simulated engine: a model's timing and capacity without a model.

For load, routing and failure tests of the mesh at scales no CPU can run a
model at. It is never the default and always says it is simulated.

- Time to first token: `ttft_ms` plus `prompt_token_ms` for every prompt token
  not found in the modelled prefix cache; then one token every `itl_ms`. Tokens
  that fall due while the consumer is slow are sent together in one delta, so
  a busy process keeps its token rate.
- At most `max_num_seqs` sequences run; more wait. The KV usage is the running
  sequences' tokens over `kv_capacity_tokens`.
- Output is a deterministic function of (seed, original prompt, position):
  greedy and seeded requests repeat exactly, and a resumed request continues
  exactly where the first one stopped. The ids are ordinary words of the served
  model's vocabulary (read from `tokenizer.json` when a model directory is
  given), so they detokenize as text. It never emits EOS; `stop_token_ids` end
  a choice as they would on a real model.
- An output constraint (`structured`: a schema, tool calls) is accepted, and
  acknowledged as the real worker does, but not enforced: the words are the
  same as without it. Structured outputs are tested on the real engine only.
- `fail_after_tokens` makes the engine die (for failure tests): in-flight
  streams fail with EngineDead and the worker exits non-zero. `fail_rate`
  fails that share of requests before their first token (an error of the
  request, the engine lives on): a bad model version, for canary tests.
- The embed task (`task="embed"`): each request is one batch, which takes
  `embed_ms` plus `prompt_token_ms` per input token; at most `max_num_seqs`
  batches run at once, more wait. Each input's vector is a deterministic unit
  vector of `embed_dim` numbers drawn from a hash of its token ids (the same
  ids give the same vector on every worker; any change gives another). Input
  tokens count towards `fail_after_tokens`: the batch that reaches it fails.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import random
import re
import struct
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infermesh.common.errors import EngineDead, InternalError
from infermesh.gpu_worker.engine import (
    Delta,
    EmbedRequest,
    Engine,
    EngineInfo,
    EngineLoad,
    GenerateRequest,
    TokenLogprobs,
)
from infermesh.gpu_worker.prefix_cache import PrefixCache

logger = logging.getLogger(__name__)

_WORD = re.compile(r"^[\u0120\u2581][a-z]{2,9}$")  # "Ġword" (byte-level BPE) or "▁word" (sentencepiece)
_PUNCT = (".", ",")


@dataclass
class SimOptions:
    ttft_ms: float = 50.0
    prompt_token_ms: float = 0.02
    itl_ms: float = 20.0
    max_num_seqs: int = 256
    kv_capacity_tokens: int = 1_048_576
    block_size: int = 16
    max_model_len: int = 0  # 0: the model's own (or 8192 without a model directory)
    # Failure injection: the engine dies after generating this many tokens in all (0: never).
    fail_after_tokens: int = 0
    # Failure injection: this share of requests fails before its first token (an engine error of that request
    # alone: the engine lives on), after the time to first token.
    fail_rate: float = 0.0
    # Start-up: like vLLM's, the engine knows its window, capacity and block size only once it has
    # started, which takes this long (a mesh whose workers are still loading).
    start_ms: float = 0.0
    task: str = "generate"  # or "embed"
    embed_dim: int = 0  # embed: the vectors' length (0: the model's hidden size, or 384 without a model)
    embed_ms: float = 20.0  # embed: the time of one batch (plus prompt_token_ms per input token)


@dataclass
class SimVocab:
    vocab_size: int
    max_model_len: int
    eos_token_ids: list[int]
    words: list[int]
    hidden_size: int = 384


def read_vocab(model_dir: Path | None) -> SimVocab:
    """Vocabulary size, context window, EOS ids and plain-word ids of a model directory."""
    if model_dir is None or not (model_dir / "tokenizer.json").is_file():
        return SimVocab(32_000, 8192, [2], list(range(1000, 9000)))
    tok = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab: Any = tok.get("model", {}).get("vocab", {}) or {}
    if isinstance(vocab, list):  # unigram models: [[piece, score], ...]
        vocab = {piece: i for i, (piece, _score) in enumerate(vocab)}
    special = {t["id"] for t in tok.get("added_tokens", []) if t.get("special")}
    words = sorted(i for piece, i in vocab.items() if _WORD.match(piece) and i not in special)
    words += [vocab[p] for p in _PUNCT if p in vocab]
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    size = max(int(config.get("vocab_size") or 0), max(vocab.values(), default=0) + 1)
    eos = config.get("eos_token_id", [])
    eos_ids = [eos] if isinstance(eos, int) else [e for e in eos if isinstance(e, int)]
    window = int(config.get("max_position_embeddings") or 8192)
    # A sentence-transformers model's own window (all-MiniLM-L6-v2: 256 of its 512 positions), as vLLM reads it.
    sbert = model_dir / "sentence_bert_config.json"
    if sbert.is_file():
        try:
            window = int(json.loads(sbert.read_text(encoding="utf-8")).get("max_seq_length") or window)
        except (OSError, ValueError):
            pass
    return SimVocab(size, window, eos_ids, words or list(range(min(1000, size), size)),
                    hidden_size=int(config.get("hidden_size") or 384))


class _Seq:
    __slots__ = ("aborted", "request", "tokens")

    def __init__(self, request: GenerateRequest) -> None:
        self.request = request
        self.aborted = False
        self.tokens = len(request.prompt_ids)


class SimEngine(Engine):
    def __init__(self, model: str, model_dir: Path | None, options: SimOptions) -> None:
        self.options = options
        self.vocab = read_vocab(model_dir)
        window = options.max_model_len or self.vocab.max_model_len
        embedding_dim = (options.embed_dim or self.vocab.hidden_size) if options.task == "embed" else 0
        self._started_info = EngineInfo(engine="sim", model=model, max_model_len=window,
                                        vocab_size=self.vocab.vocab_size, max_num_seqs=options.max_num_seqs,
                                        kv_capacity_tokens=options.kv_capacity_tokens,
                                        block_size=options.block_size, eos_token_ids=self.vocab.eos_token_ids,
                                        simulated=True, version="sim", task=options.task,
                                        embedding_dim=embedding_dim)
        self.info = self._started_info if not options.start_ms else EngineInfo(
            engine="sim", model=model, max_model_len=0, vocab_size=0, max_num_seqs=0, kv_capacity_tokens=0,
            block_size=0, simulated=True, version="sim", task=options.task)
        self.cache = PrefixCache(options.kv_capacity_tokens // options.block_size,
                                 block_size=options.block_size)
        self._seqs: dict[str, _Seq] = {}
        self._running = 0
        self._waiting = 0
        self._slot_freed = asyncio.Condition()
        self._generated = 0
        self._dead = False

    async def start(self) -> None:
        if self.options.start_ms:
            await asyncio.sleep(self.options.start_ms / 1000)
            self.info = self._started_info
        logger.info("simulated engine: ttft %.0f ms + %.3f ms/prompt token, itl %.0f ms, %d seqs, "
                    "%d KV tokens", self.options.ttft_ms, self.options.prompt_token_ms,
                    self.options.itl_ms, self.options.max_num_seqs, self.options.kv_capacity_tokens)

    def healthy(self) -> bool:
        return not self._dead

    def load(self) -> EngineLoad:
        used = sum(s.tokens * s.request.n for s in self._seqs.values() if not s.aborted)
        cap = self.options.kv_capacity_tokens
        return EngineLoad(running=self._running, waiting=self._waiting,
                          kv_cache_usage=min(1.0, used / cap) if cap else 0.0,
                          prefix_cache_hit_rate=self.cache.hit_rate())

    async def abort(self, request_id: str) -> bool:
        seq = self._seqs.get(request_id)
        if seq is None:
            return False
        seq.aborted = True
        return True

    async def _admit(self, n: int) -> None:
        self._waiting += n
        try:
            async with self._slot_freed:
                await self._slot_freed.wait_for(lambda: self._running + n <= self.options.max_num_seqs
                                                or self._running == 0)
                self._running += n
        finally:
            self._waiting -= n

    async def _release(self, n: int) -> None:
        self._running -= n
        async with self._slot_freed:
            self._slot_freed.notify_all()

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[Delta, None]:
        if self._dead:
            raise EngineDead("the simulated engine has failed")
        seq = _Seq(request)
        self._seqs[request.request_id] = seq
        admitted = False
        try:
            await self._admit(request.n)
            admitted = True
            async for delta in self._run(seq):
                yield delta
        finally:
            self._seqs.pop(request.request_id, None)
            if admitted:
                await self._release(request.n)

    async def embed(self, request: EmbedRequest) -> list[list[float]]:
        if self._dead:
            raise EngineDead("the simulated engine has failed")
        await self._admit(1)
        try:
            await asyncio.sleep((self.options.embed_ms + self.options.prompt_token_ms * request.tokens) / 1000)
            if self._dead:
                raise EngineDead("the simulated engine has failed")
            self._generated += request.tokens
            if self.options.fail_after_tokens and self._generated >= self.options.fail_after_tokens:
                self._dead = True
                logger.error("simulated engine failure after %d tokens", self._generated)
                raise EngineDead("the simulated engine has failed")
            return [sim_vector(ids, self.info.embedding_dim) for ids in request.inputs]
        finally:
            await self._release(1)

    async def _run(self, seq: _Seq) -> AsyncIterator[Delta]:
        req = seq.request
        loop = asyncio.get_running_loop()
        cached = self.cache.lookup_and_insert(req.prompt_ids)
        prefill = (self.options.ttft_ms + self.options.prompt_token_ms * (len(req.prompt_ids) - cached)) / 1000
        itl = self.options.itl_ms / 1000
        first_at = loop.time() + prefill
        original = req.prompt_ids[:len(req.prompt_ids) - req.resumed_tokens]
        salt = req.seed if (req.seed is not None or req.temperature == 0) else random.getrandbits(63)
        bases = [hash((salt or 0, hash(tuple(original)), i)) for i in range(req.n)]
        open_choices = list(range(req.n))
        emitted = 0
        if self.options.fail_rate and random.random() < self.options.fail_rate:
            await asyncio.sleep(max(0.0, first_at - loop.time()))
            raise InternalError("simulated request failure (the engine's --sim-fail-rate)")
        while open_choices:
            due_at = first_at + emitted * itl
            delay = due_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if self._dead:
                raise EngineDead("the simulated engine has failed")
            if seq.aborted:
                for i in open_choices:
                    yield Delta(index=i, token_ids=[], finish_reason="abort", cached_tokens=cached)
                return
            due = min(req.max_tokens, int((loop.time() - first_at) / itl) + 1) if itl > 0 else req.max_tokens
            due = max(due, emitted + 1)
            for i in list(open_choices):
                delta = self._tokens(req, bases[i], i, emitted, due)
                delta.cached_tokens = cached
                if delta.finish_reason is not None:
                    open_choices.remove(i)
                yield delta
            seq.tokens = len(req.prompt_ids) + due
            self._generated += due - emitted
            if self.options.fail_after_tokens and self._generated >= self.options.fail_after_tokens:
                self._dead = True
                logger.error("simulated engine failure after %d tokens", self._generated)
            emitted = due

    def _tokens(self, req: GenerateRequest, base: int, index: int, start: int, end: int) -> Delta:
        words = self.vocab.words
        ids: list[int] = []
        logprobs: list[TokenLogprobs] | None = [] if req.logprobs is not None else None
        finish: str | None = None
        stop_id: int | None = None
        for pos in range(start, end):
            h = hash((base, req.resumed_tokens + pos)) & 0xFFFFFFFF
            tid = words[h % len(words)]
            ids.append(tid)
            if logprobs is not None:
                lp = -((h >> 8) % 3000) / 1000.0
                top = [(tid, lp)] + [(words[(h + k * 7919) % len(words)], lp - k) for k in range(1, req.logprobs or 0)]
                logprobs.append(TokenLogprobs(tid, lp, top[:req.logprobs]))
            generated = req.resumed_tokens + pos + 1
            if tid in req.stop_token_ids and generated > req.min_tokens:
                finish, stop_id = "stop", tid
                break
        if finish is None and end >= req.max_tokens:
            finish = "length"
        return Delta(index=index, token_ids=ids, logprobs=logprobs, finish_reason=finish, stop_token_id=stop_id)


def sim_vector(ids: list[int], dim: int) -> list[float]:
    """A unit vector of `dim` numbers drawn from a hash of the token ids (the same ids, the same vector)."""
    digest = hashlib.blake2b(struct.pack(f"<{len(ids)}I", *ids), digest_size=8).digest()
    rng = random.Random(int.from_bytes(digest, "little"))
    values = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]
