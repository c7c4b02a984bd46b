"""Typed config from flags and INFERMESH_* variables, validated once."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
from infermesh.common.config import ConfigError, ServiceConfig, add_arguments, load_config, option


@dataclasses.dataclass
class DemoConfig(ServiceConfig):
    port: int = option(1234, "port")
    ratio: float = option(0.5, "a ratio")
    names: list[str] = option(factory=list, help="names")
    eager: bool = option(False, "a switch")
    mode: str = option("a", "mode", choices=("a", "b"))

    def validate(self) -> list[str]:
        problems = super().validate()
        if not 0 <= self.ratio <= 1:
            problems.append("ratio must be within 0..1")
        return problems


def _parse(argv: list[str], env: dict[str, str] | None = None) -> DemoConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser, DemoConfig)
    return load_config(DemoConfig, parser.parse_args(argv), env or {})


def test_defaults() -> None:
    config = _parse([])
    assert (config.port, config.ratio, config.names, config.eager, config.mode) == (1234, 0.5, [], False, "a")


def test_environment_then_flags_take_precedence() -> None:
    env = {"INFERMESH_PORT": "7000", "INFERMESH_NAMES": "x,y", "INFERMESH_EAGER": "yes", "INFERMESH_RATIO": "0.25"}
    config = _parse([], env)
    assert (config.port, config.names, config.eager, config.ratio) == (7000, ["x", "y"], True, 0.25)
    config = _parse(["--port", "8000", "--names", "z", "--names", "w", "--no-eager"], env)
    assert (config.port, config.names, config.eager) == (8000, ["z", "w"], False)
    config = _parse(["--names", "a,b", "--names", "c d"], env)
    assert config.names == ["a", "b", "c", "d"]


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        _parse([], {"INFERMESH_PORT": "eighty", "INFERMESH_MODE": "c", "INFERMESH_EAGER": "maybe"})
    message = str(info.value)
    assert "INFERMESH_PORT: expected int, got 'eighty'" in message
    assert "INFERMESH_MODE: must be one of a, b" in message
    assert "INFERMESH_EAGER: expected true or false" in message


def test_validation_runs_after_conversion() -> None:
    with pytest.raises(ConfigError, match="ratio must be within 0..1.*|.*port must be a port number"):
        _parse(["--ratio", "3", "--port", "70000"])
    with pytest.raises(ConfigError) as info:
        _parse(["--ratio", "3", "--port", "70000"])
    assert "ratio must be within 0..1" in str(info.value) and "port must be a port number" in str(info.value)
