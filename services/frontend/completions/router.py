"""`POST /v1/completions`."""

from __future__ import annotations

from typing import Any

from infermesh.frontend.completions.protocol import CompletionRequest
from infermesh.frontend.completions.serving import CompletionFormat
from infermesh.frontend.openai.protocol import parse
from infermesh.frontend.openai.serving import OpenAIServing, now
from infermesh.frontend.request.constraints import ToolPlan
from infermesh.frontend.request.generation import start_generation
from infermesh.frontend.routes import ApiContext, Route
from starlette.requests import Request


def routes(ctx: ApiContext) -> list[Route]:
    serving = OpenAIServing(ctx)

    async def completions(request: Request) -> Any:
        caller = await serving.caller(request)
        req = parse(CompletionRequest, caller.body)
        prompt = req.prompt_input()
        plan = ToolPlan.of((), None, None, req.structured())  # no tools: the output's constraint, checked
        gen = await start_generation(
            ctx.request_backends, ctx.options, request_id=caller.request_id, model=req.model,
            sampling=plan.sampling(req.to_sampling()), tenant=caller.tenant, priority=req.priority_value,
            prompt=prompt if isinstance(prompt, str) else None,
            prompt_ids=prompt if isinstance(prompt, list) else None,
            params=req.sampling_params(), deadline=caller.deadline, targets=ctx.targets,
            version=caller.version_choice(req.user),
            facts=req.route_facts(caller.tier))
        fmt = CompletionFormat("cmpl-" + caller.request_id, now(), gen.model, gen.prepared.tokenizer,
                               req.num_logprobs() is not None)
        return await serving.respond(request, gen, fmt, stream=req.stream, include_usage=req.include_usage)

    return [Route("/v1/completions", "POST", completions, "Text completion", body=CompletionRequest, streams=True)]
