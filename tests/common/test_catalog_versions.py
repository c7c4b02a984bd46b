"""Model versions in the catalog: the format's rules (line and field named), the lookups of `NAME@VERSION`,
the engine options a version inherits, `fingerprint()`, durations, and the example deploy/catalog/canary.yaml.
(The catalog without versions: test_catalog.py.)"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from infermesh.common.catalog import (
    CatalogError,
    EngineOptions,
    ModelEntry,
    RequestFacts,
    Rollback,
    RolloutStep,
    load_catalog,
    parse_catalog,
)
from infermesh.common.catalog.reader import parse_duration
from infermesh.common.errors import NotFound

ROOT = Path(__file__).resolve().parents[2]
CANARY = ROOT / "deploy" / "catalog" / "canary.yaml"
SMOL, QWEN = "SmolLM2-135M-Instruct", "Qwen2.5-Coder-0.5B-Instruct"

# The example, with a plain model, a route and a fallback chain around it.
EXAMPLE = f"""\
models:
  - name: tiny
    weights: {{dir: /models/tiny}}
  - name: chat
    aliases: [chat-small]
    stable: v1
    tier: standard
    prices: {{prompt_per_mtok: 0.1}}
    engine: {{max_model_len: 2048, enforce_eager: true}}
    versions:
      - name: v1
        weights: {{prepared: {SMOL}}}
        workers: 2
      - name: v2
        weights: {{prepared: {SMOL}}}
        engine: {{max_num_seqs: 4, enforce_eager: false}}
        workers: 1
        traffic: 10
        rollout:
          - set_weight: 10
          - pause: 30s
          - set_weight: 50
          - pause: 1m
    rollback: {{min_requests: 50, max_error_rate: 0.02, max_ttft_ratio: 2, max_tpot_ratio: 1.25, window_s: 120}}
  - name: large
    weights: {{prepared: {QWEN}}}
    aliases: [chat-large]
routes:
  - name: auto
    default: chat-small
    rules:
      - {{model: chat-large, when: {{tools: true}}}}
fallbacks:
  - chain: [tiny, chat-small, large]
"""

# `models:` and a versioned model `chat` whose versions v1 (lines 5-6) and v2 (lines 7-8) the cases add to.
HEAD = "models:\n  - name: chat\n    stable: v1\n    versions:\n"
V1 = f"      - name: v1\n        weights: {{prepared: {SMOL}}}\n"
V2 = f"      - name: v2\n        weights: {{prepared: {SMOL}}}\n"


def problems(text: str) -> list[str]:
    """The problems of a catalog text, as `c.yaml:LINE: field: message`."""
    with pytest.raises(CatalogError) as info:
        parse_catalog(textwrap.dedent(text), "c.yaml")
    return [str(p) for p in info.value.problems]


def version(text: str, name: str) -> ModelEntry:
    found = parse_catalog(text).lookup(name)
    assert isinstance(found, ModelEntry) and found.version, name
    return found


# --- the lookups -----------------------------------------------------------------------------------------------

def test_a_versioned_model_and_its_versions() -> None:
    c = parse_catalog(EXAMPLE)
    chat = c.resolve("chat")
    assert [v.name for v in chat.versions] == ["chat@v1", "chat@v2"]
    assert chat.stable == "v1" and chat.stable_version is chat.versions[0]
    assert chat.canaries == (chat.versions[1],)
    # The model itself is what a request names: the stable version's weights and engine, no workers of its own.
    assert chat.workers == 0 and chat.weights == chat.versions[0].weights and chat.engine == chat.versions[0].engine
    assert chat.rollback == Rollback(window_s=120, min_requests=50, max_error_rate=0.02, max_ttft_ratio=2,
                                     max_tpot_ratio=1.25)
    v1, v2 = chat.versions
    assert (v1.model, v1.version, v1.workers, v1.traffic, v1.rollout) == ("chat", "v1", 2, 0.0, ())
    assert (v2.model, v2.version, v2.workers, v2.traffic) == ("chat", "v2", 1, 10.0)
    assert v2.rollout == (RolloutStep(set_weight=10), RolloutStep(pause_s=30), RolloutStep(set_weight=50),
                          RolloutStep(pause_s=60))
    # A version has the model's task, tier and prices, and no names of its own.
    assert {(v.task, v.tier, v.prices.prompt_per_mtok, v.aliases) for v in chat.versions} == \
        {("generate", "standard", 0.1, ())}
    assert v2.spec().startswith("chat@v2=") and v2.weights.prepared == SMOL
    # Versions are no models of their own: not in the names clients list, not in models_for_task.
    assert c.served_names() == ("tiny", "chat", "chat-small", "large", "chat-large", "auto")
    assert [m.name for m in c.models_for_task("generate")] == ["tiny", "chat", "large"]
    assert c.model_names() == ("tiny", "chat", "large")


def test_name_at_version_pins_a_version() -> None:
    c = parse_catalog(EXAMPLE)
    v2 = c.lookup("chat@v2")
    assert isinstance(v2, ModelEntry) and v2.version == "v2"
    assert c.lookup("chat-small@v2") is v2  # an alias's pin too
    assert c.resolve("chat@v1") is c.resolve("chat-small@v1") is c.resolve("chat").stable_version
    assert c.model_of(v2) is c.resolve("chat") and c.model_of(c.resolve("large")) is c.resolve("large")
    for unknown in ("chat@v3", "chat@", "chat@V2", "chat@v2@v1", "large@v1", "chat-large@v1", "auto@v1",
                    "nobody@v1", "@v1"):
        assert c.lookup(unknown) is None, unknown
    with pytest.raises(NotFound, match="`chat@v3` does not exist"):
        c.resolve("chat@v3")


def test_served_models_are_the_versions_and_the_other_models() -> None:
    c = parse_catalog(EXAMPLE)
    assert [m.name for m in c.served_models()] == ["tiny", "chat@v1", "chat@v2", "large"]
    assert [m.spec().split("=")[0] for m in c.served_models()] == ["tiny", "chat@v1", "chat@v2", "large"]
    assert c.resolve("large").served() == (c.resolve("large"),)


def test_a_version_overrides_the_models_engine_field_by_field() -> None:
    chat = parse_catalog(EXAMPLE).resolve("chat")
    assert chat.versions[0].engine == EngineOptions(max_model_len=2048, enforce_eager=True)
    assert chat.versions[1].engine == EngineOptions(max_model_len=2048, max_num_seqs=4, enforce_eager=False)
    assert chat.versions[1].engine.worker_args() == ["--max-model-len", "2048", "--max-num-seqs", "4",
                                                     "--no-enforce-eager"]
    # Without a model-level `engine`, a version's own options alone; without either, the workers' defaults.
    text = HEAD + V1 + V2 + "        engine: {dtype: bfloat16}\n"
    assert version(text, "chat@v1").engine == EngineOptions()
    assert version(text, "chat@v2").engine == EngineOptions(dtype="bfloat16")
    # YAML anchors work in versions as elsewhere.
    shared = "x-e: &e {max_model_len: 1024}\n" + HEAD + V1 + "        engine: {<<: *e, block_size: 16}\n"
    assert version(shared, "chat@v1").engine == EngineOptions(max_model_len=1024, block_size=16)


def test_fallbacks_of_versions_and_of_versioned_models() -> None:
    c = parse_catalog(EXAMPLE)
    chat, large = c.resolve("chat"), c.resolve("large")
    assert c.fallbacks("tiny") == [chat, large]  # a chain's member is the model, never one of its versions
    for name in ("chat", "chat-small", "chat@v2", "chat-small@v1"):
        assert c.fallbacks(name) == [large], name
    assert c.fallbacks("large") == []


def test_a_route_names_a_versioned_model() -> None:
    c = parse_catalog(EXAMPLE)
    assert c.resolve("auto") is c.resolve("chat")
    assert c.resolve("auto", RequestFacts(tools=True)) is c.resolve("large")
    # A route without a default picks the cheapest of its targets by the model's tier.
    text = EXAMPLE.replace("    default: chat-small\n", "").replace("{tools: true}", "{tools: false}") \
        .replace("      - {model: chat-large, when: {tools: false}}\n",
                 "      - {model: chat-large, when: {tools: false}}\n      - {model: chat, when: {tools: true}}\n")
    assert parse_catalog(text).routes[0].default == "chat-large"  # chat is standard, large cheap


def test_relative_weight_dirs_of_versions_start_at_the_catalog(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(HEAD + "      - name: v1\n        weights: {dir: models/v1}\n")
    assert load_catalog(tmp_path / "c.yaml").resolve("chat@v1").weights.dir == str(tmp_path.resolve() / "models/v1")


# --- fingerprint: a version's definition ------------------------------------------------------------------------

@pytest.mark.parametrize(("old", "new"), [
    ("max_num_seqs: 4, enforce_eager: false", "max_num_seqs: 8, enforce_eager: false"),
    ("max_num_seqs: 4, enforce_eager: false", "max_num_seqs: 4"),  # inherits the model's eager
    ("        traffic: 10\n", "        traffic: 20\n"),
    ("          - pause: 1m\n", "          - pause: 2m\n"),
    ("          - set_weight: 50\n", "          - set_weight: 40\n"),
    ("          - pause: 1m\n", ""),
    (f"        weights: {{prepared: {SMOL}}}\n        engine:", "        weights: {dir: /models/v2}\n        engine:"),
])
def test_fingerprint_changes_with_the_versions_definition(old: str, new: str) -> None:
    assert EXAMPLE.count(old) == 1
    before, after = parse_catalog(EXAMPLE).resolve("chat"), parse_catalog(EXAMPLE.replace(old, new)).resolve("chat")
    assert before.versions[0].fingerprint() == after.versions[0].fingerprint()  # v1 unchanged
    assert before.versions[1].fingerprint() != after.versions[1].fingerprint()


@pytest.mark.parametrize(("old", "new"), [
    ("        workers: 1\n", "        workers: 3\n"),  # more workers: the same version
    ("        traffic: 10\n", "        traffic: 10.0\n"),
    ("          - pause: 30s\n", "          - pause: 30\n"),
    ("          - pause: 1m\n", "          - pause: 60s\n"),
    ("    tier: standard\n", "    tier: premium\n"),
    ("    prices: {prompt_per_mtok: 0.1}\n", ""),
    ("    aliases: [chat-small]\n", "    aliases: [chat-small, chatty]\n"),
    ("max_error_rate: 0.02", "max_error_rate: 0.05"),
    ("    weights: {dir: /models/tiny}\n", "    weights: {dir: /models/tiny2}\n"),  # another model
    ("        engine: {max_num_seqs: 4, enforce_eager: false}\n",
     "        engine:  # the same options, written otherwise\n          enforce_eager: false\n"
     "          max_num_seqs: 4\n"),
])
def test_fingerprint_holds_when_the_version_is_the_same(old: str, new: str) -> None:
    assert EXAMPLE.count(old) == 1
    before, after = parse_catalog(EXAMPLE).resolve("chat"), parse_catalog(EXAMPLE.replace(old, new)).resolve("chat")
    assert [v.fingerprint() for v in before.versions] == [v.fingerprint() for v in after.versions]


def test_fingerprint_follows_the_models_engine_where_a_version_inherits_it() -> None:
    before = parse_catalog(EXAMPLE).resolve("chat")
    after = parse_catalog(EXAMPLE.replace("max_model_len: 2048", "max_model_len: 4096")).resolve("chat")
    assert all(a.fingerprint() != b.fingerprint() for a, b in zip(before.versions, after.versions, strict=True))
    # v2 gives its own enforce_eager: the model's changing leaves v2 as it was.
    after = parse_catalog(EXAMPLE.replace("enforce_eager: true", "enforce_eager: false")).resolve("chat")
    assert before.versions[0].fingerprint() != after.versions[0].fingerprint()
    assert before.versions[1].fingerprint() == after.versions[1].fingerprint()


# --- durations --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "seconds"), [
    (30, 30.0), (0, 0.0), (1.5, 1.5), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("1m30s", 90.0),
    ("1h30m", 5400.0), ("1h0m5s", 3605.0), ("0.5s", 0.5), ("1.5h", 5400.0), (" 2m ", 120.0), ("0s", 0.0),
    ("720h", 30 * 86_400.0), (30 * 86_400, 30 * 86_400.0),
])
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", [
    "90", "", " ", "s", "m", "5 min", "5min", "30 s", "30S", "1d", "500ms", "1s1m", "30s5m", "1h1h", "-5s", "+5s",
    "1e3s", "1,5s", -1, float("inf"), float("nan"), True, None, [30], "721h", 30 * 86_400 + 1,
])
def test_not_durations(value: object) -> None:
    assert parse_duration(value) is None


@pytest.mark.parametrize(("step", "expected"), [
    ("{pause: 5 min}", "c.yaml:9: models[0].versions[1].rollout[0].pause: expected a duration (30, 30s, 5m, 1h, "
                       "1m30s), got '5 min'"),
    ("{pause: '90'}", "c.yaml:9: models[0].versions[1].rollout[0].pause: expected a duration (30, 30s, 5m, 1h, "
                      "1m30s), got '90'"),
    ("{pause: -1}", "c.yaml:9: models[0].versions[1].rollout[0].pause: expected a duration (30, 30s, 5m, 1h, "
                    "1m30s), got -1"),
    ("{pause: [1]}", "c.yaml:9: models[0].versions[1].rollout[0].pause: expected a scalar, got a list"),
    ("{pause: 800h}", "c.yaml:9: models[0].versions[1].rollout[0].pause: must be at most 30 days, got '800h'"),
    ("{pause: 2592001}", "c.yaml:9: models[0].versions[1].rollout[0].pause: must be at most 30 days, got 2592001"),
])
def test_a_wrong_pause_names_its_step(step: str, expected: str) -> None:
    assert problems(HEAD + V1 + V2 + f"        rollout: [{step}]\n") == [expected]


# --- validation: each rule names the line and the field ---------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    # weights and workers in each version, not at the model level
    (f"models:\n  - name: chat\n    weights: {{prepared: {SMOL}}}\n    workers: 2\n    stable: v1\n    versions:\n"
     + V1,
     ["c.yaml:3: models[0].weights: a model with versions gives its weights and workers in each version",
      "c.yaml:4: models[0].workers: a model with versions gives its weights and workers in each version"]),
    (HEAD + "      - name: v1\n",
     ["c.yaml:5: models[0].versions[0].weights: required"]),
    (HEAD + V1 + "        workers: 65\n",
     ["c.yaml:7: models[0].versions[0].workers: must be within 0..64, got 65"]),
    # stable and rollback only with versions
    ("models:\n  - name: x\n    weights: {dir: /m}\n    stable: v1\n    rollback: {window_s: 30}\n",
     ["c.yaml:4: models[0].stable: only a model with versions has this",
      "c.yaml:5: models[0].rollback: only a model with versions has this"]),
    # the stable version
    ("models:\n  - name: chat\n    versions:\n" + V1,
     ["c.yaml:2: models[0].stable: required"]),
    (HEAD.replace("stable: v1", "stable: v3") + V1 + V2,
     ["c.yaml:3: models[0].stable: no version is named 'v3'; known: v1, v2"]),
    (HEAD.replace("stable: v1", "stable: stabel") + V1.replace("v1", "stable"),
     ["c.yaml:3: models[0].stable: no version is named 'stabel' (did you mean 'stable'?)"]),
    (HEAD + V1 + "        traffic: 10\n" + V2,
     ["c.yaml:7: models[0].versions[0].traffic: the stable version takes the traffic the canaries leave: it has no "
      "traffic or rollout of its own"]),
    (HEAD + V1 + "        rollout:\n          - set_weight: 10\n",
     ["c.yaml:8: models[0].versions[0].rollout: the stable version takes the traffic the canaries leave: it has no "
      "traffic or rollout of its own"]),
    # the versions
    ("models:\n  - name: chat\n    stable: v1\n    versions: []\n",
     ["c.yaml:4: models[0].versions: at least one version is required"]),
    ("models:\n  - name: chat\n    stable: v1\n    versions: {v1: {}}\n",
     ["c.yaml:4: models[0].versions: expected a list, got a mapping"]),
    ("models:\n  - name: chat\n    stable: v1\n    versions:\n",
     ["c.yaml:4: models[0].versions: expected a list, got nothing"]),
    (HEAD + V1 + V1,
     ["c.yaml:7: models[0].versions[1].name: the version 'v1' is given already (models[0].versions[0].name, line 5)"]),
    (HEAD + V1 + f"      - weights: {{prepared: {SMOL}}}\n",  # no "no version is named" besides
     ["c.yaml:7: models[0].versions[1].name: required"]),
    (HEAD + V1 + V2.replace("v2", "'v 2'"),
     ["c.yaml:7: models[0].versions[1].name: 'v 2' is no valid name (1-64 characters: letters, digits and . _ -, "
      "starting with a letter or digit)"]),
    (HEAD + V1 + V2.replace("v2", "a/b"),
     ["c.yaml:7: models[0].versions[1].name: 'a/b' is no valid name (1-64 characters: letters, digits and . _ -, "
      "starting with a letter or digit)"]),
    (HEAD + V1 + V2.replace("v2", "v@2"),
     ["c.yaml:7: models[0].versions[1].name: 'v@2' is no valid name (1-64 characters: letters, digits and . _ -, "
      "starting with a letter or digit)"]),
    (HEAD + V1 + V2.replace("v2", "2"), ["c.yaml:7: models[0].versions[1].name: expected a string, got 2 (quote it)"]),
    (HEAD + V1 + "        aliases: [x]\n        tier: premium\n",
     ["c.yaml:7: models[0].versions[0].aliases: unknown key; known: name, weights, engine, workers, traffic, "
      "rollout",
      "c.yaml:8: models[0].versions[0].tier: unknown key; known: name, weights, engine, workers, traffic, rollout"]),
    (HEAD + "      - v1\n", ["c.yaml:5: models[0].versions[0]: expected a mapping, got a string"]),
    (HEAD + V1 + f"        weights: {{prepared: {QWEN}}}\n",
     ["c.yaml:7: models[0].versions[0].weights: duplicate key (first given on line 6)"]),
    ("models:\n  - name: chat\n    task: embed\n    stable: v1\n    versions:\n" + V1,
     [f"c.yaml:7: models[0].versions[0].weights.prepared: {SMOL} is a generate model, and the task is embed"]),
    # engine options: the model's are checked once, a version's in its own place
    ("models:\n  - name: chat\n    stable: v1\n    engine: {dtype: fp8}\n    versions:\n" + V1 + V2,
     ["c.yaml:4: models[0].engine.dtype: expected one of auto, bfloat16, float16, float32, got 'fp8'"]),
    (HEAD + V1 + V2 + "        engine: {max_num_seqs: 0, max_model_lenght: 10}\n",
     ["c.yaml:9: models[0].versions[1].engine.max_num_seqs: must be within 1..65536, got 0",
      "c.yaml:9: models[0].versions[1].engine.max_model_lenght: unknown key (did you mean 'max_model_len'?)"]),
    # a canary's traffic and rollout
    (HEAD + V1 + V2 + "        traffic: 120\n",
     ["c.yaml:9: models[0].versions[1].traffic: must be >= 0 and <= 100, got 120"]),
    (HEAD + V1 + V2 + "        traffic: ten\n",
     ["c.yaml:9: models[0].versions[1].traffic: expected a number, got 'ten'"]),
    (HEAD + V1 + V2 + "        rollout: {set_weight: 10}\n",
     ["c.yaml:9: models[0].versions[1].rollout: expected a list, got a mapping"]),
    (HEAD + V1 + V2 + "        rollout:\n          - 10\n          - {}\n          - {set_weight: 10, pause: 5m}\n"
     "          - {set_wieght: 10}\n          - {set_weight: 101}\n          - {pause: 1m, wait: 1}\n",
     ["c.yaml:10: models[0].versions[1].rollout[0]: expected a mapping, got an integer",
      "c.yaml:11: models[0].versions[1].rollout[1]: a step is one of set_weight (percent) and pause (a duration: "
      "30s, 5m, 1h)",
      "c.yaml:12: models[0].versions[1].rollout[2]: a step is one of set_weight (percent) and pause (a duration: "
      "30s, 5m, 1h)",
      "c.yaml:13: models[0].versions[1].rollout[3].set_wieght: unknown key (did you mean 'set_weight'?)",
      "c.yaml:14: models[0].versions[1].rollout[4].set_weight: must be >= 0 and <= 100, got 101",
      "c.yaml:15: models[0].versions[1].rollout[5].wait: unknown key; known: set_weight, pause"]),
    # the canaries' traffic adds up to at most 100, at every step of every rollout (each on its own clock)
    (HEAD + V1 + V2 + "        traffic: 60\n" + V2.replace("v2", "v3") + "        traffic: 50\n",
     ["c.yaml:12: models[0].versions[2].traffic: the canaries' traffic adds up to 110 % at their largest weights "
      "(v2 60, v3 50); at most 100"]),
    (HEAD + V1 + V2 + "        rollout: [{set_weight: 60}, {pause: 1m}, {set_weight: 30}]\n"
     + V2.replace("v2", "v3") + "        traffic: 10\n        rollout: [{pause: 1m}, {set_weight: 50}]\n",
     ["c.yaml:13: models[0].versions[2].rollout[1].set_weight: the canaries' traffic adds up to 110 % at their "
      "largest weights (v2 60, v3 50); at most 100"]),
    (HEAD + V1 + V2 + "        traffic: 30\n" + V2.replace("v2", "v3") + "        traffic: 30\n"
     + V2.replace("v2", "v4") + "        rollout: [{set_weight: 41}]\n",
     ["c.yaml:15: models[0].versions[3].rollout[0].set_weight: the canaries' traffic adds up to 101 % at their "
      "largest weights (v2 30, v3 30, v4 41); at most 100"]),
    # the rollback thresholds
    (HEAD + V1 + "    rollback: {window_s: 0, min_requests: 0, max_error_rate: 2, max_ttft_ratio: 0.5, "
     "max_tpot_ratio: 1001, max_tpot: 2}\n",
     ["c.yaml:7: models[0].rollback.window_s: must be > 0 and <= 86400, got 0",
      "c.yaml:7: models[0].rollback.min_requests: must be within 1..1000000, got 0",
      "c.yaml:7: models[0].rollback.max_error_rate: must be >= 0 and <= 1, got 2",
      "c.yaml:7: models[0].rollback.max_ttft_ratio: must be >= 1 and <= 1000, got 0.5",
      "c.yaml:7: models[0].rollback.max_tpot_ratio: must be >= 1 and <= 1000, got 1001",
      "c.yaml:7: models[0].rollback.max_tpot: unknown key (did you mean 'max_tpot_ratio'?)"]),
    (HEAD + V1 + "    rollback: [1]\n", ["c.yaml:7: models[0].rollback: expected a mapping, got a list"]),
])
def test_each_version_rule_names_line_and_field(text: str, expected: list[str]) -> None:
    assert problems(text) == expected


def test_canaries_traffic_may_add_up_to_100() -> None:
    text = (HEAD + V1 + V2 + "        traffic: 10\n        rollout: [{set_weight: 40}, {pause: 1h}]\n"
            + V2.replace("v2", "v3") + "        traffic: 60\n")
    c = parse_catalog(text)
    assert [v.traffic for v in c.resolve("chat").canaries] == [10.0, 60.0]
    assert version(text, "chat@v2").rollout == (RolloutStep(set_weight=40), RolloutStep(pause_s=3600))
    # A lone canary may take it all; the stable version may say `traffic: 0`.
    assert version(HEAD + V1 + "        traffic: 0\n" + V2 + "        traffic: 100\n", "chat@v2").traffic == 100


AT = "@ pins a version in a request's model (NAME@VERSION), it is no part of a name"
RULE = "1-128 characters: letters, digits and . _ : / + -, starting with a letter or digit"


@pytest.mark.parametrize(("text", "expected"), [
    ("models:\n  - name: chat@v1\n    weights: {dir: /m}\n",
     [f"c.yaml:2: models[0].name: 'chat@v1' is no valid name ({RULE}); {AT}"]),
    ("models:\n  - name: chat\n    weights: {dir: /m}\n    aliases: [chat-small@v1, 'a b']\n",
     [f"c.yaml:4: models[0].aliases[0]: 'chat-small@v1' is no valid name ({RULE}); {AT}",
      f"c.yaml:4: models[0].aliases[1]: 'a b' is no valid name ({RULE})"]),
    ("models:\n  - name: '@v1'\n    weights: {dir: /m}\n",
     [f"c.yaml:2: models[0].name: '@v1' is no valid name ({RULE})"]),
    # routes and fallback chains name models, not versions
    (HEAD + V1 + "routes:\n  - {name: auto@v1, default: chat}\n",
     [f"c.yaml:8: routes[0].name: 'auto@v1' is no valid name ({RULE}); {AT}"]),
    (HEAD + V1 + "routes:\n  - name: auto\n    default: chat@v1\n    rules:\n      - {model: chat@v1, when: "
     "{tools: true}}\n",
     [f"c.yaml:9: routes[0].default: 'chat@v1' is no valid name ({RULE}); {AT}",
      f"c.yaml:11: routes[0].rules[0].model: 'chat@v1' is no valid name ({RULE}); {AT}"]),
    (HEAD + V1 + "  - {name: b, weights: {dir: /m}}\nfallbacks:\n  - chain: [b, chat@v1]\n",
     [f"c.yaml:9: fallbacks[0].chain[1]: 'chat@v1' is no valid name ({RULE}); {AT}"]),
    # the versioned model's names are in the one namespace as any model's
    (HEAD + V1 + "  - {name: b, weights: {dir: /m}, aliases: [chat]}\n",
     ["c.yaml:7: models[1].aliases[0]: the name 'chat' is already used by models[0].name (line 2); models, "
      "aliases and routes share one namespace"]),
])
def test_at_is_no_part_of_a_name(text: str, expected: list[str]) -> None:
    assert problems(text) == expected


def test_every_problem_of_a_versioned_model_at_once_in_line_order() -> None:
    assert problems(f"""\
        models:
          - name: chat
            weights: {{prepared: {SMOL}}}
            stable: v1
            versions:
              - name: v1
                weights: {{prepared: {SMOL}}}
                traffic: 5
              - name: v2
                weights: {{prepared: SmolLM}}
                rollout: [{{set_weight: 10}}, {{pause: soon}}]
            rollback: {{windows: 60}}
        """) == [
        "c.yaml:3: models[0].weights: a model with versions gives its weights and workers in each version",
        "c.yaml:8: models[0].versions[0].traffic: the stable version takes the traffic the canaries leave: it has no "
        "traffic or rollout of its own",
        f"c.yaml:10: models[0].versions[1].weights.prepared: `infermesh prepare-model` knows no model 'SmolLM' (did "
        f"you mean '{SMOL}'?)",
        "c.yaml:11: models[0].versions[1].rollout[1].pause: expected a duration (30, 30s, 5m, 1h, 1m30s), got 'soon'",
        "c.yaml:12: models[0].rollback.windows: unknown key (did you mean 'window_s'?)",
    ]


# --- the example catalog and the docs ---------------------------------------------------------------------------

def test_the_canary_catalog_parses() -> None:
    c = load_catalog(CANARY)
    chat = c.resolve("chat-small")
    assert chat.name == SMOL and chat.stable == "v1" and [v.version for v in chat.versions] == ["v1", "v2"]
    v1, v2 = chat.versions
    assert v1.weights == v2.weights and v1.weights.prepared == SMOL  # the same weights ...
    assert v1.engine != v2.engine  # ... other engine options
    assert v1.traffic == 0 and v1.rollout == () and v2.rollout
    assert v2.rollout[-1].pause_s is not None  # the last weight holds a while before the promotion
    assert c.lookup(f"{SMOL}@v2") is v2 and c.lookup("chat-small@v2") is v2
    assert all(v.workers >= 1 and v.engine.enforce_eager for v in chat.versions)
    assert [m.name for m in c.served_models()] == [f"{SMOL}@v1", f"{SMOL}@v2"]


def test_the_docs_versions_example_parses() -> None:
    page = (ROOT / "docs" / "catalog.md").read_text()
    section = page.split("## Versions, canaries and rollback\n", 1)[1].split("\n## ", 1)[0]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    c = parse_catalog(example, "docs/catalog.md")
    chat = c.resolve("chat")
    assert c.lookup("chat-small@v2") is chat.versions[1] and chat.canaries[0].rollout
