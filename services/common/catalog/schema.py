"""The catalog's types: models, weights, prices, engine options, routes and their rules, fallback
chains, the cooldown, and `Catalog` with its lookups (aliases followed, routes applied); and the
problems a file can have (`Problem`, `CatalogError`)."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from infermesh.common.errors import NotFound
from infermesh.common.model_prep import model_dir, parse_model_spec
from infermesh.common.model_sources import DEFAULT_MODEL_NAME

FORMAT = 1
TASKS = ("generate", "embed")
TIERS = ("cheap", "standard", "premium")  # cheapest first
DTYPES = ("auto", "bfloat16", "float16", "float32")
TIER_HEADER = "x-infermesh-tier"  # the header in which a client asks for a tier (a route's `tier` condition)
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+-]{0,127}")
NAME_RULE = "1-128 characters: letters, digits and . _ : / + -, starting with a letter or digit"
VERSION_SEP = "@"  # `NAME@VERSION`: one version of a model (a pin in `model`, the name its workers serve)
VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
VERSION_RULE = "1-64 characters: letters, digits and . _ -, starting with a letter or digit"


@dataclass(frozen=True)
class Problem:
    """One problem in a catalog file: where, which field, what."""

    source: str
    line: int  # 1-based; 0 when the problem has no line (an unreadable file)
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class CatalogError(Exception):
    """The catalog is invalid; `problems` lists every problem, one per line of the message."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# --- the catalog's types ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Weights:
    """Where a model's weights come from: exactly one of a prepared model's name and a Hugging Face directory."""

    prepared: str = ""  # a model `infermesh prepare-model` knows by name
    dir: str = ""  # a Hugging Face model directory (absolute; `~` expanded, relative to the catalog's folder)

    def describe(self) -> str:
        return f"prepared:{self.prepared}" if self.prepared else self.dir

    def path(self) -> Path:
        """The model directory: a prepared model's (under $INFERMESH_HOME/models), or the directory given."""
        return model_dir(self.prepared) if self.prepared else Path(self.dir)


@dataclass(frozen=True)
class Prices:
    """Prices per million tokens, in one currency across the catalog."""

    prompt_per_mtok: float = 0.0
    completion_per_mtok: float = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int = 0) -> float:
        return (prompt_tokens * self.prompt_per_mtok + completion_tokens * self.completion_per_mtok) / 1e6


@dataclass(frozen=True)
class EngineOptions:
    """A model's engine options; None leaves the worker's own default. Each is the worker flag of the same name."""

    max_model_len: int | None = None
    max_num_seqs: int | None = None
    kv_cache_gb: float | None = None
    enforce_eager: bool | None = None
    dtype: str | None = None
    block_size: int | None = None
    tensor_parallel_size: int | None = None

    def worker_args(self) -> list[str]:
        """The options as `infermesh worker` flags, e.g. ['--max-model-len', '2048', '--enforce-eager']."""
        args: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                args.append(flag if value else "--no-" + f.name.replace("_", "-"))
            elif value is not None:
                args += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
        return args


@dataclass(frozen=True)
class RolloutStep:
    """One step of a canary's progressive rollout: set its traffic (percent), or pause (seconds)."""

    set_weight: float | None = None
    pause_s: float | None = None


@dataclass(frozen=True)
class Rollback:
    """When a canary is rolled back: over the last `window_s` seconds, with at least `min_requests` of its
    requests, its error rate above `max_error_rate` (and above the stable version's), or its p95 time to
    first token / time per output token above `max_ttft_ratio` / `max_tpot_ratio` times the stable
    version's (which then needs `min_requests` too)."""

    window_s: float = 60.0
    min_requests: int = 100
    max_error_rate: float = 0.01
    max_ttft_ratio: float = 1.5
    max_tpot_ratio: float = 1.5


@dataclass(frozen=True)
class ModelEntry:
    """One model the mesh serves; or one version of a versioned model (`model` and `version` set).

    A versioned model lists its `versions`, each a ModelEntry named `MODEL@VERSION` with its own weights,
    engine options and workers (the name its workers and tokenizer serve). `stable` names the version that
    takes the traffic the canaries leave and that a canary's failed request is retried on. The model's own
    `weights` and `engine` are the stable version's, and its `workers` 0.
    """

    name: str
    weights: Weights
    task: str = "generate"
    aliases: tuple[str, ...] = ()
    tier: str = "cheap"
    prices: Prices = Prices()
    engine: EngineOptions = EngineOptions()
    workers: int = 1  # how many workers `infermesh up` starts for it (0: they run elsewhere)
    versions: tuple[ModelEntry, ...] = ()
    stable: str = ""
    rollback: Rollback = Rollback()
    # A version's own fields:
    model: str = ""  # the versioned model's name
    version: str = ""
    traffic: float = 0.0  # a canary's share of the model's requests, in percent (the stable version: the rest)
    rollout: tuple[RolloutStep, ...] = ()

    def spec(self) -> str:
        """The `--model` value of the services that load it: NAME=DIR."""
        return f"{self.name}={self.weights.path()}"

    def served(self) -> tuple[ModelEntry, ...]:
        """What workers and tokenizers load for this model: its versions, or the model itself."""
        return self.versions or (self,)

    def version_named(self, version: str) -> ModelEntry | None:
        return next((v for v in self.versions if v.version == version), None)

    @property
    def stable_version(self) -> ModelEntry | None:
        return self.version_named(self.stable) if self.versions else None

    @property
    def canaries(self) -> tuple[ModelEntry, ...]:
        return tuple(v for v in self.versions if v.version != self.stable)

    def fingerprint(self) -> str:
        """A version's definition (weights, engine, traffic, rollout) as a short hash: a rollback holds until
        the catalog changes the version it was decided for."""
        text = repr((self.name, self.weights.describe(), self.engine, self.traffic, self.rollout))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RequestFacts:
    """What a route's rules look at in a request (the frontend fills it in after rendering)."""

    prompt_tokens: int = 0  # the rendered prompt's tokens
    max_tokens: int | None = None
    turns: int = 0  # user messages in the conversation
    tools: bool = False  # the request offers tools
    response_format: bool = False  # the request asks for a structured response (not plain text)
    text: str = ""  # the text keywords are looked for in (the user messages)
    tier: str | None = None  # the tier asked for in the `x-infermesh-tier` header


@dataclass(frozen=True)
class RouteRule:
    """Sends a request to `model` when every condition given holds (None / empty: not a condition)."""

    model: str
    prompt_tokens_over: int | None = None
    max_tokens_over: int | None = None
    turns_over: int | None = None
    tools: bool | None = None
    response_format: bool | None = None
    keywords: tuple[str, ...] = ()  # any of them, as a whole word, case-insensitive
    tiers: tuple[str, ...] = ()  # the header asks for one of them
    _keywords: re.Pattern[str] | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if self.keywords:
            words = "|".join(re.escape(k) for k in self.keywords)
            object.__setattr__(self, "_keywords", re.compile(rf"(?<!\w)(?:{words})(?!\w)", re.IGNORECASE))

    def matches(self, facts: RequestFacts) -> bool:
        if self.prompt_tokens_over is not None and not facts.prompt_tokens > self.prompt_tokens_over:
            return False
        if self.max_tokens_over is not None and not (facts.max_tokens or 0) > self.max_tokens_over:
            return False
        if self.turns_over is not None and not facts.turns > self.turns_over:
            return False
        if self.tools is not None and facts.tools != self.tools:
            return False
        if self.response_format is not None and facts.response_format != self.response_format:
            return False
        if self._keywords is not None and not self._keywords.search(facts.text):
            return False
        return not self.tiers or facts.tier in self.tiers


@dataclass(frozen=True)
class Route:
    """A model name whose rules pick a model per request: the first rule that matches, else `default`."""

    name: str
    default: str
    rules: tuple[RouteRule, ...] = ()

    def choose(self, facts: RequestFacts) -> str:
        """The name (model or alias) this request goes to."""
        return next((rule.model for rule in self.rules if rule.matches(facts)), self.default)

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n for n in (self.default, *(rule.model for rule in self.rules)) if n))


@dataclass(frozen=True)
class FallbackChain:
    """Models tried in order before the first token: each member falls back to the ones after it."""

    models: tuple[str, ...]


@dataclass(frozen=True)
class Cooldown:
    """A model that failed `failures` times within `window_s` seconds is skipped for `skip_s`, then probed again."""

    failures: int = 3
    window_s: float = 60.0
    skip_s: float = 30.0


@dataclass(frozen=True)
class Catalog:
    """What the mesh serves. Built by `parse_catalog` (validated) or `Catalog.default()`."""

    models: tuple[ModelEntry, ...]
    routes: tuple[Route, ...] = ()
    chains: tuple[FallbackChain, ...] = ()
    cooldown: Cooldown = Cooldown()
    source: str = ""  # the file it was read from ("" for the default)
    digest: str = ""  # sha256 of the file's bytes
    _by_name: dict[str, ModelEntry] = field(init=False, repr=False, compare=False, default_factory=dict)
    _routes: dict[str, Route] = field(init=False, repr=False, compare=False, default_factory=dict)
    _next: dict[str, str] = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        for m in self.models:
            for name in (m.name, *m.aliases):
                self._by_name[name] = m
            for v in m.versions:
                self._by_name[v.name] = v
        self._routes.update((r.name, r) for r in self.routes)
        for chain in self.chains:
            members = [self._by_name[n].name for n in chain.models]
            self._next.update(zip(members, members[1:], strict=False))

    @classmethod
    def default(cls, model: str = "") -> Catalog:
        """The mesh without a catalog: the default model, or the `--model` given (`DIR` or `NAME=DIR`)."""
        if not model:
            return cls(models=(ModelEntry(DEFAULT_MODEL_NAME, Weights(prepared=DEFAULT_MODEL_NAME)),))
        name, directory = parse_model_spec(model)
        return cls(models=(ModelEntry(name, Weights(dir=str(directory))),))

    def lookup(self, name: str) -> ModelEntry | Route | None:
        """The model (a name or an alias), version (`NAME@VERSION`, an alias's too) or route a client's model
        name means, or None."""
        found = self._by_name.get(name) or self._routes.get(name)
        if found is None and VERSION_SEP in name:
            base, _, version = name.rpartition(VERSION_SEP)
            model = self._by_name.get(base)
            found = model.version_named(version) if model is not None else None
        return found

    def model_of(self, entry: ModelEntry) -> ModelEntry:
        """A version's model (a model: itself)."""
        return self._by_name[entry.model] if entry.model else entry

    def served_models(self) -> tuple[ModelEntry, ...]:
        """Every model workers and tokenizers load: each version of a versioned model, each other model."""
        return tuple(s for m in self.models for s in m.served())

    def resolve(self, name: str, facts: RequestFacts | None = None) -> ModelEntry:
        """The model a client's model name means: aliases followed, a route's rules applied to `facts`."""
        found = self.lookup(name)
        if isinstance(found, Route):
            found = self._by_name[found.choose(facts or RequestFacts())]
        if found is None:
            raise NotFound(f"The model `{name}` does not exist.", param="model")
        return found

    def served_names(self) -> tuple[str, ...]:
        """Every name a client may use: each model and its aliases, then the routes, in the file's order."""
        return (*(n for m in self.models for n in (m.name, *m.aliases)), *(r.name for r in self.routes))

    def fallbacks(self, name: str) -> list[ModelEntry]:
        """The models tried, in order, when `name` (a model or alias) fails before its first token.

        A route has none of its own: resolve it first, then ask for the fallbacks of the model it chose.
        """
        if name in self._routes:
            raise ValueError(f"{name!r} is a route; resolve it to a model first")
        chain, current = [], self.model_of(self.resolve(name)).name
        while current in self._next:  # validated acyclic
            current = self._next[current]
            chain.append(self._by_name[current])
        return chain

    def models_for_task(self, task: str) -> tuple[ModelEntry, ...]:
        return tuple(m for m in self.models if m.task == task)

    def model_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.models)
