"""`infermesh tokenizer`: the tokenizer service process."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Container, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from infermesh.common.config import ServiceConfig, option
from infermesh.common.runner import run_service
from infermesh.common.server import GrpcServer

if TYPE_CHECKING:
    from infermesh.common.catalog import Catalog, ModelEntry
    from infermesh.tokenizer.models import ModelRegistry

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TokenizerConfig(ServiceConfig):
    port: int = option(50051, "gRPC port.")
    metrics_port: int = option(9101, "Port of the Prometheus /metrics endpoint (0: none).")
    model: list[str] = option(factory=list, help="Model directory, or NAME=DIR; repeat for several "
                              "(default: the prepared default model).")
    threads: int = option(8, "Threads that render and encode (long prompts also use every core inside `tokenizers`).")

    def validate(self) -> list[str]:
        problems = super().validate()
        if self.threads < 1:
            problems.append("threads must be >= 1")
        for spec in self.model:
            from infermesh.common.model_prep import parse_model_spec

            _, path = parse_model_spec(spec)
            if not (path / "tokenizer.json").is_file():
                problems.append(f"model {spec!r}: {path} has no tokenizer.json")
        return problems


def to_load(catalog: Catalog, loaded: Container[str] = ()) -> list[ModelEntry]:
    """The catalog's models whose tokenizers are not `loaded` yet: every served model, each version of a
    versioned model under its own name (`chat@v2`, the name the frontend renders with), in the file's order."""
    return [m for m in catalog.served_models() if m.name not in loaded]


def model_specs(config: TokenizerConfig) -> list[str]:
    """The models to load: `--model`, else every served model of the catalog, else the prepared default model."""
    if config.model:
        return config.model
    if config.catalog:
        from infermesh.common.catalog import load_catalog
        from infermesh.common.model_prep import is_complete

        models = to_load(load_catalog(config.catalog))
        missing = [m.weights.prepared for m in models if m.weights.prepared and not is_complete(m.weights.path())]
        if missing:
            names = " ".join(dict.fromkeys(missing))
            raise SystemExit(f"infermesh tokenizer: the catalog's prepared models {names} are not converted yet; "
                             f"run `infermesh prepare-model {names}`")
        return [m.spec() for m in models]
    from infermesh.common.model_prep import default_model_dir, is_complete

    default = default_model_dir()
    if not is_complete(default):
        raise SystemExit(f"infermesh tokenizer: the default model is not prepared ({default}); "
                         "run `infermesh prepare-model` or pass --model DIR")
    return [str(default)]


async def serve(config: TokenizerConfig) -> None:
    from infermesh.common.model_prep import parse_model_spec
    from infermesh.tokenizer.models import ModelRegistry, ModelTokenizer
    from infermesh.tokenizer.service import TokenizerService
    from infermesh.v1 import tokenizer_pb2, tokenizer_pb2_grpc

    models = []
    for spec in model_specs(config):
        name, path = parse_model_spec(spec)
        models.append(ModelTokenizer.load(name, Path(path)))
        logger.info("loaded tokenizer for %s (vocabulary %d)", name, models[-1].vocab_size)
    registry = ModelRegistry(models)
    service = TokenizerService(registry, workers=config.threads)
    name = tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"].full_name
    server = GrpcServer("tokenizer", config, [(tokenizer_pb2_grpc.add_TokenizerServicer_to_server, service, name)])
    following: list[Callable[[], None]] = []

    async def ready() -> None:
        if config.catalog and not config.model:
            following.append(follow_catalog(config.catalog, registry))

    try:
        await server.serve(ready=ready)
    finally:
        for stop in following:
            stop()


def follow_catalog(path: str, registry: ModelRegistry) -> Callable[[], None]:
    """Loads the tokenizer of each model (or version) a reloaded catalog adds (those it drops stay: requests
    in flight may still name them, and nothing routes new ones to them)."""
    import asyncio

    from infermesh.common.catalog import CatalogHolder
    from infermesh.tokenizer.models import ModelTokenizer

    holder = CatalogHolder.open(path)
    loop = asyncio.get_running_loop()
    loading: set[asyncio.Task[None]] = set()

    async def load(name: str, directory: Path) -> None:
        try:
            model = await asyncio.to_thread(ModelTokenizer.load, name, directory)
        except (OSError, ValueError) as exc:
            logger.error("the catalog's new model %s: its tokenizer cannot be loaded: %s", name, exc)
            return
        registry.models[name] = model
        logger.info("loaded tokenizer for %s (vocabulary %d), new in the catalog", name, model.vocab_size)

    def changed(catalog: Catalog) -> None:
        for m in to_load(catalog, registry.models):
            task = loop.create_task(load(m.name, m.weights.path()))
            loading.add(task)
            task.add_done_callback(loading.discard)
    holder.add_listener(changed)
    return holder.follow()


def main(argv: Sequence[str] | None = None) -> int:
    return run_service("tokenizer", TokenizerConfig, argv,
                       "Chat templates and tokenization over gRPC.", serve)
