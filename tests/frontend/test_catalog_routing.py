"""The catalog on the request path, in-process against fakes of the tiers: aliases, a route's rules, fallback
chains before the first token (and never after it), context-window fallback, cooldown and its probe, and the
one model list."""

from __future__ import annotations

from pathlib import Path

import pytest
from infermesh.common.catalog import CatalogHolder, RequestFacts, parse_catalog
from infermesh.common.errors import ContextLengthExceeded, InvalidRequest, NotFound, Overloaded, Unavailable
from infermesh.frontend import metrics
from infermesh.frontend.models.listing import model_json, model_list
from infermesh.frontend.request.generation import Generation, ServingOptions, start_generation
from infermesh.frontend.request.interfaces import ModelFacts
from infermesh.frontend.request.targets import ModelTargets
from infermesh.v1 import common_pb2

from tests.frontend.fakes import FakeBackends, rpc_error, tokens
from tests.frontend.test_request_path import drain

CATALOG = """
format: 1
models:
  - name: small
    weights: {dir: /models/small}
    aliases: [chat-small]
    tier: cheap
  - name: large
    weights: {dir: /models/large}
    aliases: [chat-large]
    tier: standard
  - name: embedder
    task: embed
    weights: {dir: /models/embedder}
routes:
  - name: auto
    default: chat-small
    rules:
      - model: chat-large
        when: {tier: [standard, premium]}
      - model: chat-large
        when: {keywords: [python, sql]}
      - model: chat-large
        when: {prompt_tokens_over: 40}
      - model: chat-large
        when: {tools: true}
fallbacks:
  - chain: [chat-large, chat-small]
cooldown: {failures: 2, window_s: 60, skip_s: 30}
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake(model_dir: Path) -> FakeBackends:
    backends = FakeBackends(model_dir, model="small")
    backends.facts["large"] = ModelFacts("large", 4096, 16)
    return backends


@pytest.fixture
def targets() -> ModelTargets:
    t = ModelTargets(CatalogHolder(parse_catalog(CATALOG, "catalog.yaml")))
    t.cooldowns.clock = Clock()
    return t


async def start(fake: FakeBackends, targets: ModelTargets, model: str, prompt: str = "Hello there",
                facts: RequestFacts | None = None, **sampling: object) -> Generation:
    return await start_generation(fake, ServingOptions(), request_id="rid", model=model,
                                  sampling=common_pb2.SamplingParams(**sampling), tenant="t", priority=0,
                                  messages=[common_pb2.ChatMessage(role="user", content=prompt)],
                                  targets=targets, facts=facts or RequestFacts(turns=1, text=prompt))


def answer(fake: FakeBackends, worker: str, text: str = " fine.") -> None:
    fake.admissions.append(worker)
    fake.script(worker, tokens(fake.encode(text), finish="stop"))


def value(counter: object, **labels: str) -> float:
    return float(counter.labels(**labels)._value.get())  # type: ignore[attr-defined]


async def test_an_alias_is_served_by_its_model_and_says_so(fake: FakeBackends, targets: ModelTargets) -> None:
    answer(fake, "w-small")
    gen = await start(fake, targets, "chat-small", max_tokens=8)
    assert await drain(gen.output) == {0: " fine."}
    assert gen.model == "small" and gen.fallback == "" and fake.admitted[0].model == "small"
    await gen.close()


async def test_names_the_catalog_does_not_know_are_404_and_other_tasks_400(fake: FakeBackends,
                                                                          targets: ModelTargets) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        await start(fake, targets, "gpt-4")
    with pytest.raises(InvalidRequest, match="does not serve chat") as info:
        await start(fake, targets, "embedder")
    assert info.value.param == "model" and not fake.admitted
    assert targets.resolve("embedder", task="embed") == "embedder"
    with pytest.raises(InvalidRequest, match="route"):
        targets.resolve("auto", task="embed")


@pytest.mark.parametrize(("prompt", "facts", "expected"), [
    ("What is the capital of France?", RequestFacts(turns=1), "small"),
    ("Write python that sorts a list", None, "large"),
    ("Hello", RequestFacts(turns=1, tier="standard"), "large"),
    ("Hello", RequestFacts(turns=1, tier="cheap"), "small"),
    ("Hello", RequestFacts(turns=1, tools=True), "large"),
    ("word " * 60, RequestFacts(turns=1), "large"),  # over 40 rendered prompt tokens
])
async def test_the_route_picks_by_its_rules(fake: FakeBackends, targets: ModelTargets, prompt: str,
                                           facts: RequestFacts | None, expected: str) -> None:
    before = value(metrics.ROUTE_DECISIONS, route="auto", target=expected)
    answer(fake, "w-" + expected)
    gen = await start(fake, targets, "auto", prompt,
                      facts=facts if facts is None else RequestFacts(**{**facts.__dict__, "text": prompt}),
                      max_tokens=8)
    await drain(gen.output)
    assert gen.output.error is None and gen.model == expected and gen.route == "auto"
    assert [a.model for a in fake.admitted] == [expected]
    assert value(metrics.ROUTE_DECISIONS, route="auto", target=expected) == before + 1
    await gen.close()


async def test_a_refusal_before_the_first_token_falls_back_to_the_next_model(fake: FakeBackends,
                                                                            targets: ModelTargets) -> None:
    before = value(metrics.FALLBACKS, from_model="large", to_model="small", reason="overloaded")
    fake.admissions.append(Overloaded("the admission queue is full", retry_after=1.0))
    answer(fake, "w-small", " from the small one.")
    gen = await start(fake, targets, "chat-large", max_tokens=8)
    assert await drain(gen.output) == {0: " from the small one."}
    assert gen.model == "small" and gen.fallback == "large>small"
    assert [a.model for a in fake.admitted] == ["large", "small"]
    assert gen.output.usage().prompt_tokens == fake.admitted[1].prompt_tokens  # counted as small rendered it
    assert value(metrics.FALLBACKS, from_model="large", to_model="small", reason="overloaded") == before + 1
    await gen.close()
    assert not targets.cooldowns.cooling("large")  # load is not a failure of the model


async def test_workers_failing_before_the_first_token_fall_back(fake: FakeBackends, targets: ModelTargets) -> None:
    # large: its only worker fails, then the scheduler has no other; small answers.
    fake.admissions.append("w-large")
    fake.script("w-large", rpc_error(Unavailable("the engine died")))
    fake.admissions.append(Unavailable("no worker serves model 'large' now"))
    answer(fake, "w-small")
    gen = await start(fake, targets, "large", max_tokens=8)
    assert await drain(gen.output) == {0: " fine."}
    assert gen.fallback == "large>small" and [a.model for a in fake.admitted] == ["large", "large", "small"]
    await gen.close()


async def test_after_the_first_token_the_model_never_changes(fake: FakeBackends, targets: ModelTargets) -> None:
    ids = fake.encode(" one two three")
    fake.admissions.append("w-large")
    fake.script("w-large", tokens(ids[:1]), rpc_error(Unavailable("the engine died")))
    fake.admissions.append(Unavailable("no worker serves model 'large' now"))
    gen = await start(fake, targets, "large", max_tokens=8)
    texts = await drain(gen.output)
    assert texts[0] == fake.tokenizer.decode(ids[:1])
    assert isinstance(gen.output.error, Unavailable)
    assert [a.model for a in fake.admitted] == ["large", "large"]  # a same-model migration only, never small
    assert gen.model == "large" and gen.fallback == ""
    await gen.close()


async def test_a_bad_request_does_not_fall_back(fake: FakeBackends, targets: ModelTargets) -> None:
    fake.admissions.append("w-large")
    fake.script("w-large", rpc_error(InvalidRequest("the worker refused the sampling parameters")))
    gen = await start(fake, targets, "large", max_tokens=8)
    await drain(gen.output)
    assert isinstance(gen.output.error, InvalidRequest) and [a.model for a in fake.admitted] == ["large"]
    await gen.close()


async def test_a_prompt_too_long_for_a_model_goes_to_the_next_that_holds_it(fake: FakeBackends,
                                                                           targets: ModelTargets) -> None:
    fake.facts["large"] = ModelFacts("large", 32, 16)  # a small window for the first of the chain
    answer(fake, "w-small")
    gen = await start(fake, targets, "large", "word " * 40, max_tokens=8)
    await drain(gen.output)
    assert gen.output.error is None and gen.fallback == "large>small"
    assert [a.model for a in fake.admitted] == ["small"]  # large was never asked: the prompt cannot fit it
    await gen.close()
    # The chain's last model too small as well: the context error itself, a 400.
    fake.facts["small"] = ModelFacts("small", 32, 16)
    with pytest.raises(ContextLengthExceeded) as info:
        await start(fake, targets, "large", "word " * 40, max_tokens=8)
    assert info.value.openai_code == "context_length_exceeded" and info.value.http_status == 400


async def test_a_failing_model_cools_down_is_skipped_then_probed(fake: FakeBackends, targets: ModelTargets) -> None:
    clock = targets.cooldowns.clock
    assert isinstance(clock, Clock)
    entered = value(metrics.COOLDOWNS, model="large")
    for _ in range(2):  # two failures within the window (the catalog's cooldown: 2 in 60 s)
        fake.admissions.append(Unavailable("no worker serves model 'large' now"))
        answer(fake, "w-small")
        gen = await start(fake, targets, "large", max_tokens=8)
        await drain(gen.output)
        assert gen.output.error is None and gen.fallback == "large>small"
        await gen.close()
    assert targets.cooldowns.cooling("large") and value(metrics.COOLDOWNS, model="large") == entered + 1
    assert metrics.COOLING.labels(model="large")._value.get() == 1

    # While it cools, requests go straight to small: large is not asked at all.
    fake.admitted.clear()
    answer(fake, "w-small")
    gen = await start(fake, targets, "chat-large", max_tokens=8)
    await drain(gen.output)
    assert [a.model for a in fake.admitted] == ["small"] and gen.fallback == "large>small"
    await gen.close()

    # After skip_s, one request probes it; its success ends the cooldown.
    clock.now += 31
    fake.admitted.clear()
    answer(fake, "w-large")
    gen = await start(fake, targets, "large", max_tokens=8)
    await drain(gen.output)
    assert [a.model for a in fake.admitted] == ["large"] and gen.output.error is None
    await gen.close()
    assert not targets.cooldowns.cooling("large") and metrics.COOLING.labels(model="large")._value.get() == 0


async def test_a_failed_probe_skips_the_model_again(fake: FakeBackends, targets: ModelTargets) -> None:
    clock = targets.cooldowns.clock
    assert isinstance(clock, Clock)
    policy = targets.cooldown_policy()
    assert policy is not None
    targets.cooldowns.failed("large", policy)
    targets.cooldowns.failed("large", policy)
    clock.now += 31
    fake.admissions.append(Unavailable("no worker serves model 'large' now"))
    answer(fake, "w-small")
    gen = await start(fake, targets, "large", max_tokens=8)
    await drain(gen.output)
    assert gen.fallback == "large>small" and targets.cooldowns.admits("large") == "no"
    await gen.close()


async def test_without_a_catalog_names_pass_through(fake: FakeBackends) -> None:
    answer(fake, "w")
    gen = await start_generation(fake, ServingOptions(), request_id="rid", model="small",
                                 sampling=common_pb2.SamplingParams(max_tokens=4), tenant="t", priority=0,
                                 prompt="Hi")
    await drain(gen.output)
    assert gen.model == "small" and gen.output.error is None
    await gen.close()


def test_the_model_list_has_every_model_alias_and_route() -> None:
    catalog = parse_catalog(CATALOG, "catalog.yaml")
    cards = [common_pb2.ModelCard(id="small", max_model_len=2048, created=7, block_size=16, task="generate")]
    listed = {c.id: model_json(c) for c in model_list(catalog, cards)}
    assert set(listed) == {"small", "chat-small", "large", "chat-large", "embedder", "auto"}
    expected = {"root": "small", "parent": None, "kind": "model", "task": "generate", "tier": "cheap",
                "ready": True, "max_model_len": 2048}
    assert {k: listed["small"][k] for k in expected} == expected
    assert listed["chat-small"]["parent"] == "small" and listed["chat-small"]["kind"] == "alias"
    assert listed["chat-small"]["ready"] is True and listed["chat-large"]["ready"] is False
    assert listed["large"]["ready"] is False and listed["large"]["tier"] == "standard"
    assert listed["embedder"]["task"] == "embed"
    assert listed["auto"]["kind"] == "route" and listed["auto"]["ready"] is True and listed["auto"]["root"] is None
    assert all(entry["object"] == "model" for entry in listed.values())
    # Without a catalog: what the workers serve, as before.
    assert [model_json(c)["id"] for c in model_list(None, cards)] == ["small"]
