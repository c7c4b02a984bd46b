"""The one model list (`GET /v1/models`, gRPC `ListModels`): the catalog's names, each with what serves it.

Without a catalog: the models the workers serve, as the scheduler reports them. With one: every model of
the catalog (ready or not), each alias (`parent`: its model), each route (`parent` empty: its rules choose
per request), with the catalog's task and tier and the workers' context window and readiness. `root` is
the base model a name serves (vLLM's field; a route has none). A versioned model is ready when its stable
version is, and lists its versions as the scheduler splits them (`versions`: weight, state, a rollback's
reason, the rollout's step, the canary analysis).
"""

from __future__ import annotations

import time

from infermesh.common.catalog import Catalog, ModelEntry
from infermesh.frontend.models.versions import VersionSplit
from infermesh.v1 import common_pb2

_STARTED = int(time.time())


def model_list(catalog: Catalog | None, cards: list[common_pb2.ModelCard],
               versions: VersionSplit | None = None) -> list[common_pb2.ModelCard]:
    by_id = {c.id: c for c in cards}
    if catalog is None:
        return [_card(c, c.id, root=c.id, kind="model", task=c.task or "generate") for c in cards]
    out: list[common_pb2.ModelCard] = []
    for m in catalog.models:
        key = f"{m.name}@{m.stable}" if m.versions else m.name  # what serves it: its stable version's workers
        served = by_id.get(key) or common_pb2.ModelCard(id=key, max_model_len=m.engine.max_model_len or 0,
                                                        owned_by="infermesh", created=_STARTED)
        base = _card(served, m.name, root=m.name, kind="model", task=m.task, tier=m.tier,
                     ready=key in by_id and served.max_model_len > 0)
        if m.versions:
            base.versions.extend(_versions(m, versions, by_id))
        out.append(base)
        for alias in m.aliases:
            out.append(_card(base, alias, root=m.name, parent=m.name, kind="alias"))
    for route in catalog.routes:
        targets = [next(c for c in out if c.id == catalog.resolve(t).name) for t in route.targets]
        default = next(c for c in out if c.id == catalog.resolve(route.default).name)
        windows = [t.max_model_len for t in targets if t.max_model_len]
        card = _card(default, route.name, root="", parent="", kind="route", task="generate",
                     ready=any(t.ready for t in targets))
        card.max_model_len = max(windows) if windows else 0
        out.append(card)
    return out


def _versions(m: ModelEntry, split: VersionSplit | None,
              by_id: dict[str, common_pb2.ModelCard]) -> list[common_pb2.VersionState]:
    """A versioned model's versions as the scheduler splits them; before it is heard, the catalog's traffic
    with the state `unknown` (the stable version serves every request meanwhile)."""
    known = split.of(m.name) if split is not None else None
    heard = {v.version: v for v in known.versions} if known is not None and known.stable == m.stable else {}
    out = []
    for v in m.versions:
        state = common_pb2.VersionState()
        if v.version in heard:
            state.CopyFrom(heard[v.version])
        else:
            state.version, state.served, state.state = v.version, v.name, "unknown"
            state.weight = 100.0 - sum(c.traffic for c in m.canaries) if v.version == m.stable else v.traffic
            state.steps = len(v.rollout)
        out.append(state)
    return out


def _card(source: common_pb2.ModelCard, name: str, **fields: object) -> common_pb2.ModelCard:
    card = common_pb2.ModelCard()
    card.CopyFrom(source)
    card.id = name
    card.owned_by = card.owned_by or "infermesh"
    if "ready" not in fields and source.id == name:
        fields["ready"] = source.max_model_len > 0
    for key, value in fields.items():
        setattr(card, key, value)
    return card


def model_json(card: common_pb2.ModelCard) -> dict[str, object]:
    """OpenAI's model object, plus vLLM's `root`/`parent` and the mesh's own fields."""
    return {"id": card.id, "object": "model", "created": card.created, "owned_by": card.owned_by or "infermesh",
            "root": card.root or None, "parent": card.parent or None, "kind": card.kind or "model",
            "task": card.task or "generate", "tier": card.tier or None, "max_model_len": card.max_model_len,
            "ready": card.ready, "simulated": card.simulated,
            **({"versions": [version_json(v) for v in card.versions]} if card.versions else {})}


def version_json(v: common_pb2.VersionState) -> dict[str, object]:
    """One version of a versioned model in `/v1/models`."""
    return {"version": v.version, "served_as": v.served, "weight": v.weight, "state": v.state,
            "rollback_reason": v.reason or None, "rolled_back_at": v.rolled_back_at or None,
            "rollout": {"step": v.step, "steps": v.steps},
            "analysis": {"requests": v.requests, "error_rate": v.error_rate,
                         "ttft_p95_s": v.ttft_p95_s, "tpot_p95_s": v.tpot_p95_s}}
