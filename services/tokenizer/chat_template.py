"""Chat templates rendered with the semantics of `transformers`' apply_chat_template.

The same Jinja environment (sandboxed, `trim_blocks`, `lstrip_blocks`,
`loopcontrols`, a `{% generation %}` block, `raise_exception`,
`strftime_now`, a `tojson` that does not escape HTML), the same variables
(`messages`, `tools`, `documents`, `add_generation_prompt` and the special
tokens), so that the rendered ids equal transformers' exactly; the tests
check this on the served models.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
from infermesh.common.errors import InvalidRequest
from jinja2.sandbox import ImmutableSandboxedEnvironment


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body (assistant masks are not used)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled chat template and the special tokens it may refer to."""

    def __init__(self, source: str, special_tokens: dict[str, Any]) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self.template = env.from_string(source)
        self.special_tokens = dict(special_tokens)
        # Whether the template shows tools itself (it reads the `tools` variable); if not, the mesh's
        # tool prompt (tool_prompt.py) does.
        self.takes_tools = "tools" in jinja2.meta.find_undeclared_variables(env.parse(source))

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> str:
        """The prompt text for a conversation; InvalidRequest when the template refuses it."""
        try:
            return self.template.render(messages=messages, tools=tools, documents=None,
                                        add_generation_prompt=add_generation_prompt,
                                        **{**self.special_tokens, **kwargs})
        except jinja2.exceptions.TemplateError as exc:
            raise InvalidRequest(f"the chat template refused the messages: {exc}",
                                 param="messages") from None
