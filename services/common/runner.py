"""What every service's `main` does: config, logging, run, and a clear exit code."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from infermesh.common.config import ServiceConfig, config_from_argv
from infermesh.common.logs import configure_logging

logger = logging.getLogger(__name__)
C = TypeVar("C", bound=ServiceConfig)


def run_service(service: str, config_cls: type[C], argv: Sequence[str] | None, description: str,
                serve: Callable[[C], Coroutine[Any, Any, int | None]]) -> int:
    """Parses the config (exit 2 on a bad one), configures logging once and runs `serve`.

    Exit codes: what `serve` returns (0 when None); 1 when it cannot start (a port in use) or fails.
    """
    config = config_from_argv(config_cls, f"infermesh {service}", argv, description)
    configure_logging(service, config.log_level, config.log_format)
    try:
        return int(asyncio.run(serve(config)) or 0)
    except OSError as exc:
        logger.error("cannot start: %s", exc)
        return 1
    except Exception:
        logger.exception("the %s failed", service)
        return 1
