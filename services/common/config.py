"""Typed service configuration from flags and `INFERMESH_*` environment variables.

A config is a dataclass whose fields carry their help text. Every field `foo_bar`
is set, in order of precedence, by the flag `--foo-bar`, the environment
variable `INFERMESH_FOO_BAR`, or its default. Values are converted to the
field's type and checked by `validate()` once at start-up; every problem is
reported at once in a `ConfigError`. Nothing is read at import time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

ENV_PREFIX = "INFERMESH_"
C = TypeVar("C", bound="ServiceConfig")


class ConfigError(Exception):
    """The configuration is invalid; the message lists every problem."""


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices: Sequence[str] | None = None,
           factory: Any = dataclasses.MISSING) -> Any:
    """A config field with its help text (and allowed values)."""
    meta = {"help": help, "choices": tuple(choices) if choices else None}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class ServiceConfig:
    """Options every service has."""

    host: str = option("127.0.0.1", "Address to bind (0.0.0.0 in containers).")
    port: int = option(0, "gRPC port.")
    metrics_port: int = option(0, "Port of the Prometheus /metrics endpoint (0: none).")
    log_level: str = option("info", "Log level.", choices=("debug", "info", "warning", "error"))
    log_format: str = option("text", "Log format.", choices=("text", "json"))
    grace_period: float = option(30.0, "Seconds in-flight calls get to finish on SIGTERM.")
    tls_cert: str = option("", "PEM certificate: serve gRPC over TLS (and present it to peers with --tls-client-auth).")
    tls_key: str = option("", "PEM private key of --tls-cert.")
    tls_ca: str = option("", "PEM CA bundle: call other services over TLS, trusting this CA.")
    tls_client_auth: bool = option(False, "Mutual TLS: require clients to present a certificate signed by --tls-ca.")
    catalog: str = option("", "The model catalog (YAML; docs/catalog.md): what the mesh serves. Empty: the default "
                          "model alone.")

    def validate(self) -> list[str]:
        """Problems with the values; subclasses extend the list."""
        problems = []
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                problems.append(f"{name} must be a port number (0-65535), got {value}")
        if self.grace_period < 0:
            problems.append(f"grace_period must be >= 0, got {self.grace_period}")
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append("tls_cert and tls_key go together")
        if self.tls_client_auth and not (self.tls_ca and self.tls_cert):
            problems.append("tls_client_auth needs tls_ca (to check clients) and tls_cert/tls_key")
        for name in ("tls_cert", "tls_key", "tls_ca", "catalog"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                problems.append(f"{name}: no such file {path!r}")
        return problems


def _field_type(cls: type, f: dataclasses.Field[Any]) -> Any:
    return typing.get_type_hints(cls)[f.name]


def _convert(raw: str | Sequence[str], typ: Any, name: str) -> Any:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if isinstance(raw, str) and raw.strip().lower() in ("", "none"):
            return None
        return _convert(raw, inner[0], name)
    if origin in (list, tuple):
        # Flags may repeat and each value may itself be a comma- or space-separated list.
        values = [raw] if isinstance(raw, str) else list(raw)
        items = [x for value in values for x in value.replace(",", " ").split()]
        return [_convert(x, args[0], name) for x in items]
    text: str = raw[-1] if isinstance(raw, (list, tuple)) else str(raw)
    if typ is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}: expected true or false, got {text!r}")
    try:
        return typ(text)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {getattr(typ, '__name__', typ)}, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser, cls: type[ServiceConfig]) -> None:
    """Adds one flag per field (values stay strings; `load_config` converts them)."""
    for f in dataclasses.fields(cls):
        typ = _field_type(cls, f)
        flag = "--" + f.name.replace("_", "-")
        env = ENV_PREFIX + f.name.upper()
        default = f.default if f.default is not dataclasses.MISSING else "(see help)"
        help_text = f"{f.metadata.get('help', '')} [env {env}; default {default!r}]"
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if typ is bool:
            parser.add_argument(flag, action="store_const", const="true", **kwargs)
            parser.add_argument("--no-" + f.name.replace("_", "-"), action="store_const",
                                const="false", dest=f.name, help=argparse.SUPPRESS)
        elif typing.get_origin(typ) in (list, tuple):
            parser.add_argument(flag, action="append", **kwargs)
        else:
            parser.add_argument(flag, **kwargs)


def config_from_argv(cls: type[C], prog: str, argv: Sequence[str] | None, description: str = "") -> C:
    """Parses flags (and the environment) into a config; exits 2 with every problem listed."""
    import sys

    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser, cls)
    args = parser.parse_args(argv)
    try:
        return load_config(cls, args)
    except ConfigError as exc:
        print(f"{prog}: invalid configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def load_config(cls: type[C], args: argparse.Namespace | None = None,
                environ: Mapping[str, str] | None = None) -> C:
    """Builds and validates a config; raises ConfigError listing every problem."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    problems: list[str] = []
    for f in dataclasses.fields(cls):
        raw = getattr(args, f.name, None) if args is not None else None
        source = "--" + f.name.replace("_", "-")
        if raw is None and ENV_PREFIX + f.name.upper() in environ:
            raw = environ[ENV_PREFIX + f.name.upper()]
            source = ENV_PREFIX + f.name.upper()
        if raw is None:
            continue
        try:
            value = _convert(raw, _field_type(cls, f), source)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            problems.append(f"{source}: must be one of {', '.join(choices)}, got {value!r}")
            continue
        values[f.name] = value
    if problems:
        raise ConfigError("; ".join(problems))
    config = cls(**values)
    problems = config.validate()
    if problems:
        raise ConfigError("; ".join(problems))
    return config
