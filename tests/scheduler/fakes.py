"""In-process stand-ins for workers: real Info and LoadReport messages, no gRPC."""

from __future__ import annotations

from collections.abc import Iterable

from infermesh.scheduler.dispatcher import Dispatcher, Limits
from infermesh.scheduler.policies import make_policy
from infermesh.v1 import worker_pb2


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeWorker:
    """What a worker holds, and the reports it would send about it."""

    def __init__(self, dispatcher: Dispatcher, address: str, *, model: str = "m", max_num_seqs: int = 4,
                 kv_capacity_tokens: int = 1000, max_model_len: int = 1000, block_size: int = 16) -> None:
        self.dispatcher = dispatcher
        self.address = address
        self.model = model
        self.max_num_seqs = max_num_seqs
        self.kv_capacity_tokens = kv_capacity_tokens
        self.max_model_len = max_model_len
        self.held: dict[str, int] = {}  # lease id -> tokens
        self.seqs: dict[str, int] = {}  # lease id -> sequences (its n)
        self.started: list[str] = []
        self.finished: list[str] = []
        self.seq = 0
        self.draining = False
        dispatcher.on_info(address, worker_pb2.WorkerInfo(
            worker_id=f"w-{address}", model=model, max_model_len=max_model_len, engine="sim", simulated=True,
            max_num_seqs=max_num_seqs, kv_capacity_tokens=kv_capacity_tokens, block_size=block_size))
        self.report()

    def start(self, lease_id: str, tokens: int, seqs: int = 1) -> None:
        self.held[lease_id] = tokens
        self.seqs[lease_id] = seqs
        self.started.append(lease_id)

    def held_seqs(self) -> int:
        return sum(self.seqs.values())

    def finish(self, lease_id: str) -> None:
        if self.held.pop(lease_id, None) is not None:
            del self.seqs[lease_id]
            self.finished.append(lease_id)

    def report(self, *, extra_running: int = 0, extra_tokens: int = 0, active: Iterable[str] = (),
               engine_lags: bool = False) -> None:
        """Sends a load report; `extra_*` stand for requests of other schedulers.

        `engine_lags`: the engine has not counted the held requests' sequences yet (only the leases show).
        """
        self.seq += 1
        msg = worker_pb2.LoadReport(
            worker_id=f"w-{self.address}", model=self.model, seq=self.seq,
            running=(0 if engine_lags else self.held_seqs()) + extra_running, waiting=0,
            kv_capacity_tokens=self.kv_capacity_tokens, max_num_seqs=self.max_num_seqs,
            committed_tokens=sum(self.held.values()) + extra_tokens, draining=self.draining,
            leases_started=self.started, leases_finished=self.finished,
            leases_active=[*self.held, *active], max_model_len=self.max_model_len)
        self.started, self.finished = [], []
        self.dispatcher.on_report(self.address, msg)


def dispatcher(policy: str = "least_load", clock: Clock | None = None, **limits: float) -> Dispatcher:
    return Dispatcher(make_policy(policy), Limits(**limits), clock=clock or Clock())
