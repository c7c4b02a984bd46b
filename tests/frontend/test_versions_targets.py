"""Versioned models on the frontend's side, in-process: the version a request goes to (the scheduler's split,
sticky per key; a pin), the names tried after it (its stable version, fallbacks' versions), errors of unknown
versions and pins, the model list's versions, and a canary's failure retried on the stable version through the
HTTP app against fakes of the tiers."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from infermesh.common.catalog import CatalogHolder, ModelEntry, parse_catalog
from infermesh.common.errors import InternalError, InvalidRequest, NotFound, Unavailable, VersionRolledBack
from infermesh.common.versions import VERSION_HEADER, sticky_key
from infermesh.frontend.app import create_app
from infermesh.frontend.auth import ApiKeys
from infermesh.frontend.models.listing import model_json, model_list
from infermesh.frontend.models.versions import VersionChoice
from infermesh.frontend.request.generation import ServingOptions
from infermesh.frontend.request.interfaces import ModelFacts
from infermesh.frontend.request.targets import ModelTargets
from infermesh.v1 import common_pb2, scheduler_pb2

from tests.frontend.fakes import FakeBackends, rpc_error
from tests.frontend.test_catalog_routing import answer

CATALOG = """
models:
  - name: chat
    aliases: [chat-small]
    stable: v1
    versions:
      - {name: v1, weights: {dir: /models/chat-v1}}
      - {name: v2, weights: {dir: /models/chat-v2}, traffic: 30}
  - name: big
    stable: b1
    versions: [{name: b1, weights: {dir: /models/big-b1}}, {name: b2, weights: {dir: /models/big-b2}, traffic: 50}]
  - name: plain
    weights: {dir: /models/plain}
  - name: vectors
    task: embed
    stable: e1
    versions: [{name: e1, weights: {dir: /models/e1}}, {name: e2, weights: {dir: /models/e2}, traffic: 40}]
fallbacks:
  - chain: [big, chat, plain]
"""
KEYS = [sticky_key(session=f"s{i}") for i in range(3000)]


def heard(model: str, stable: str, **canaries: float) -> scheduler_pb2.ModelVersions:
    """A model's versions as the scheduler publishes them: `canaries` by version, the stable one the rest."""
    versions = [common_pb2.VersionState(version=stable, served=f"{model}@{stable}", state="stable",
                                        weight=100 - sum(canaries.values()))]
    versions += [common_pb2.VersionState(version=v, served=f"{model}@{v}", weight=w, state="canary" if w else
                                         "waiting", step=1, steps=2) for v, w in canaries.items()]
    return scheduler_pb2.ModelVersions(model=model, stable=stable, versions=versions)


def split_heard(targets: ModelTargets, *models: scheduler_pb2.ModelVersions) -> None:
    targets.versions.update(scheduler_pb2.VersionSplits(models=models))


@pytest.fixture
def targets() -> ModelTargets:
    return ModelTargets(CatalogHolder(parse_catalog(CATALOG, "catalog.yaml")))


def chat_entry(targets: ModelTargets) -> ModelEntry:
    entry = targets.entry("chat")
    assert entry is not None
    return entry


def canary_key(targets: ModelTargets, canary: str = "chat@v2") -> str:
    """A key whose requests for chat the split sends to `canary`."""
    return next(k for k in KEYS if targets.versions.pick(chat_entry(targets), k) == canary)


# ---- the chain of names ----

def test_before_the_split_is_heard_every_request_goes_to_the_stable_version(targets: ModelTargets) -> None:
    assert {tuple(targets.chain("chat", VersionChoice(key=k))) for k in KEYS} == {("chat@v1", "plain")}
    assert targets.chain("chat-small") == ["chat@v1", "plain"]


def test_the_split_sends_its_share_of_keys_to_the_canary_then_the_stable_version(targets: ModelTargets) -> None:
    split_heard(targets, heard("chat", "v1", v2=30))
    chains = [tuple(targets.chain("chat", VersionChoice(key=k))) for k in KEYS]
    assert set(chains) == {("chat@v2", "chat@v1", "plain"), ("chat@v1", "plain")}
    assert chains.count(("chat@v2", "chat@v1", "plain")) / len(KEYS) == pytest.approx(0.3, abs=0.03)
    # Sticky: the same key, the same version, by the model's name or its alias.
    for key, chain in zip(KEYS[:300], chains, strict=False):
        assert tuple(targets.chain("chat", VersionChoice(key=key))) == chain
        assert tuple(targets.chain("chat-small", VersionChoice(key=key))) == chain


def test_a_split_of_weight_0_for_another_stable_or_unknown_versions_is_the_stable_version(
        targets: ModelTargets) -> None:
    for published in (heard("chat", "v1", v2=0), heard("chat", "v2", v1=100), heard("chat", "v1", v7=100)):
        split_heard(targets, published)
        assert {targets.chain("chat", VersionChoice(key=k))[0] for k in KEYS} == {"chat@v1"}, published


def test_a_canary_at_100_takes_every_key(targets: ModelTargets) -> None:
    split_heard(targets, heard("chat", "v1", v2=100))
    assert {tuple(targets.chain("chat", VersionChoice(key=k))) for k in KEYS} == {("chat@v2", "chat@v1", "plain")}


def test_a_fallback_chain_tries_each_members_picked_version_then_its_stable_one(targets: ModelTargets) -> None:
    split_heard(targets, heard("big", "b1", b2=50), heard("chat", "v1", v2=30))
    chains = {tuple(targets.chain("big", VersionChoice(key=k))) for k in KEYS}
    assert chains == {
        ("big@b2", "big@b1", "chat@v2", "chat@v1", "plain"),
        ("big@b2", "big@b1", "chat@v1", "plain"),
        ("big@b1", "chat@v2", "chat@v1", "plain"),
        ("big@b1", "chat@v1", "plain"),
    }
    assert targets.chain("plain") == ["plain"]


@pytest.mark.parametrize(("model", "pin", "expected"), [
    ("chat@v2", "", ["chat@v2"]),
    ("chat-small@v2", "", ["chat@v2"]),  # an alias's pin
    ("chat", "v2", ["chat@v2"]),  # the header
    ("chat@v1", "v1", ["chat@v1"]),  # both, the same
    ("big", "b2", ["big@b2"]),  # a pin has no fallbacks
])
def test_a_pin_is_that_version_alone(targets: ModelTargets, model: str, pin: str, expected: list[str]) -> None:
    split_heard(targets, heard("chat", "v1", v2=0))
    assert targets.chain(model, VersionChoice(key="k", pin=pin)) == expected
    assert targets.pinned(model, VersionChoice(key="k", pin=pin))


def test_a_request_not_pinned_is_not_pinned(targets: ModelTargets) -> None:
    assert not targets.pinned("chat", VersionChoice(key="k"))
    assert not targets.pinned("chat-small", VersionChoice())
    assert not targets.pinned("plain", VersionChoice(key="k"))


def test_an_unknown_version_is_404_model_not_found(targets: ModelTargets) -> None:
    with pytest.raises(NotFound) as info:
        targets.resolve("chat@v9")
    assert (info.value.http_status, info.value.openai_code, info.value.param) == (404, "model_not_found", "model")
    with pytest.raises(NotFound, match="no version `v9`") as header:
        targets.chain("chat", VersionChoice(pin="v9"))
    assert header.value.http_status == 404
    assert targets.resolve("chat@v2") == "chat@v2"


@pytest.mark.parametrize(("model", "pin"), [("plain", "v1"), ("chat@v1", "v2")])
def test_a_version_header_that_cannot_apply_is_invalid(targets: ModelTargets, model: str, pin: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        targets.chain(model, VersionChoice(pin=pin))
    assert info.value.param == VERSION_HEADER and info.value.http_status == 400


def test_without_a_catalog_a_version_header_is_invalid() -> None:
    with pytest.raises(InvalidRequest, match="has no versions") as info:
        ModelTargets().chain("m", VersionChoice(pin="v1"))
    assert info.value.param == VERSION_HEADER
    assert ModelTargets().chain("m", VersionChoice(key="k")) == ["m"]


def test_the_served_name_of_a_version_is_its_models(targets: ModelTargets) -> None:
    assert [targets.served_name(n) for n in ("chat@v2", "chat@v1", "chat", "plain", "big@b2", "nothing")] == \
        ["chat", "chat", "chat", "plain", "big", "nothing"]
    assert ModelTargets().served_name("chat@v2") == "chat@v2"


def test_an_embeddings_request_goes_to_the_picked_version_alone(targets: ModelTargets) -> None:
    split_heard(targets, heard("vectors", "e1", e2=40))
    picked = [targets.embed_model("vectors", VersionChoice(key=k)) for k in KEYS]
    assert set(picked) == {"vectors@e1", "vectors@e2"}
    assert picked.count("vectors@e2") / len(KEYS) == pytest.approx(0.4, abs=0.03)
    assert targets.embed_model("vectors", VersionChoice(pin="e1")) == "vectors@e1"


# ---- the model list ----

def listed(targets: ModelTargets, cards: list[common_pb2.ModelCard]) -> dict[str, dict[str, object]]:
    return {c.id: model_json(c) for c in model_list(targets.catalog, cards, targets.versions)}


def test_a_versioned_model_is_listed_with_its_stable_versions_card_and_catalog_versions_before_the_split(
        targets: ModelTargets) -> None:
    models = listed(targets, [common_pb2.ModelCard(id="chat@v1", max_model_len=2048, created=7),
                              common_pb2.ModelCard(id="big@b2", max_model_len=4096, created=7)])
    chat = models["chat"]
    assert (chat["ready"], chat["max_model_len"], chat["root"], chat["kind"]) == (True, 2048, "chat", "model")
    assert [(v["version"], v["served_as"], v["state"], v["weight"]) for v in chat["versions"]] == \
        [("v1", "chat@v1", "unknown", 70.0), ("v2", "chat@v2", "unknown", 30.0)]
    assert models["chat-small"]["versions"] == chat["versions"] and models["chat-small"]["parent"] == "chat"
    # Only a canary's worker is up: the model is not ready (its stable version serves until the split is heard).
    assert models["big"]["ready"] is False
    assert "versions" not in models["plain"]
    assert not any(n.startswith("chat@") for n in models)  # versions are not models of their own


def test_a_versioned_models_versions_follow_the_split(targets: ModelTargets) -> None:
    published = heard("chat", "v1", v2=12.5)
    published.versions[1].requests, published.versions[1].error_rate = 40, 0.05
    split_heard(targets, published)
    chat = listed(targets, [common_pb2.ModelCard(id="chat@v1", max_model_len=2048)])["chat"]
    v1, v2 = chat["versions"]  # type: ignore[misc]
    assert (v1["state"], v1["weight"], v2["state"], v2["weight"]) == ("stable", 87.5, "canary", 12.5)
    assert v2["rollout"] == {"step": 1, "steps": 2} and v2["analysis"]["requests"] == 40
    assert v2["analysis"]["error_rate"] == pytest.approx(0.05)
    assert v2["rollback_reason"] is None and v2["rolled_back_at"] is None
    published.versions[1].state, published.versions[1].reason = "rolled_back", "error_rate"
    published.versions[1].weight, published.versions[1].rolled_back_at = 0, 1234.5
    split_heard(targets, published)
    v2 = listed(targets, [])["chat"]["versions"][1]  # type: ignore[index]
    assert (v2["state"], v2["rollback_reason"], v2["rolled_back_at"], v2["weight"]) == \
        ("rolled_back", "error_rate", 1234.5, 0)


# ---- a whole request: a canary's failure before its first token ----

@pytest.fixture
def fake(model_dir: Path) -> FakeBackends:
    backends = FakeBackends(model_dir, model="chat@v1")
    backends.facts["chat@v2"] = ModelFacts("chat@v2", 4096, 16)
    return backends


async def post(fake: FakeBackends, targets: ModelTargets, headers: dict[str, str],
               **body: object) -> httpx.Response:
    app = create_app(fake, ApiKeys(""), ServingOptions(), max_body_bytes=1 << 20, targets=targets)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        return await client.post("/v1/chat/completions", headers=headers, json={
            "model": "chat", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8, **body})


@pytest.mark.parametrize("stream", [False, True])
async def test_a_canarys_failure_before_the_first_token_is_served_by_the_stable_version(
        fake: FakeBackends, targets: ModelTargets, stream: bool) -> None:
    split_heard(targets, heard("chat", "v1", v2=30))
    session = canary_key(targets).removeprefix("session:")
    fake.admissions.append("w-v2")  # the canary's one worker fails the request, then the scheduler has no other
    fake.script("w-v2", rpc_error(InternalError("simulated request failure")))
    fake.admissions.append(Unavailable("no worker serves model 'chat@v2' now (the others are excluded)"))
    answer(fake, "w-v1", " from the stable one.")
    reply = await post(fake, targets, {"x-session-id": session}, stream=stream)
    assert reply.status_code == 200, reply.text
    assert [a.model for a in fake.admitted] == ["chat@v2", "chat@v2", "chat@v1"]
    assert not any(a.version_pinned for a in fake.admitted)
    assert (reply.headers["x-infermesh-model"], reply.headers[VERSION_HEADER]) == ("chat", "v1")
    if stream:
        assert '"model":"chat"' in reply.text and "error" not in reply.text and "chat@" not in reply.text
        assert "from the stable one" in "".join(reply.text.split('"content":"')[1:])
    else:
        body = reply.json()
        assert body["model"] == "chat" and body["choices"][0]["message"]["content"] == " from the stable one."


async def test_a_pinned_request_says_so_to_the_scheduler_and_is_not_retried_on_stable(
        fake: FakeBackends, targets: ModelTargets) -> None:
    fake.admissions.append("w-v2")
    fake.script("w-v2", rpc_error(InternalError("simulated request failure")))
    fake.admissions.append(Unavailable("no worker serves model 'chat@v2' now (the others are excluded)"))
    reply = await post(fake, targets, {VERSION_HEADER: "v2"})
    assert reply.status_code == 503
    assert [(a.model, a.version_pinned) for a in fake.admitted] == [("chat@v2", True), ("chat@v2", True)]


async def test_a_version_rolled_back_since_the_split_was_heard_goes_to_the_stable_version(
        fake: FakeBackends, targets: ModelTargets) -> None:
    split_heard(targets, heard("chat", "v1", v2=30))
    fake.admissions.append(VersionRolledBack("the version 'chat@v2' was rolled back"))
    answer(fake, "w-v1")
    reply = await post(fake, targets, {"x-session-id": canary_key(targets).removeprefix("session:")})
    assert reply.status_code == 200 and reply.headers[VERSION_HEADER] == "v1"
    assert [a.model for a in fake.admitted] == ["chat@v2", "chat@v1"]
    assert not targets.cooldowns.cooling("chat@v2")


@pytest.mark.parametrize(("model", "headers", "status", "param"), [
    ("chat@v9", {}, 404, "model"),
    ("chat", {VERSION_HEADER: "v9"}, 404, "model"),
    ("plain", {VERSION_HEADER: "v1"}, 400, VERSION_HEADER),
    ("chat@v1", {VERSION_HEADER: "v2"}, 400, VERSION_HEADER),
    ("chat", {VERSION_HEADER: "v" * 257}, 400, VERSION_HEADER),
])
async def test_versions_that_cannot_serve_are_refused_before_admission(
        fake: FakeBackends, targets: ModelTargets, model: str, headers: dict[str, str], status: int,
        param: str) -> None:
    reply = await post(fake, targets, headers, model=model)
    assert reply.status_code == status and reply.json()["error"]["param"] == param, reply.text
    assert not fake.admitted
