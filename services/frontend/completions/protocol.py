"""The request model of `POST /v1/completions`."""

from __future__ import annotations

from typing import Annotated

from infermesh.common.catalog import RequestFacts
from infermesh.common.errors import InvalidRequest
from infermesh.frontend.openai.protocol import SamplingFields, limit
from infermesh.frontend.openai.structured import StructuredFields
from pydantic import Field, model_validator


class CompletionRequest(StructuredFields, SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, limit("max_tokens")] | None = 16
    logprobs: Annotated[int, limit("logprobs")] | None = None
    echo: bool = False
    best_of: Annotated[int, Field(ge=1)] | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        return self

    def num_logprobs(self) -> int | None:
        return self.logprobs

    def route_facts(self, tier: str | None) -> RequestFacts:
        """What a catalog route's rules read of this request: the prompt is one user turn."""
        prompt = self.prompt_input()
        return RequestFacts(turns=1, text=prompt if isinstance(prompt, str) else "", tier=tier,
                            response_format=self.structured_response)

    def prompt_input(self) -> str | list[int]:
        """The one prompt: text or token ids (batches of prompts are refused)."""
        p = self.prompt
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]
        if isinstance(p, str):
            return p
        if p and all(isinstance(x, int) for x in p):
            return [int(x) for x in p]  # type: ignore[arg-type]
        if not p:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        raise InvalidRequest("only one prompt per request is supported", param="prompt")
