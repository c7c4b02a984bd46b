"""The catalog file, section by section, the cross-checks between sections, and the entry points
`parse_catalog` and `load_catalog`."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml
from infermesh.common.catalog.reader import Fields, Reader, Ref, article, did_you_mean
from infermesh.common.catalog.schema import (
    DTYPES,
    FORMAT,
    TASKS,
    TIERS,
    VERSION_PATTERN,
    VERSION_RULE,
    VERSION_SEP,
    Catalog,
    CatalogError,
    Cooldown,
    EngineOptions,
    FallbackChain,
    ModelEntry,
    Prices,
    Problem,
    Rollback,
    RolloutStep,
    Route,
    RouteRule,
    Weights,
)
from infermesh.common.model_sources import SOURCES

# --- the sections ----------------------------------------------------------------------------------------------

@dataclass
class _Parsed:
    """The sections as read, with the places the cross-checks name."""

    models: list[tuple[ModelEntry, Ref, list[Ref]]] = field(default_factory=list)  # entry, its name, aliases
    routes: list[tuple[Route, Ref, list[Ref]]] = field(default_factory=list)  # route, its name, its targets
    chains: list[list[Ref]] = field(default_factory=list)


@dataclass
class _Version:
    """A version as read, with the places `_check_versions` names."""

    entry: ModelEntry
    name: Ref
    weights: list[tuple[float, yaml.Node, str]]  # each traffic weight it gives (`traffic`, steps' `set_weight`)


def _model(r: Reader, f: Fields, base_dir: Path | None) -> tuple[ModelEntry, Ref, list[Ref]] | None:
    name = f.ref("name", required=True)
    task = f.string("task", "generate", choices=TASKS)
    versioned = "versions" in f.keys
    weights = None if versioned else _weights(r, f, task, base_dir)
    aliases = f.strings("aliases", name=True)
    tier = f.string("tier", "cheap", choices=TIERS)
    prices = Prices()
    if (pf := f.section("prices")) is not None:
        prices = Prices(pf.number("prompt_per_mtok", 0.0, 0, 1e6), pf.number("completion_per_mtok", 0.0, 0, 1e6))
        pf.done()
    engine = _engine(f, EngineOptions())
    if versioned:
        for key in ("weights", "workers"):
            if key in f.keys:
                r.problem(f.keys[key][0], f.at(key), "a model with versions gives its weights and workers in each "
                                                      "version")
                f.known.append(key)
        stable = f.ref("stable", required=True)
        rollback = _rollback(f.section("rollback"))
        nodes = f.entries("versions", required=True)
        versions = [v for path, node in nodes
                    if (vf := r.fields(node, path)) is not None
                    and (v := _version(r, vf, name.name if name else "", task, engine, stable, base_dir)) is not None]
    else:
        workers = f.integer("workers", 1, 0, 64)
        f.known.append("versions")
        for key in ("stable", "rollback"):
            if key in f.keys:
                r.problem(f.keys[key][0], f.at(key), "only a model with versions has this")
            f.known.append(key)
    f.done()
    if name is None:
        return None
    if not versioned:
        # Kept with invalid weights too (the catalog is refused anyway), so references to it are not reported.
        return ModelEntry(name.name, weights or Weights(), task, tuple(a.name for a in aliases), tier, prices, engine,
                          workers), name, aliases
    entries = [replace(v.entry, aliases=(), tier=tier, prices=prices) for v in versions]
    stable_entry = _check_versions(r, f, versions, stable, complete=bool(nodes) and len(versions) == len(nodes))
    entry = ModelEntry(name.name, stable_entry.weights if stable_entry else Weights(), task,
                       tuple(a.name for a in aliases), tier, prices,
                       stable_entry.engine if stable_entry else engine, 0, tuple(entries),
                       stable.name if stable else "", rollback)
    return entry, name, aliases


def _engine(f: Fields, base: EngineOptions) -> EngineOptions:
    """The `engine` section over `base` (a versioned model's own options, which a version's override)."""
    ef = f.section("engine")
    if ef is None:
        return base
    engine = EngineOptions(
        max_model_len=ef.integer("max_model_len", base.max_model_len, 16, 10_000_000),
        max_num_seqs=ef.integer("max_num_seqs", base.max_num_seqs, 1, 65_536),
        kv_cache_gb=ef.number("kv_cache_gb", base.kv_cache_gb, 0, 4096, low_open=True),
        enforce_eager=ef.boolean("enforce_eager", base.enforce_eager),
        dtype=ef.string("dtype", base.dtype or "", choices=DTYPES) or None,
        block_size=ef.integer("block_size", base.block_size, 1, 1024),
        tensor_parallel_size=ef.integer("tensor_parallel_size", base.tensor_parallel_size, 1, 64))
    ef.done()
    return engine


def _version(r: Reader, f: Fields, model: str, task: str, engine: EngineOptions, stable: Ref | None,
             base_dir: Path | None) -> _Version | None:
    ref = f.ref("name", required=True, pattern=(VERSION_PATTERN, VERSION_RULE))
    weights = _weights(r, f, task, base_dir)
    own_engine = _engine(f, engine)
    workers = f.integer("workers", 1, 0, 64)
    traffic = f.number("traffic", 0.0, 0, 100)
    given = [(traffic, f.keys["traffic"][1], f.at("traffic"))] if "traffic" in f.keys else []
    steps: list[RolloutStep] = []
    for path, node in f.entries("rollout"):
        if (sf := r.fields(node, path)) is None:
            continue
        weight = sf.number("set_weight", None, 0, 100)
        pause = sf.duration("pause")
        if len(sf.keys) != 1 and set(sf.keys) <= {"set_weight", "pause"}:
            r.problem(node, path, "a step is one of set_weight (percent) and pause (a duration: 30s, 5m, 1h)")
        sf.done()
        if weight is not None:
            given.append((weight, sf.keys["set_weight"][1], sf.at("set_weight")))
        if weight is not None or pause is not None:
            steps.append(RolloutStep(set_weight=weight, pause_s=pause))
    if ref is not None and stable is not None and ref.name == stable.name:
        for key, wrong in (("traffic", bool(traffic)), ("rollout", bool(steps))):
            if wrong:
                r.problem(f.keys[key][1], f.at(key), "the stable version takes the traffic the canaries leave: it "
                                                     "has no traffic or rollout of its own")
    f.done()
    if ref is None:
        return None
    entry = ModelEntry(f"{model}{VERSION_SEP}{ref.name}", weights or Weights(), task, engine=own_engine,
                       workers=workers, model=model, version=ref.name, traffic=traffic, rollout=tuple(steps))
    return _Version(entry, ref, given)


def _check_versions(r: Reader, f: Fields, versions: list[_Version], stable: Ref | None, *,
                    complete: bool) -> ModelEntry | None:
    """Unique names, a stable version among them, canaries' traffic within 100 % at every step of every rollout
    (`complete`: every version was read, so a missing name is the stable one's fault)."""
    seen: dict[str, Ref] = {}
    for v in versions:
        if (first := seen.get(v.entry.version)) is not None:
            r.problem(v.name.line, v.name.path, f"the version {v.entry.version!r} is given already ({first.path}, "
                                                f"line {first.line})")
        seen.setdefault(v.entry.version, v.name)
    node = f.keys["versions"][1] if "versions" in f.keys else None
    if isinstance(node, yaml.SequenceNode) and not node.value:
        r.problem(node, f.at("versions"), "at least one version is required")
    if stable is None:
        return None
    found = next((v.entry for v in versions if v.entry.version == stable.name), None)
    if found is None:
        if complete:
            r.problem(stable.line, stable.path, f"no version is named {stable.name!r}"
                      + did_you_mean(stable.name, [v.entry.version for v in versions]))
        return None
    # Each canary's rollout runs on its own clock, so at some moment every canary may be at its largest weight.
    peaks = [(v.entry.version, max(v.weights, key=lambda w: w[0])) for v in versions
             if v.entry.version != stable.name and v.weights]
    total = 0.0
    for _, (weight, node, path) in peaks:
        total += weight
        if total > 100:
            largest = ", ".join(f"{version} {w:g}" for version, (w, _, _) in peaks)
            r.problem(node, path, f"the canaries' traffic adds up to {sum(w for _, (w, _, _) in peaks):g} % at "
                                  f"their largest weights ({largest}); at most 100")
            break
    return found


def _rollback(f: Fields | None) -> Rollback:
    d = Rollback()
    if f is None:
        return d
    rollback = Rollback(window_s=f.number("window_s", d.window_s, 0, 86_400, low_open=True),
                        min_requests=f.integer("min_requests", d.min_requests, 1, 1_000_000),
                        max_error_rate=f.number("max_error_rate", d.max_error_rate, 0, 1),
                        max_ttft_ratio=f.number("max_ttft_ratio", d.max_ttft_ratio, 1, 1000),
                        max_tpot_ratio=f.number("max_tpot_ratio", d.max_tpot_ratio, 1, 1000))
    f.done()
    return rollback


def _weights(r: Reader, f: Fields, task: str, base_dir: Path | None) -> Weights | None:
    w = f.section("weights", required=True)
    if w is None:
        return None
    prepared, directory = w.string("prepared", name=True), w.string("dir")
    if prepared:
        source, where = SOURCES.get(prepared), w.keys["prepared"][1]
        if source is None:
            r.problem(where, w.at("prepared"), f"`infermesh prepare-model` knows no model {prepared!r}"
                      + did_you_mean(prepared, list(SOURCES)))
        elif source.task != task:
            r.problem(where, w.at("prepared"), f"{prepared} is {article(source.task)} model, and the task is {task}")
    w.done()
    if bool(prepared) == bool(directory):
        if w.keys.keys() <= {"prepared", "dir"}:  # a wrong key is reported already
            r.problem(w.node, w.path, "give exactly one of prepared (a model `infermesh prepare-model` knows) "
                                      "and dir (a Hugging Face model directory)")
        return None
    if directory:
        path = Path(directory).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        directory = str(path)
    return Weights(prepared, directory)


def _rule(r: Reader, f: Fields) -> tuple[RouteRule, Ref] | None:
    model = f.ref("model", required=True)
    rule = None
    if (w := f.section("when", required=True)) is not None:
        rule = RouteRule(
            model=model.name if model else "",
            prompt_tokens_over=w.integer("prompt_tokens_over", None, 0, 10_000_000),
            max_tokens_over=w.integer("max_tokens_over", None, 0, 10_000_000),
            turns_over=w.integer("turns_over", None, 0, 100_000),
            tools=w.boolean("tools", None),
            response_format=w.boolean("response_format", None),
            keywords=tuple(k.name for k in w.strings("keywords")),
            tiers=tuple(t.name for t in w.strings("tier", choices=TIERS, one_allowed=True)))
        if not w.keys:
            r.problem(w.node, w.path, "a rule needs at least one condition (the route's default serves the rest)")
        w.done()
    f.done()
    return (rule, model) if rule is not None and model is not None else None


def _route(r: Reader, f: Fields) -> tuple[Route, Ref, list[Ref]] | None:
    name = f.ref("name", required=True)
    default = f.ref("default")
    rules, targets = [], [default] if default else []
    rule_nodes = f.entries("rules")
    for path, node in rule_nodes:
        if (rf := r.fields(node, path)) is not None and (rule := _rule(r, rf)) is not None:
            rules.append(rule[0])
            targets.append(rule[1])
    f.done()
    if "default" not in f.keys and not rule_nodes:
        r.problem(f.node, f.path, "a route needs a default or at least one rule")
    if name is None or not targets:
        return None
    return Route(name.name, default.name if default else "", tuple(rules)), name, targets


def _cooldown(f: Fields) -> Cooldown:
    d = Cooldown()
    cooldown = Cooldown(f.integer("failures", d.failures, 1, 10_000),
                        f.number("window_s", d.window_s, 0, 86_400, low_open=True),
                        f.number("skip_s", d.skip_s, 0, 86_400, low_open=True))
    f.done()
    return cooldown


def _sections(r: Reader, root: yaml.Node, base_dir: Path | None) -> tuple[_Parsed, Cooldown]:
    parsed, cooldown = _Parsed(), Cooldown()
    top = r.fields(root, "")
    if top is None:
        return parsed, cooldown
    if (fmt := top.node_of("format")) is not None and r.value(fmt) != FORMAT:
        r.problem(fmt, "format", f"this infermesh reads catalog format {FORMAT}, got {r.value(fmt)!r}")
    models = top.entries("models", required=True)
    if not models and "models" in top.keys and isinstance(top.keys["models"][1], yaml.SequenceNode):
        r.problem(top.keys["models"][1], "models", "at least one model is required")
    for path, node in models:
        if (f := r.fields(node, path)) is not None and (m := _model(r, f, base_dir)) is not None:
            parsed.models.append(m)
    for path, node in top.entries("routes"):
        if (f := r.fields(node, path)) is not None and (route := _route(r, f)) is not None:
            parsed.routes.append(route)
    for path, node in top.entries("fallbacks"):
        if (f := r.fields(node, path)) is not None:
            before = len(r.problems)
            members = f.strings("chain", required=True, name=True)
            if "chain" in f.keys and len(members) < 2 and len(r.problems) == before:
                r.problem(f.keys["chain"][1], f.at("chain"), "a chain names at least two models")
            f.done()
            if len(r.problems) == before:
                parsed.chains.append(members)
    if (cf := top.section("cooldown")) is not None:
        cooldown = _cooldown(cf)
    top.done(ignore_prefix="x-")  # `x-...: &anchor` blocks shared by reference, as in compose files
    return parsed, cooldown


# --- the cross-checks ------------------------------------------------------------------------------------------

def _cross_check(r: Reader, parsed: _Parsed) -> None:
    """One namespace; references name models; routes pick generate models; chains are consistent and acyclic."""
    claimed: dict[str, Ref] = {}
    for ref in [*(ref for _, name, aliases in parsed.models for ref in (name, *aliases)),
                *(name for _, name, _ in parsed.routes)]:
        if ref.name in claimed:
            first = claimed[ref.name]
            r.problem(ref.line, ref.path, f"the name {ref.name!r} is already used by {first.path} (line "
                                          f"{first.line}); models, aliases and routes share one namespace")
        claimed.setdefault(ref.name, ref)
    by_name: dict[str, ModelEntry] = {}
    for entry, _, _ in parsed.models:
        for n in (entry.name, *entry.aliases):
            by_name.setdefault(n, entry)
    routes = {route.name for route, _, _ in parsed.routes}

    def model_of(ref: Ref, what: str) -> ModelEntry | None:
        if ref.name in by_name:
            return by_name[ref.name]
        if ref.name in routes:
            r.problem(ref.line, ref.path, f"{ref.name!r} is a route; {what} names models or aliases")
        else:
            r.problem(ref.line, ref.path, f"no model or alias is named {ref.name!r}"
                      + did_you_mean(ref.name, list(by_name)))
        return None

    for _, _, targets in parsed.routes:
        for ref in targets:
            model = model_of(ref, "a route")
            if model is not None and model.task != "generate":
                r.problem(ref.line, ref.path,
                          f"{ref.name!r} is {article(model.task)} model; a route picks generate models")

    successor: dict[str, tuple[str, Ref]] = {}  # model -> (the model it falls back to, where that was said)
    for members in parsed.chains:
        found = [model_of(ref, "a fallback chain") for ref in members]
        models = [m for m in found if m is not None]
        if len(models) != len(members):
            continue
        problems = len(r.problems)
        seen: dict[str, Ref] = {}
        for ref, model in zip(members, models, strict=True):
            if model.name in seen:
                r.problem(ref.line, ref.path, f"{ref.name!r} is in this chain already ({seen[model.name].path}, line "
                                              f"{seen[model.name].line}): a fallback cycle")
            elif model.task != models[0].task:
                r.problem(ref.line, ref.path, f"{ref.name!r} is {article(model.task)} model; the chain's first is "
                                              f"{models[0].task}")
            seen.setdefault(model.name, ref)
        if len(r.problems) > problems:
            continue
        for i in range(1, len(members)):
            a, b, said = models[i - 1].name, models[i].name, members[i]
            if a in successor and successor[a][0] != b:
                other, where = successor[a]
                r.problem(said.line, said.path, f"{members[i - 1].name!r} falls back to {other!r} already "
                                                f"({where.path}, line {where.line}); a model has one fallback")
                continue
            walk = [a, b]
            while walk[-1] in successor and walk[-1] != a:
                walk.append(successor[walk[-1]][0])
            if walk[-1] == a:
                r.problem(said.line, said.path, f"a fallback cycle: {' -> '.join(walk)}")
                continue
            successor[a] = (b, said)


# --- the entry points ------------------------------------------------------------------------------------------

def parse_catalog(text: str | bytes, source: str = "<catalog>", *, base_dir: Path | None = None) -> Catalog:
    """A validated catalog from YAML text; raises CatalogError listing every problem, in line order.

    `source` names the file in messages; `base_dir` is where relative weight directories start.
    """
    data = text.encode() if isinstance(text, str) else text
    try:
        root = yaml.compose(data.decode("utf-8"), Loader=yaml.SafeLoader)
    except UnicodeDecodeError as exc:
        raise CatalogError([Problem(source, 0, "", f"not UTF-8 text ({exc.reason} at byte {exc.start})")]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = ": ".join(str(s) for s in (exc.context, exc.problem) if s)
        raise CatalogError([Problem(source, mark.line + 1 if mark else 0, "yaml", message)]) from None
    except yaml.YAMLError as exc:
        raise CatalogError([Problem(source, 0, "yaml", str(exc))]) from None
    if root is None:
        raise CatalogError([Problem(source, 1, "models", "required (the file is empty)")])
    r = Reader(source)
    parsed, cooldown = _sections(r, root, base_dir)
    _cross_check(r, parsed)
    if r.problems:
        raise CatalogError(sorted(r.problems, key=lambda p: p.line))
    tiers = {n: m.tier for m, _, _ in parsed.models for n in (m.name, *m.aliases)}
    return Catalog(models=tuple(m for m, _, _ in parsed.models),
                   routes=tuple(_with_default(route, tiers) for route, _, _ in parsed.routes),
                   chains=tuple(FallbackChain(tuple(ref.name for ref in members)) for members in parsed.chains),
                   cooldown=cooldown, source=source, digest=hashlib.sha256(data).hexdigest())


def _with_default(route: Route, tiers: dict[str, str]) -> Route:
    """A route without a default serves its cheapest target (the first of the cheapest tier)."""
    if route.default:
        return route
    return dataclasses.replace(route, default=min(route.targets, key=lambda name: TIERS.index(tiers[name])))


def load_catalog(path: str | Path) -> Catalog:
    """The catalog in a file; raises CatalogError (an unreadable file included)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CatalogError([Problem(str(path), 0, "", f"cannot read the catalog: {exc.strerror or exc}")]) from None
    return parse_catalog(data, str(path), base_dir=path.resolve().parent)
