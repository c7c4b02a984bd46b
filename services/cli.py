"""The `infermesh` command: one sub-command per service, plus tools."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# sub-command -> (module with `main(argv) -> int`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare-model": ("infermesh.common.prepare_cli", "Prepare models by name (default: the default one; --list)."),
    "tokenizer": ("infermesh.tokenizer.main", "Run the tokenizer service."),
    "frontend": ("infermesh.frontend.main", "Run the frontend (OpenAI HTTP API and gRPC API)."),
    "up": ("infermesh.supervisor.main", "Run the whole mesh on this machine (what `make up` runs)."),
    "probe": ("infermesh.supervisor.probe", "Check a service's health (for container health checks)."),
    "scheduler": ("infermesh.scheduler.main", "Run the scheduler service (admission and routing)."),
    "worker": ("infermesh.gpu_worker.main", "Run a GPU worker (vLLM engine, or --engine sim)."),
    "k8s-manifests": ("infermesh.supervisor.kubernetes", "Render a catalog's Kubernetes overlay."),
    "bench": ("infermesh.bench_cli", "Benchmark the mesh against vLLM's own server (from a checkout)."),
}


def usage() -> str:
    lines = ["usage: infermesh COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<15} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`infermesh COMMAND --help` lists a command's options; every option can also be set",
              "by an INFERMESH_* environment variable."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"infermesh: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
