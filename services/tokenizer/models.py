"""Tokenizers loaded from Hugging Face model directories.

The tokenizer tier renders and encodes; it does not judge lengths. The context
window is the engine's, reported by the model's workers, and checked by the
frontend with `infermesh.common.limits.check_context`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infermesh.common.errors import InvalidRequest, NotFound
from infermesh.tokenizer import tool_prompt
from infermesh.tokenizer.chat_template import ChatTemplate
from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                 "mask_token")


# Long texts are encoded in chunks, in parallel (the `tokenizers` batch API uses
# every core), when that provably gives the same ids: for a byte-level BPE with
# the GPT-2 split regex and no normalizer, every position between a non-space
# character and " <non-space>" is already a boundary of the pre-tokenizer, and
# BPE never merges across such boundaries.
_CHUNK_CHARS = 1024
_SAFE_SPLIT = re.compile(r"(?<=\S)(?= \S)")


def _chunk_safe(definition: dict[str, Any]) -> bool:
    pre = definition.get("pre_tokenizer") or {}
    return (definition.get("normalizer") is None and pre.get("type") == "ByteLevel"
            and pre.get("use_regex", True) and not pre.get("add_prefix_space", False))


def _chunks(text: str) -> list[str]:
    out, start = [], 0
    while len(text) - start > _CHUNK_CHARS:
        match = _SAFE_SPLIT.search(text, start + _CHUNK_CHARS)
        if match is None:
            break
        out.append(text[start:match.start()])
        start = match.start()
    out.append(text[start:])
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


@dataclass
class ModelTokenizer:
    """One model's tokenizer and chat template."""

    name: str
    path: Path
    tokenizer: Tokenizer
    tokenizer_json: bytes
    chat_template: ChatTemplate | None
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    chunked: bool = False

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.tokenizer_json).hexdigest()

    @classmethod
    def load(cls, name: str, path: Path) -> ModelTokenizer:
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path} has no tokenizer.json (not a Hugging Face model directory?)")
        raw = (path / "tokenizer.json").read_bytes()
        tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
        # A tokenizer.json may carry the truncation and padding its model was trained with (all-MiniLM-L6-v2's:
        # truncate at 128, pad to 128). Encoding here gives a text's own ids, as `transformers` does unless asked
        # otherwise: the context window is checked by the frontend, and truncation is the caller's to ask for.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        config = _read_json(path / "config.json")
        tok_config = _read_json(path / "tokenizer_config.json")
        special: dict[str, Any] = {k: t for k in _SPECIAL_KEYS if (t := _token_text(tok_config.get(k))) is not None}
        extra = tok_config.get("additional_special_tokens") or tok_config.get("extra_special_tokens")
        if isinstance(extra, list):
            special["additional_special_tokens"] = [t for x in extra if (t := _token_text(x))]
        template_src = None
        if (path / "chat_template.jinja").is_file():
            template_src = (path / "chat_template.jinja").read_text(encoding="utf-8")
        elif isinstance(tok_config.get("chat_template"), str):
            template_src = tok_config["chat_template"]
        eos = _ids(_read_json(path / "generation_config.json").get("eos_token_id"))
        eos += [i for i in _ids(config.get("eos_token_id")) if i not in eos]
        eos_text = special.get("eos_token")
        if eos_text is not None and (tid := tokenizer.token_to_id(eos_text)) is not None and tid not in eos:
            eos.append(tid)
        bos_text = special.get("bos_token")
        bos_id = tokenizer.token_to_id(bos_text) if bos_text else None
        return cls(name=name, path=path, tokenizer=tokenizer, tokenizer_json=raw,
                   chat_template=ChatTemplate(template_src, special) if template_src else None,
                   eos_token_ids=eos, bos_token_id=bos_id,
                   chunked=_chunk_safe(json.loads(raw)))

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    parallel: bool = True, tools: list[dict[str, Any]] | None = None) -> list[int]:
        """A conversation's prompt ids; `tools` (OpenAI's `{"type": "function", "function": ...}` objects) are
        shown through the template when it takes them, else through the mesh's tool prompt."""
        if not messages:
            raise InvalidRequest("messages must not be empty", param="messages")
        for i, message in enumerate(messages):
            role = message.get("role")
            if role not in ROLES:
                raise InvalidRequest(f"messages[{i}].role must be one of {', '.join(sorted(ROLES))}, "
                                     f"got {role!r}", param=f"messages[{i}].role")
        if self.chat_template is None:
            raise InvalidRequest(f"the model {self.name} has no chat template; send a prompt instead",
                                 param="messages")
        template = self.chat_template
        # Without tools (and earlier calls) a conversation renders as transformers renders it, `tool` turns too.
        uses_tools = bool(tools) or any(m.get("tool_calls") for m in messages)
        if uses_tools and not template.takes_tools:
            messages, tools = tool_prompt.rewrite(messages, tools or []), None
        text = template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools or None)
        return self.encode(text, add_special_tokens=False, parallel=parallel)

    def encode(self, text: str, add_special_tokens: bool, parallel: bool = True) -> list[int]:
        """Token ids of `text`; `parallel` allows spreading one long text over every core."""
        if parallel and self.chunked and not add_special_tokens and len(text) > 2 * _CHUNK_CHARS:
            encoded = self.tokenizer.encode_batch_fast(_chunks(text), add_special_tokens=False)
            return [i for e in encoded for i in e.ids]
        return self.tokenizer.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]

    def decode_batch(self, items: list[list[int]], skip_special_tokens: bool) -> list[str]:
        vocab = self.tokenizer.get_vocab_size(with_added_tokens=True)
        for i, ids in enumerate(items):
            bad = next((t for t in ids if t >= vocab), None)
            if bad is not None:
                raise InvalidRequest(f"items[{i}]: token id {bad} is outside the vocabulary (size {vocab})",
                                     param="items")
        return self.tokenizer.decode_batch(items, skip_special_tokens=skip_special_tokens)


class ModelRegistry:
    """The models a tokenizer process serves, by name."""

    def __init__(self, models: list[ModelTokenizer]) -> None:
        self.models = {m.name: m for m in models}

    def get(self, name: str) -> ModelTokenizer:
        model = self.models.get(name)
        if model is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise NotFound(f"The model {name!r} does not exist (served: {known}).", param="model")
        return model
