"""`POST /v1/chat/completions`."""

from __future__ import annotations

from typing import Any

from infermesh.frontend.chat.protocol import ChatCompletionRequest
from infermesh.frontend.chat.serving import ChatFormat
from infermesh.frontend.openai.protocol import parse
from infermesh.frontend.openai.serving import OpenAIServing, now
from infermesh.frontend.request.generation import start_generation
from infermesh.frontend.routes import ApiContext, Route
from starlette.requests import Request


def routes(ctx: ApiContext) -> list[Route]:
    serving = OpenAIServing(ctx)

    async def chat(request: Request) -> Any:
        caller = await serving.caller(request)
        req = parse(ChatCompletionRequest, caller.body)
        plan = req.tool_plan()
        gen = await start_generation(
            ctx.request_backends, ctx.options, request_id=caller.request_id, model=req.model,
            sampling=plan.sampling(req.to_sampling()), tenant=caller.tenant, priority=req.priority_value,
            messages=req.chat_messages(), add_generation_prompt=req.add_generation_prompt,
            params=req.sampling_params(), deadline=caller.deadline, targets=ctx.targets,
            version=caller.version_choice(req.user),
            facts=req.route_facts(caller.tier), tools=plan.render)
        fmt = ChatFormat("chatcmpl-" + caller.request_id, now(), gen.model, gen.prepared.tokenizer,
                         req.num_logprobs() is not None, tool_names=plan.tool_names)
        return await serving.respond(request, gen, fmt, stream=req.stream, include_usage=req.include_usage)

    return [Route("/v1/chat/completions", "POST", chat, "Chat completion", body=ChatCompletionRequest,
                  streams=True)]
