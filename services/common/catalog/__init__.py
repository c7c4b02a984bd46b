"""The model catalog: what the mesh serves, from one YAML file, validated once.

A catalog lists the models (name, task, weights, aliases, cost tier and
prices, engine options, workers), the routes (a model name such as `auto` whose
rules pick a model per request), the fallback chains (tried before the first
token) and the cooldown of a failing model. `docs/catalog.md` describes the
format; `deploy/catalog/demo.yaml` is an example.

`parse_catalog` and `load_catalog` build a frozen `Catalog` or raise one
`CatalogError` that lists every problem as `FILE:LINE: field.path: message`.
The file is read through PyYAML's node API (`yaml.compose`), so every value
keeps its line. Each section is read by a small function over `Fields`, whose
accessors record the keys they know: a new field is one accessor call and one
dataclass field, and any key no accessor asked for is refused, naming it.

Names of models, aliases and routes share one namespace, the one clients see in
the `model` field. Without a catalog the mesh serves `Catalog.default()`: the
default model alone, as before catalogs existed. Nothing is read at import time.

- `schema.py`: the types (`Catalog` and its lookups, `ModelEntry`, `Route`, ...) and `CatalogError`
- `reader.py`: YAML nodes with their lines, and the problems found in them
- `parse.py`: the sections, the cross-checks, `parse_catalog` and `load_catalog`
- `watch.py`: the running catalog and its reload (`CatalogHolder`: SIGHUP, a change of the file)
"""

from infermesh.common.catalog.parse import load_catalog, parse_catalog
from infermesh.common.catalog.schema import (
    TASKS,
    TIER_HEADER,
    TIERS,
    VERSION_SEP,
    Catalog,
    CatalogError,
    Cooldown,
    EngineOptions,
    FallbackChain,
    ModelEntry,
    Prices,
    Problem,
    RequestFacts,
    Rollback,
    RolloutStep,
    Route,
    RouteRule,
    Weights,
)
from infermesh.common.catalog.watch import CatalogHolder, ReloadResult

__all__ = ["TASKS", "TIERS", "TIER_HEADER", "Catalog", "CatalogError", "CatalogHolder", "Cooldown", "EngineOptions",
           "FallbackChain", "ModelEntry", "Prices", "Problem", "ReloadResult", "RequestFacts", "Rollback",
           "RolloutStep", "Route", "RouteRule", "VERSION_SEP", "Weights", "load_catalog", "parse_catalog"]
