"""The request model of `POST /v1/embeddings`: OpenAI's body, and vLLM's truncation extension."""

from __future__ import annotations

from typing import Annotated, Literal

from infermesh.common.limits import UINT32
from infermesh.frontend.openai.protocol import PRIORITIES, OpenAIModel
from infermesh.v1 import common_pb2
from pydantic import Field, StrictInt, StrictStr

TokenId = Annotated[StrictInt, Field(ge=0, le=UINT32)]


class EmbeddingRequest(OpenAIModel):
    model: str = Field(min_length=1)
    # A text, texts, one list of token ids, or lists of token ids: each item one input.
    input: StrictStr | list[StrictStr] | list[TokenId] | list[list[TokenId]]
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: Annotated[StrictInt, Field(ge=1)] | None = None
    user: str | None = None
    # vLLM's extensions: keep at most this many tokens of each input (-1: the context window), from the end
    # `truncation_side` says (right: the first tokens); and the admission priority.
    truncate_prompt_tokens: Annotated[StrictInt, Field(ge=-1)] | None = None
    truncation_side: Literal["right", "left"] | None = None
    priority: Literal["critical", "high", "normal", "low"] | Annotated[int, Field(ge=0, le=4)] | None = None

    def texts(self) -> list[str] | None:
        """The inputs when they are texts (None: token ids)."""
        if isinstance(self.input, str):
            return [self.input]
        if not self.input or isinstance(self.input[0], str):
            return [str(x) for x in self.input]
        return None

    def token_ids(self) -> list[list[int]]:
        """The inputs when they are token ids."""
        if self.input and isinstance(self.input[0], int):
            return [[int(x) for x in self.input]]  # type: ignore[arg-type]
        return [list(x) for x in self.input]  # type: ignore[arg-type]

    @property
    def priority_value(self) -> int:
        if self.priority is None:
            return common_pb2.PRIORITY_UNSPECIFIED
        return PRIORITIES[self.priority] if isinstance(self.priority, str) else self.priority
