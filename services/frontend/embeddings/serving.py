"""The body of an embeddings response (OpenAI's `list` of `embedding` objects), in floats or base64.

`base64` is what OpenAI sends (and its Python client asks for by default): each
vector's float32 values, little-endian, base64-encoded.
"""

from __future__ import annotations

import array
import base64
import json
import sys
from collections.abc import Sequence
from typing import Any

from infermesh.frontend.request.embedding import EmbedResult


def base64_vector(values: Sequence[float]) -> str:
    packed = array.array("f", values)
    if sys.byteorder != "little":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def response_body(result: EmbedResult, encoding_format: str) -> bytes:
    encode: Any = base64_vector if encoding_format == "base64" else list
    data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(result.vectors)]
    body = {"object": "list", "data": data, "model": result.model,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}}
    return json.dumps(body, separators=(",", ":")).encode()
