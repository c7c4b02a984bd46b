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
- `chain(model, choice)`: the names tried in order: the model, then its fallbacks. A versioned model is the
  version its split picks for the request (`models/versions.py`), then its stable version; a pinned version
  (`NAME@VERSION`, or the version header) is that version alone.
"""

from __future__ import annotations

from infermesh.common.catalog import VERSION_SEP, Catalog, CatalogHolder, Cooldown, ModelEntry, RequestFacts, Route
from infermesh.common.errors import InvalidRequest, NotFound
from infermesh.common.versions import VERSION_HEADER
from infermesh.frontend.models.versions import ANY_VERSION, VersionChoice, VersionSplit
from infermesh.frontend.request.cooldown import Cooldowns

_TASK_API = {"generate": "chat and completions", "embed": "embeddings"}


class ModelTargets:
    def __init__(self, holder: CatalogHolder | None = None) -> None:
        self.holder = holder
        self.cooldowns = Cooldowns()
        self.versions = VersionSplit()

    @property
    def catalog(self) -> Catalog | None:
        return self.holder.current if self.holder is not None else None

    def cooldown_policy(self, name: str = "") -> Cooldown | None:
        """The catalog's cooldown for `name` (None: never skipped; without a catalog, and for a canary version,
        whose failures the scheduler's analysis judges: a canary in cooldown would starve its own analysis)."""
        catalog = self.catalog
        if catalog is None:
            return None
        found = catalog.lookup(name) if name else None
        if isinstance(found, ModelEntry) and found.version and found.version != catalog.model_of(found).stable:
            return None
        return catalog.cooldown

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

    def served_name(self, name: str) -> str:
        """The model's name clients see for a served name: `chat@v2` is `chat`."""
        if self.catalog is not None and VERSION_SEP in name:  # a catalog's names have no `@`: a version's
            return name.partition(VERSION_SEP)[0]  # (also of a version a reload removed while it served)
        return name

    def choose(self, route: Route, facts: RequestFacts) -> str:
        """The model a route's rules pick for a request with these facts."""
        catalog = self.catalog
        assert catalog is not None
        return catalog.resolve(route.choose(facts)).name

    def chain(self, model: str, choice: VersionChoice = ANY_VERSION) -> list[str]:
        """The names tried for `model`, in order: it (a versioned model: the version `choice` picks, then its
        stable version), then the models of its fallback chain; a pinned version alone. Without a catalog,
        `model` alone."""
        catalog = self.catalog
        if catalog is None or catalog.lookup(model) is None:
            if choice.pin:
                raise InvalidRequest(f"the model `{model}` has no versions", param=VERSION_HEADER)
            return [model]
        entry = catalog.resolve(model)
        if entry.version and choice.pin and choice.pin != entry.version:
            raise InvalidRequest(f"`{model}` names the version {entry.version!r} and the {VERSION_HEADER} "
                                 f"header {choice.pin!r}", param=VERSION_HEADER)
        pin = entry.version or choice.pin
        first = catalog.model_of(entry)
        names = self._versions(first, choice.key, pin)
        if pin:
            return names
        for fallback in catalog.fallbacks(first.name):
            names += [n for n in self._versions(fallback, choice.key, "") if n not in names]
        return names

    def _versions(self, model: ModelEntry, key: str, pin: str) -> list[str]:
        if not model.versions:
            if pin:
                raise InvalidRequest(f"the model `{model.name}` has no versions", param=VERSION_HEADER)
            return [model.name]
        if pin:
            version = model.version_named(pin)
            if version is None:
                raise NotFound(f"The model `{model.name}` has no version `{pin}`.", param="model")
            return [version.name]
        picked, stable = self.versions.pick(model, key), f"{model.name}{VERSION_SEP}{model.stable}"
        return [picked] if picked == stable else [picked, stable]

    def embed_model(self, name: str, choice: VersionChoice = ANY_VERSION) -> str:
        """The served name an embeddings request for `name` goes to: the model, or the version its split picks
        (an embedding is one short call: no retry on the stable version)."""
        return self.chain(self.resolve(name, task="embed"), choice)[0]

    def pinned(self, model: str, choice: VersionChoice) -> bool:
        """Whether the request asks for a version itself (served even when the scheduler rolled it back)."""
        entry = self.entry(model)
        return bool(choice.pin) or (entry is not None and bool(entry.version))
