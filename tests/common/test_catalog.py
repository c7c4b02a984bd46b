"""The model catalog: its format, every validation rule (line and field named), and resolution
(reload: test_catalog_reload.py)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from infermesh.common.catalog import (
    Catalog,
    CatalogError,
    EngineOptions,
    RequestFacts,
    RouteRule,
    load_catalog,
    parse_catalog,
)
from infermesh.common.errors import NotFound

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "deploy" / "catalog" / "demo.yaml"
SMOL, QWEN, MINILM = "SmolLM2-135M-Instruct", "Qwen2.5-Coder-0.5B-Instruct", "all-MiniLM-L6-v2"

# Two generate models and an embed model; the tests below add to it (line 1 is `models:`).
MODELS = f"""\
models:
  - name: small
    weights: {{prepared: {SMOL}}}
    aliases: [s]
  - name: large
    weights: {{prepared: {QWEN}}}
    tier: standard
  - name: emb
    task: embed
    weights: {{prepared: {MINILM}}}
"""


def problems(text: str) -> list[str]:
    """The problems of a catalog text, as `c.yaml:LINE: field: message`."""
    with pytest.raises(CatalogError) as info:
        parse_catalog(textwrap.dedent(text), "c.yaml")
    assert str(info.value) == "\n".join(str(p) for p in info.value.problems)
    return [str(p) for p in info.value.problems]


# --- the demo catalog ------------------------------------------------------------------------------------------

def test_demo_catalog_parses_and_resolves() -> None:
    c = load_catalog(DEMO)
    assert c.served_names() == (SMOL, "chat-small", QWEN, "chat-large", MINILM, "auto")
    assert c.resolve("chat-small").name == SMOL
    assert c.resolve("chat-large").name == QWEN
    assert c.resolve(SMOL) is c.resolve("chat-small")
    assert c.lookup("auto") is c.routes[0] and c.routes[0].name == "auto"
    assert c.resolve("auto").name == SMOL  # the cheap tier by default
    assert [m.name for m in c.fallbacks("chat-large")] == [SMOL]
    assert [m.name for m in c.fallbacks(QWEN)] == [SMOL]
    assert c.fallbacks("chat-small") == [] and c.fallbacks(MINILM) == []
    assert [m.name for m in c.models_for_task("generate")] == [SMOL, QWEN]
    assert [m.name for m in c.models_for_task("embed")] == [MINILM]
    assert c.resolve("chat-small").tier == "cheap" and c.resolve("chat-large").tier == "standard"
    large = c.resolve("chat-large")
    assert large.engine.max_model_len == 2048 and large.engine.enforce_eager is True
    assert all(m.engine.enforce_eager and m.workers == 1 for m in c.models)
    assert c.source == str(DEMO) and len(c.digest) == 64


@pytest.mark.parametrize(("facts", "model"), [
    (RequestFacts(text="Tell me a story"), SMOL),
    (RequestFacts(text="Fix this Python CODE please"), QWEN),
    (RequestFacts(text="my decoder ring"), SMOL),  # whole words only: "decoder" is no "code"
    (RequestFacts(tools=True), QWEN),
    (RequestFacts(response_format=True), QWEN),
    (RequestFacts(prompt_tokens=1025), QWEN),
    (RequestFacts(prompt_tokens=1024), SMOL),
    (RequestFacts(max_tokens=600), QWEN),
    (RequestFacts(turns=9), QWEN),
    (RequestFacts(tier="standard"), QWEN),
    (RequestFacts(tier="cheap", text="write code", tools=True), SMOL),  # an explicit tier comes first
])
def test_demo_route_picks_per_request(facts: RequestFacts, model: str) -> None:
    assert load_catalog(DEMO).resolve("auto", facts).name == model


def test_without_a_catalog_the_default_model_alone() -> None:
    c = Catalog.default()
    assert c.served_names() == (SMOL,) and c.resolve(SMOL).weights.prepared == SMOL
    assert c.routes == () and c.chains == () and c.fallbacks(SMOL) == []
    assert Catalog.default("mine=/models/x").resolve("mine").weights.dir == "/models/x"
    assert Catalog.default("/models/other").served_names() == ("other",)


def test_unknown_names_and_routes_in_the_helpers() -> None:
    c = load_catalog(DEMO)
    with pytest.raises(NotFound, match="`gpt-4` does not exist"):
        c.resolve("gpt-4")
    assert c.lookup("gpt-4") is None
    with pytest.raises(ValueError, match="is a route"):
        c.fallbacks("auto")


def test_engine_options_as_worker_flags() -> None:
    options = EngineOptions(max_model_len=2048, kv_cache_gb=0.5, enforce_eager=False, dtype="bfloat16")
    assert options.worker_args() == ["--max-model-len", "2048", "--kv-cache-gb", "0.5", "--no-enforce-eager",
                                     "--dtype", "bfloat16"]
    assert EngineOptions().worker_args() == []


def test_rule_conditions_all_hold() -> None:
    rule = RouteRule("x", prompt_tokens_over=10, keywords=("c++", "sql"), tiers=("premium",))
    assert rule.matches(RequestFacts(prompt_tokens=11, text="some SQL", tier="premium"))
    assert rule.matches(RequestFacts(prompt_tokens=11, text="in c++.", tier="premium"))
    assert not rule.matches(RequestFacts(prompt_tokens=11, text="some SQL"))  # no tier asked
    assert not rule.matches(RequestFacts(prompt_tokens=10, text="some SQL", tier="premium"))
    assert not rule.matches(RequestFacts(prompt_tokens=11, text="sqlite", tier="premium"))


# --- validation: each rule names the line and the field ---------------------------------------------------------

def test_many_problems_reported_at_once_in_line_order() -> None:
    assert problems(f"""\
        format: 2
        models:
          - name: a
            weights: {{prepared: {SMOL}}}
            aliases: [a]
            tier: chep
            engine: {{max_model_len: 8, kv_cache_gb: -1, enforce_eagr: true}}
            workers: "2"
          - task: generate
            weights: {{prepared: {QWEN}}}
        extra: 1
        """) == [
        "c.yaml:1: format: this infermesh reads catalog format 1, got 2",
        "c.yaml:5: models[0].aliases[0]: the name 'a' is already used by models[0].name (line 3); models, "
        "aliases and routes share one namespace",
        "c.yaml:6: models[0].tier: expected one of cheap, standard, premium, got 'chep' (did you mean 'cheap'?)",
        "c.yaml:7: models[0].engine.max_model_len: must be within 16..10000000, got 8",
        "c.yaml:7: models[0].engine.kv_cache_gb: must be > 0 and <= 4096, got -1",
        "c.yaml:7: models[0].engine.enforce_eagr: unknown key (did you mean 'enforce_eager'?)",
        "c.yaml:8: models[0].workers: expected an integer, got '2'",
        "c.yaml:9: models[1].name: required",
        "c.yaml:11: extra: unknown key; known: format, models, routes, fallbacks, cooldown",
    ]


@pytest.mark.parametrize(("extra", "expected"), [
    # one namespace: models, aliases and routes
    ("routes:\n  - {name: s, default: small}\n",
     "c.yaml:13: routes[0].name: the name 's' is already used by models[0].aliases[0] (line 4); models, aliases "
     "and routes share one namespace"),
    ("routes:\n  - {name: large, default: small}\n",
     "c.yaml:13: routes[0].name: the name 'large' is already used by models[1].name (line 5); models, aliases "
     "and routes share one namespace"),
    # route targets: existing generate models
    ("routes:\n  - name: auto\n    default: smal\n",
     "c.yaml:14: routes[0].default: no model or alias is named 'smal' (did you mean 'small'?)"),
    ("routes:\n  - name: auto\n    default: emb\n",
     "c.yaml:14: routes[0].default: 'emb' is an embed model; a route picks generate models"),
    ("routes:\n  - {name: r1, default: small}\n  - {name: r2, default: r1}\n",
     "c.yaml:14: routes[1].default: 'r1' is a route; a route names models or aliases"),
    ("routes:\n  - name: auto\n",
     "c.yaml:13: routes[0]: a route needs a default or at least one rule"),
    ("routes:\n  - name: auto\n    rules: []\n",
     "c.yaml:13: routes[0]: a route needs a default or at least one rule"),
    ("routes:\n  - name: auto\n    rules:\n      - model: large\n        when: {}\n",
     "c.yaml:16: routes[0].rules[0].when: a rule needs at least one condition (the route's default serves the rest)"),
    ("routes:\n  - name: auto\n    rules:\n      - model: large\n        when: {tier: gold}\n",
     "c.yaml:16: routes[0].rules[0].when.tier: expected one of cheap, standard, premium, got 'gold'"),
    ("routes:\n  - name: auto\n    rules:\n      - model: large\n        when: {promt_tokens_over: 5}\n",
     "c.yaml:16: routes[0].rules[0].when.promt_tokens_over: unknown key (did you mean 'prompt_tokens_over'?)"),
    ("routes:\n  - name: auto\n    rules:\n      - model: large\n        when: {turns_over: -1}\n",
     "c.yaml:16: routes[0].rules[0].when.turns_over: must be within 0..100000, got -1"),
    ("routes:\n  - name: auto\n    rules:\n      - when: {tools: true}\n",
     "c.yaml:15: routes[0].rules[0].model: required"),
    # fallback chains
    ("fallbacks:\n  - chain: [large, nobody]\n",
     "c.yaml:13: fallbacks[0].chain[1]: no model or alias is named 'nobody'; known: small, s, large, emb"),
    ("fallbacks:\n  - chain: [large]\n",
     "c.yaml:13: fallbacks[0].chain: a chain names at least two models"),
    ("fallbacks:\n  - chain: [large, emb]\n",
     "c.yaml:13: fallbacks[0].chain[1]: 'emb' is an embed model; the chain's first is generate"),
    ("fallbacks:\n  - chain: [large, s, small]\n",
     "c.yaml:13: fallbacks[0].chain[2]: 'small' is in this chain already (fallbacks[0].chain[1], line 13): "
     "a fallback cycle"),
    ("fallbacks:\n  - chain: [large, small]\n  - chain: [s, large]\n",
     "c.yaml:14: fallbacks[1].chain[1]: a fallback cycle: small -> large -> small"),
    ("fallbacks:\n  - chain: [large, small]\n  - chain:\n      - large\n      - emb2\n",
     "c.yaml:16: fallbacks[1].chain[1]: no model or alias is named 'emb2' (did you mean 'emb'?)"),
    ("routes:\n  - {name: auto, default: small}\nfallbacks:\n  - chain: [auto, small]\n",
     "c.yaml:15: fallbacks[0].chain[0]: 'auto' is a route; a fallback chain names models or aliases"),
    ("fallbacks:\n  - {chain: [large, small], on: [errors]}\n",
     "c.yaml:13: fallbacks[0].on: unknown key; known: chain"),
    # cooldown
    ("cooldown: {failures: 0, window_s: .inf, skip: 1}\n",
     "c.yaml:12: cooldown.failures: must be within 1..10000, got 0\n"
     "c.yaml:12: cooldown.window_s: expected a number, got inf\n"
     "c.yaml:12: cooldown.skip: unknown key (did you mean 'skip_s'?)"),
])
def test_each_rule_names_line_and_field(extra: str, expected: str) -> None:
    assert problems(MODELS + "\n" + extra) == expected.split("\n")


def test_chains_agree_or_conflict_across_the_file() -> None:
    assert problems(MODELS + "fallbacks:\n  - chain: [large, small]\n  - chain: [large, s]\n  - chain: [s, large]\n"
                    "  - chain: [large, emb]\n") == [  # [large, s] says again what [large, small] said: fine
        "c.yaml:14: fallbacks[2].chain[1]: a fallback cycle: small -> large -> small",
        "c.yaml:15: fallbacks[3].chain[1]: 'emb' is an embed model; the chain's first is generate",
    ]
    all_generate = MODELS.replace("    task: embed\n", "").replace(MINILM, SMOL)
    assert problems(all_generate + "fallbacks:\n  - chain: [large, small]\n  - chain: [large, emb]\n") == [
        "c.yaml:12: fallbacks[1].chain[1]: 'large' falls back to 'small' already (fallbacks[0].chain[1], line 11); "
        "a model has one fallback",
    ]
    chained = parse_catalog(all_generate + "fallbacks:\n  - chain: [large, small]\n  - chain: [small, emb]\n")
    assert [m.name for m in chained.fallbacks("large")] == ["small", "emb"]  # chains compose


@pytest.mark.parametrize(("model", "expected"), [
    ("  - name: x\n", ["c.yaml:2: models[0].weights: required"]),
    (f"  - name: x\n    weights: {{prepared: {SMOL}, dir: /m}}\n",
     ["c.yaml:3: models[0].weights: give exactly one of prepared (a model `infermesh prepare-model` knows) and dir "
      "(a Hugging Face model directory)"]),
    ("  - name: x\n    weights: {prepared: SmolLM2}\n",
     [f"c.yaml:3: models[0].weights.prepared: `infermesh prepare-model` knows no model 'SmolLM2' (did you mean "
      f"'{SMOL}'?)"]),
    (f"  - name: x\n    task: embed\n    weights: {{prepared: {SMOL}}}\n",
     [f"c.yaml:4: models[0].weights.prepared: {SMOL} is a generate model, and the task is embed"]),
    ("  - name: x\n    task: rerank\n    weights: {dir: /m}\n",
     ["c.yaml:3: models[0].task: expected one of generate, embed, got 'rerank'"]),
    ("  - name: 'bad name'\n    weights: {dir: /m}\n",
     ["c.yaml:2: models[0].name: 'bad name' is no valid name (1-128 characters: letters, digits and . _ : / + -, "
      "starting with a letter or digit)"]),
    ("  - name: no\n    weights: {dir: /m}\n", ["c.yaml:2: models[0].name: expected a string, got False (quote it)"]),
    ("  - name: x\n    weights: {dir: /m}\n    workers: true\n",
     ["c.yaml:4: models[0].workers: expected an integer, got True"]),
    ("  - name: x\n    weights: {dir: /m}\n    prices: {prompt_per_mtok: -1, completion: 2}\n",
     ["c.yaml:4: models[0].prices.prompt_per_mtok: must be >= 0 and <= 1e+06, got -1",
      "c.yaml:4: models[0].prices.completion: unknown key (did you mean 'completion_per_mtok'?)"]),
    ("  - name: x\n    weights: {dir: /m}\n    engine: [1]\n",
     ["c.yaml:4: models[0].engine: expected a mapping, got a list"]),
    ("  - name: x\n    weights: {dir: /m}\n    aliases: [y, {z: 1}]\n",
     ["c.yaml:4: models[0].aliases[1]: expected a string, got a mapping"]),
    ("  - name: x\n    weights: {dir: /m}\n    colour: red\n",
     ["c.yaml:4: models[0].colour: unknown key; known: name, task, weights, aliases, tier, prices, engine, "
      "workers, versions, stable, rollback"]),
    ("  - name: x\n    name: y\n    weights: {dir: /m}\n",
     ["c.yaml:3: models[0].name: duplicate key (first given on line 2)"]),
])
def test_model_fields(model: str, expected: list[str]) -> None:
    assert problems("models:\n" + model) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("", ["c.yaml:1: models: required (the file is empty)"]),
    ("- a\n", ["c.yaml:1: expected a mapping, got a list"]),
    ("models: []\n", ["c.yaml:1: models: at least one model is required"]),
    ("models: {}\n", ["c.yaml:1: models: expected a list, got a mapping"]),
    ("models:\n  - name: x\n    weights: {dir: /m\n",
     ["c.yaml:4: yaml: while parsing a flow mapping: expected ',' or '}', but got '<stream end>'"]),
    ("routes: []\n", ["c.yaml:1: models: required"]),
])
def test_whole_file_problems(text: str, expected: list[str]) -> None:
    assert problems(text) == expected


def test_unreadable_and_not_utf8(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match=r"^.*missing\.yaml: cannot read the catalog: No such file"):
        load_catalog(tmp_path / "missing.yaml")
    (tmp_path / "latin.yaml").write_bytes(b"models: [\xe9]\n")
    with pytest.raises(CatalogError, match="latin.yaml: not UTF-8 text"):
        load_catalog(tmp_path / "latin.yaml")


def test_relative_dirs_start_at_the_catalog_and_anchors_are_shared(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(textwrap.dedent("""\
        x-engine: &small {enforce_eager: true, max_model_len: 1024}
        models:
          - name: a
            weights: {dir: models/a}
            engine: *small
          - name: b
            weights: {dir: ~/b}
            engine: {<<: *small, max_num_seqs: 4}
        routes:
          - name: auto
            rules:
              - {model: b, when: {tools: true}}
              - {model: a, when: {tier: premium}}
        """))
    c = load_catalog(tmp_path / "c.yaml")
    assert c.resolve("a").weights.dir == str(tmp_path.resolve() / "models" / "a")
    assert c.resolve("b").weights.dir == str(Path("~/b").expanduser())
    assert c.resolve("b").engine == EngineOptions(max_model_len=1024, max_num_seqs=4, enforce_eager=True)
    assert c.routes[0].default == "b"  # no default: the first target of the cheapest tier


def test_the_example_in_the_docs_parses() -> None:
    page = (ROOT / "docs" / "catalog.md").read_text()
    example = page.split("```yaml\n", 1)[1].split("```", 1)[0]
    c = parse_catalog(example, "docs/catalog.md")
    assert c.served_names() == load_catalog(DEMO).served_names()
    assert c.resolve("auto", RequestFacts(text="some SQL")).name == QWEN
