"""Which model serves a request: the catalog's aliases, routes and fallback chains, as the frontend reads them.

`ModelTargets` is the frontend's one reading of the running catalog (it follows
reloads: every call reads `holder.current`). Without a catalog a name is taken
as it is, and whichever workers serve a model of that name serve it (the mesh
as it was before catalogs). With one, a name is a model, an alias or a route,
and anything else is a 404 `model_not_found`.

- `resolve(name, task)`: the model a name means, for an API of that task
  (`generate` for chat and completions, `embed` for embeddings); a route is
  only for `generate`.
- `route_of(name)`: the route a name is, or None; `choose(route, facts)` applies its rules.
- `chain(model)`: the model, then its fallbacks, in the order they are tried.
"""

from __future__ import annotations

from infermesh.common.catalog import Catalog, CatalogHolder, Cooldown, ModelEntry, RequestFacts, Route
from infermesh.common.errors import InvalidRequest, NotFound
from infermesh.frontend.request.cooldown import Cooldowns

_TASK_API = {"generate": "chat and completions", "embed": "embeddings"}


class ModelTargets:
    def __init__(self, holder: CatalogHolder | None = None) -> None:
        self.holder = holder
        self.cooldowns = Cooldowns()

    @property
    def catalog(self) -> Catalog | None:
        return self.holder.current if self.holder is not None else None

    def cooldown_policy(self) -> Cooldown | None:
        """The catalog's cooldown (None without a catalog: no model is ever skipped)."""
        catalog = self.catalog
        return catalog.cooldown if catalog is not None else None

    def entry(self, name: str) -> ModelEntry | None:
        """The catalog's model (name or alias), or None (no catalog, or a route)."""
        catalog = self.catalog
        found = catalog.lookup(name) if catalog is not None else None
        return found if isinstance(found, ModelEntry) else None

    def route_of(self, name: str) -> Route | None:
        catalog = self.catalog
        found = catalog.lookup(name) if catalog is not None else None
        return found if isinstance(found, Route) else None

    def resolve(self, name: str, task: str = "generate") -> str:
        """The name of the model `name` means (aliases followed), checked against the API's task.

        Raises NotFound for a name the catalog does not know, InvalidRequest for a model of another task
        (or a route, outside chat and completions). Without a catalog, `name` itself.
        """
        if not name:
            raise InvalidRequest("model is required", param="model")
        catalog = self.catalog
        if catalog is None:
            return name
        found = catalog.lookup(name)
        if found is None:
            raise NotFound(f"The model `{name}` does not exist.", param="model")
        if isinstance(found, Route):
            if task != "generate":
                raise InvalidRequest(f"`{name}` is a route over chat models; it does not serve {_TASK_API[task]}",
                                     param="model")
            raise InvalidRequest(f"`{name}` is a route: resolve it with the request's facts", param="model")
        if found.task != task:
            raise InvalidRequest(f"the model `{name}` ({found.task}) does not serve {_TASK_API.get(task, task)}",
                                 param="model")
        return found.name

    def choose(self, route: Route, facts: RequestFacts) -> str:
        """The model a route's rules pick for a request with these facts."""
        catalog = self.catalog
        assert catalog is not None
        return catalog.resolve(route.choose(facts)).name

    def chain(self, model: str) -> list[str]:
        """`model`, then the models its fallback chain tries after it (without a catalog: `model` alone)."""
        catalog = self.catalog
        if catalog is None or catalog.lookup(model) is None:
            return [model]
        return [catalog.resolve(model).name, *(m.name for m in catalog.fallbacks(model))]
