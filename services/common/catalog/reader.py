"""Reading YAML nodes with their lines: `Reader` collects every problem (`FILE:LINE: field.path: message`),
`Fields` reads one mapping's keys and refuses the ones nobody asked for (with a "did you mean")."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import yaml
from infermesh.common.catalog.schema import NAME_PATTERN, NAME_RULE, VERSION_SEP, Problem

T = TypeVar("T")


@dataclass
class Ref:
    """A name as written in the file, with its place (for the cross-checks)."""

    name: str
    line: int
    path: str


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return {"tag:yaml.org,2002:str": "a string", "tag:yaml.org,2002:int": "an integer",
            "tag:yaml.org,2002:float": "a number", "tag:yaml.org,2002:bool": "a boolean",
            "tag:yaml.org,2002:null": "nothing"}.get(node.tag, f"a {node.tag} value")


class Reader:
    """Collects problems while the sections are read."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[Problem] = []
        self._construct = yaml.constructor.SafeConstructor()

    def problem(self, node: yaml.Node | int, path: str, message: str) -> None:
        line = node if isinstance(node, int) else node.start_mark.line + 1
        self.problems.append(Problem(self.source, line, path, message))

    def value(self, node: yaml.Node) -> Any:
        """A scalar's value, typed as YAML reads it (a tag this reader does not know: its text)."""
        if not isinstance(node, yaml.ScalarNode):
            return None
        try:
            return self._construct.construct_object(node)
        except yaml.YAMLError:
            return node.value

    def merge(self, node: yaml.MappingNode, path: str) -> None:
        """Applies YAML merge keys (`<<: *anchor`) in place."""
        try:
            self._construct.flatten_mapping(node)
        except yaml.YAMLError as exc:
            self.problem(node, path or "(top)", f"cannot merge: {getattr(exc, 'problem', exc)}")

    def fields(self, node: yaml.Node, path: str) -> Fields | None:
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, path, f"expected a mapping, got {_kind(node)}")
            return None
        return Fields(self, node, path)

    def items(self, node: yaml.Node, path: str) -> list[tuple[str, yaml.Node]]:
        """The elements of a list as (path, node)."""
        if not isinstance(node, yaml.SequenceNode):
            self.problem(node, path, f"expected a list, got {_kind(node)}")
            return []
        return [(f"{path}[{i}]", item) for i, item in enumerate(node.value)]


class Fields:
    """One mapping's keys, read by typed accessors; `done()` refuses the keys no accessor asked for."""

    def __init__(self, reader: Reader, node: yaml.MappingNode, path: str) -> None:
        self.r, self.node, self.path = reader, node, path
        self.known: list[str] = []
        self.keys: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        reader.merge(node, path)
        for key, value in node.value:
            # A key is its text: YAML 1.1 would read `on:` or `no:` as booleans.
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            if not isinstance(name, str):
                reader.problem(key, path or "(top)", f"keys are strings, got {_kind(key)}")
            elif name in self.keys:
                first = self.keys[name][0].start_mark.line + 1
                reader.problem(key, self.at(name), f"duplicate key (first given on line {first})")
            else:
                self.keys[name] = (key, value)

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def node_of(self, key: str, required: bool = False) -> yaml.Node | None:
        self.known.append(key)
        entry = self.keys.get(key)
        if entry is None or (entry[1].tag == "tag:yaml.org,2002:null" and not required):
            if required:
                self.r.problem(entry[1] if entry else self.node, self.at(key), "required")
            return None
        return entry[1]

    def section(self, key: str, *, required: bool = False) -> Fields | None:
        """A nested mapping."""
        node = self.node_of(key, required)
        return self.r.fields(node, self.at(key)) if node is not None else None

    def entries(self, key: str, *, required: bool = False) -> list[tuple[str, yaml.Node]]:
        """A nested list's elements as (path, node)."""
        node = self.node_of(key, required)
        return self.r.items(node, self.at(key)) if node is not None else []

    def _scalar(self, key: str, default: T, check: Callable[[Any], str], required: bool = False) -> T:
        node = self.node_of(key, required)
        if node is None:
            return default
        value = self.r.value(node)
        message = check(value) if isinstance(node, yaml.ScalarNode) else f"expected a scalar, got {_kind(node)}"
        if message:
            self.r.problem(node, self.at(key), message)
            return default
        return value  # type: ignore[no-any-return]

    def string(self, key: str, default: str = "", *, required: bool = False,
               choices: Sequence[str] = (), name: bool = False) -> str:
        return self._scalar(key, default, lambda v: _check_string(v, choices, name), required)

    def integer(self, key: str, default: T, low: int, high: int) -> int | T:
        def check(v: Any) -> str:
            if isinstance(v, bool) or not isinstance(v, int):
                return f"expected an integer, got {v!r}"
            return "" if low <= v <= high else f"must be within {low}..{high}, got {v}"
        return self._scalar(key, default, check)

    def number(self, key: str, default: T, low: float, high: float, *, low_open: bool = False) -> float | T:
        def check(v: Any) -> str:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                return f"expected a number, got {v!r}"
            if v < low or v > high or (low_open and v == low):
                return f"must be {'>' if low_open else '>='} {low:g} and <= {high:g}, got {v:g}"
            return ""
        value = self._scalar(key, default, check)
        return float(value) if isinstance(value, int) else value

    def boolean(self, key: str, default: T) -> bool | T:
        return self._scalar(key, default, lambda v: "" if isinstance(v, bool) else f"expected true or false, got {v!r}")

    def strings(self, key: str, *, required: bool = False, choices: Sequence[str] = (), name: bool = False,
                one_allowed: bool = False) -> list[Ref]:
        """A list of strings (or a single string when `one_allowed`), each with its line and path."""
        node = self.node_of(key, required)
        if node is None:
            return []
        if one_allowed and isinstance(node, yaml.ScalarNode):
            elements: list[tuple[str, yaml.Node]] = [(self.at(key), node)]
        else:
            elements = self.r.items(node, self.at(key))
        out = []
        for path, item in elements:
            value = self.r.value(item)
            message = _check_string(value, choices, name) if isinstance(item, yaml.ScalarNode) else \
                f"expected a string, got {_kind(item)}"
            if message:
                self.r.problem(item, path, message)
            else:
                out.append(Ref(value, item.start_mark.line + 1, path))
        return out

    def ref(self, key: str, *, required: bool = False,
            pattern: tuple[re.Pattern[str], str] | None = None) -> Ref | None:
        """A name this mapping refers to, with its line and path (a catalog name, or one of `pattern`: the
        expression and its rule in words)."""
        if pattern is None:
            value = self.string(key, required=required, name=True)
        else:
            value = self._scalar(key, "", lambda v: _check_string(v, (), False) or (
                "" if pattern[0].fullmatch(v) else f"{v!r} is no valid name ({pattern[1]})"), required)
        return Ref(value, self.keys[key][1].start_mark.line + 1, self.at(key)) if value else None

    def duration(self, key: str) -> float | None:
        """A duration in seconds: a number, or a text such as `30s`, `5m`, `1h`, `1m30s`; at most 30 days."""
        def check(v: Any) -> str:
            if parse_duration(v) is not None:
                return ""
            if parse_duration(v, limit=math.inf) is not None:
                return f"must be at most {MAX_DURATION_S / 86_400:g} days, got {v!r}"
            return f"expected a duration (30, 30s, 5m, 1h, 1m30s), got {v!r}"
        value = self._scalar(key, None, check)
        return parse_duration(value) if value is not None else None

    def done(self, *, ignore_prefix: str = "") -> None:
        for key, (key_node, _) in self.keys.items():
            if key not in self.known and not (ignore_prefix and key.startswith(ignore_prefix)):
                self.r.problem(key_node, self.at(key), "unknown key" + did_you_mean(key, self.known))


_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")
MAX_DURATION_S = 30 * 86_400


def parse_duration(v: Any, *, limit: float = MAX_DURATION_S) -> float | None:
    """Seconds from a number (>= 0) or a text of hours, minutes and seconds (`1h`, `5m`, `1m30s`, `0.5s`), up to
    `limit`; None for anything else."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v) if math.isfinite(v) and 0 <= v <= limit else None
    if not isinstance(v, str) or not v.strip():
        return None
    m = _DURATION.fullmatch(v.strip())
    if m is None or not any(m.groups()):
        return None
    h, mins, sec = (float(g) if g else 0.0 for g in m.groups())
    total = h * 3600 + mins * 60 + sec
    return total if total <= limit else None


def _check_string(v: Any, choices: Sequence[str], name: bool) -> str:
    if not isinstance(v, str):
        return f"expected a string, got {v!r}" + (" (quote it)" if v is not None else "")
    if choices and v not in choices:
        return f"expected one of {', '.join(choices)}, got {v!r}" + did_you_mean(v, choices, list_known=False)
    if name and not NAME_PATTERN.fullmatch(v):
        pin = VERSION_SEP in v and NAME_PATTERN.fullmatch(v.partition(VERSION_SEP)[0]) is not None
        return f"{v!r} is no valid name ({NAME_RULE})" + (
            f"; {VERSION_SEP} pins a version in a request's model (NAME{VERSION_SEP}VERSION), it is no part of a name"
            if pin else "")
    if not v.strip():
        return "must not be empty"
    return ""


def article(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def did_you_mean(word: str, known: Sequence[str], *, list_known: bool = True) -> str:
    """' (did you mean X?)' for a close match, else the known words when there are few."""
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6) or \
        [k for k in known if len(word) >= 3 and word.lower() in k.lower()][:1]
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f"; known: {', '.join(known)}" if list_known and 0 < len(known) <= 12 else ""
