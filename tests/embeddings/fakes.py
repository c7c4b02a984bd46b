"""In-process fakes of the tiers behind the embeddings' request path (`EmbedBackends`).

`FakeEmbedBackends` encodes with all-MiniLM-L6-v2's real tokenizer (as the
tokenizer service does: special tokens, no padding or truncation), answers
Admit from a script of worker addresses and refusals, and each worker's Embed
from a script of replies (vectors made by `sim_vector`) or errors. Everything
the path asks for is recorded.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from infermesh.common.errors import InfermeshError
from infermesh.frontend.request.detokenizer import TokenizerModel
from infermesh.frontend.request.interfaces import ModelFacts
from infermesh.gpu_worker.sim_engine import sim_vector
from infermesh.v1 import common_pb2, scheduler_pb2, tokenizer_pb2, worker_pb2
from tokenizers import Tokenizer

from tests.frontend.fakes import rpc_error

MODEL = "all-MiniLM-L6-v2"
DIM = 384
WINDOW = 256


class Hold:
    """A worker call that waits until the test lets it go (`release.set()`)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.reached = asyncio.Event()


class FakeEmbedBackends:
    def __init__(self, model_dir: Path, *, task: str = "embed", window: int = WINDOW, dim: int = DIM) -> None:
        raw = (model_dir / "tokenizer.json").read_bytes()
        self.tokenizer = TokenizerModel(MODEL, raw, [])
        self.encoder = Tokenizer.from_str(raw.decode())
        self.encoder.no_truncation()
        self.encoder.no_padding()
        self.facts: dict[str, ModelFacts] = {MODEL: ModelFacts(MODEL, window, 16)}
        self.cards = [common_pb2.ModelCard(id=MODEL, max_model_len=window, task=task, embedding_dim=dim)]
        self.admissions: deque[str | InfermeshError] = deque()  # a worker address to lease, or an error
        self.workers: dict[str, deque[InfermeshError | Hold | None]] = {}  # None: answer with the vectors
        self.admitted: list[scheduler_pb2.AdmitRequest] = []
        self.encoded: list[tokenizer_pb2.EncodeRequest] = []
        self.calls: list[tuple[str, worker_pb2.EmbedTokensRequest]] = []
        self.released: list[tuple[str, int]] = []
        self._leases = itertools.count(1)

    def ids(self, text: str) -> list[int]:
        return list(self.encoder.encode(text).ids)

    def script(self, address: str, *steps: InfermeshError | Hold | None) -> None:
        self.workers.setdefault(address, deque()).extend(steps)

    async def tokenizer_model(self, model: str) -> TokenizerModel:
        return self.tokenizer

    async def model_facts(self, model: str) -> ModelFacts | None:
        return self.facts.get(model)

    async def model_cards(self, fresh: bool = False) -> list[common_pb2.ModelCard]:
        return self.cards

    async def encode(self, request: tokenizer_pb2.EncodeRequest, request_id: str) -> tokenizer_pb2.EncodeResponse:
        self.encoded.append(request)
        assert request.add_special_tokens
        return tokenizer_pb2.EncodeResponse(items=[common_pb2.TokenIds(ids=self.ids(t)) for t in request.texts])

    async def admit(self, request: scheduler_pb2.AdmitRequest, timeout: float | None) -> scheduler_pb2.Lease:
        self.admitted.append(request)
        answer = self.admissions.popleft()
        if isinstance(answer, InfermeshError):
            raise answer
        return scheduler_pb2.Lease(lease_id=f"lease-{next(self._leases)}", worker_id=f"id-{answer}",
                                   worker_address=answer)

    def release(self, lease_id: str, outcome: int) -> None:
        self.released.append((lease_id, outcome))

    async def embed(self, address: str, request: worker_pb2.EmbedTokensRequest,
                    metadata: Sequence[tuple[str, str]], timeout: float | None) -> worker_pb2.EmbedTokensResponse:
        copy = worker_pb2.EmbedTokensRequest()
        copy.CopyFrom(request)
        self.calls.append((address, copy))
        step = self.workers[address].popleft()
        if isinstance(step, Hold):
            step.reached.set()
            await step.release.wait()
        elif step is not None:
            raise rpc_error(step)
        return worker_pb2.EmbedTokensResponse(
            embeddings=[worker_pb2.EmbeddingVector(values=sim_vector(list(i.ids), DIM)) for i in request.inputs],
            prompt_tokens=sum(len(i.ids) for i in request.inputs))
