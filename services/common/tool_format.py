"""The one tool-call format of the mesh: how a model's output calls a tool, and how earlier calls are shown.

A call is `<tool_call>` newline, a JSON object `{"name": ..., "arguments": {...}}`, newline, `</tool_call>`
(the "hermes" format: Qwen2.5's chat template asks for exactly this, and the mesh's own tool prompt
teaches it to models whose template takes no tools). Three tiers use it and nothing else:

- the tokenizer's tool prompt shows tools and earlier calls in it (`services/tokenizer/tool_prompt.py`);
- the worker's grammar for tool_choice `required` or a named function produces it
  (`services/gpu_worker/structured.py`), so a constrained call parses like a free one;
- the frontend parses it into OpenAI's `tool_calls` (`services/frontend/chat/tool_parser.py`).
"""

from __future__ import annotations

import json
import re
from typing import Any

CALL_START = "<tool_call>"
CALL_END = "</tool_call>"
# Between two calls of one turn (parallel calls).
CALL_SEPARATOR = "\n"
# The most calls one constrained turn may make (tool_choice `required` with parallel calls).
MAX_PARALLEL_CALLS = 8
# A tool's name, as OpenAI allows it (matched whole: `fullmatch`).
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def call_prefix(name: str) -> str:
    """The text of a call of `name` up to its arguments (the grammar's fixed part)."""
    return CALL_START + "\n" + '{"name": ' + json.dumps(name) + ', "arguments": '


CALL_SUFFIX = "}\n" + CALL_END


def call_text(name: str, arguments: Any) -> str:
    """One whole call, as a model writes it (`arguments`: the decoded object)."""
    return call_prefix(name) + json.dumps(arguments, ensure_ascii=False) + CALL_SUFFIX
