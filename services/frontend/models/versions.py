"""The frontend's copy of the scheduler's version split, and the version a request goes to.

The scheduler decides each version's weight (the catalog's traffic, rollout
steps, rollbacks, readiness: `infermesh.scheduler.versions`) and streams it
(`WatchVersions`); `VersionSplit.follow` keeps the latest here. `pick` applies
the one split rule of `infermesh.common.versions` to it, before the request is
rendered: a version may have its own tokenizer. Until the scheduler has been
heard, every request goes to the stable version.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from infermesh.common.catalog import VERSION_SEP, ModelEntry
from infermesh.common.versions import bucket, split
from infermesh.v1 import scheduler_pb2, scheduler_pb2_grpc

logger = logging.getLogger(__name__)

RETRY_S = (0.2, 0.5, 1.0, 2.0)  # reconnect backoff of the watch


@dataclass(frozen=True)
class VersionChoice:
    """What picks a request's version: its sticky key (`infermesh.common.versions.sticky_key`; the request's
    id when it has none), and a version the caller pinned (the `x-infermesh-model-version` header; '' none)."""

    key: str = ""
    pin: str = ""


ANY_VERSION = VersionChoice()  # no key, no pin (a request's own id is its key: see `start_generation`)


class VersionSplit:
    def __init__(self) -> None:
        self.models: dict[str, scheduler_pb2.ModelVersions] = {}
        self.heard = False

    def update(self, splits: scheduler_pb2.VersionSplits) -> None:
        self.models = {m.model: m for m in splits.models}
        self.heard = True

    def pick(self, model: ModelEntry, key: str) -> str:
        """The served name (`NAME@VERSION`) of the version this key's requests for `model` go to now."""
        stable = f"{model.name}{VERSION_SEP}{model.stable}"
        known = self.models.get(model.name)
        if known is None or known.stable != model.stable:
            return stable  # not heard yet, or split for another catalog: the stable version
        listed = {v.version for v in model.versions}
        canaries = [(v.served, v.weight) for v in known.versions
                    if v.version != model.stable and v.version in listed and v.weight > 0]
        return split(canaries, stable, bucket(model.name, key))

    def of(self, model: str) -> scheduler_pb2.ModelVersions | None:
        """The scheduler's view of a model's versions (None: not versioned, or not heard yet)."""
        return self.models.get(model)

    def follow(self, channel: grpc.aio.Channel) -> Callable[[], None]:
        """Keeps the split current from the scheduler's WatchVersions stream; returns the stop."""
        task = asyncio.get_running_loop().create_task(self._follow(scheduler_pb2_grpc.SchedulerStub(channel)))

        def stop() -> None:
            task.cancel()
        return stop

    async def _follow(self, stub: scheduler_pb2_grpc.SchedulerStub) -> None:
        watcher = f"frontend@{socket.gethostname()}:{os.getpid()}"
        failures = 0
        while True:
            try:
                async for splits in stub.WatchVersions(scheduler_pb2.WatchVersionsRequest(watcher=watcher)):
                    self.update(splits)
                    failures = 0
            except asyncio.CancelledError:
                raise
            except grpc.RpcError as err:
                if failures == 0:
                    logger.info("version split: the scheduler's stream ended (%s); reconnecting", err.code().name)
            await asyncio.sleep(RETRY_S[min(failures, len(RETRY_S) - 1)])
            failures += 1
