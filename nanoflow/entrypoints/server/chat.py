"""POST /v1/chat/completions: messages rendered with the model's chat template, n choices out."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from starlette.responses import Response

from nanoflow.engine.request import Logprob, RequestOutput
from nanoflow.entrypoints.server.async_engine import EngineDeadError, EngineStepError, RequestStream
from nanoflow.entrypoints.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    DeltaMessage,
    TokenLogprob,
    TopLogprob,
    UsageInfo,
)
from nanoflow.entrypoints.server.serving import (
    SSE_DONE,
    ChoiceState,
    EngineStreamingResponse,
    ServerContext,
    collect_final,
    ranked,
    sse,
    sse_error,
    take_delta,
    token_text,
    usage,
)


async def create_chat_completion(ctx: ServerContext, req: ChatCompletionRequest, raw: Request) -> Response:
    ctx.log_ignored_fields(req)
    ctx.check_model(req.model)
    params = req.to_sampling_params(ctx.engine.vocab_size, ctx.sampling_defaults)
    text, ids = ctx.apply_chat_template(req.messages, req.add_generation_prompt)
    limit_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    ctx.check_room([(text, ids)], params.max_tokens, "messages", limit_param)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    (stream,) = await ctx.submit(request_id, [(text, ids)], params, "messages")
    if req.stream:
        gen = _stream(ctx, req, stream, request_id, created, req.include_usage)
        return EngineStreamingResponse(gen, [stream])
    finals = await collect_final(raw, [stream])
    if finals is None:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    (final,) = finals
    choices = []
    for o in final.outputs:
        lp = _logprobs(o.token_ids, o.logprobs[: len(o.token_ids)], req.top_logprobs or 0) \
            if o.logprobs is not None else None
        choices.append(ChatChoice(index=o.index, message=ChatResponseMessage(content=o.text), logprobs=lp,
                                  finish_reason=o.finish_reason, stop_reason=o.stop_reason))
    resp = ChatCompletionResponse(id=request_id, created=created, model=ctx.model_name, choices=choices,
                                  usage=UsageInfo(**usage([final])))
    return Response(resp.model_dump_json(), media_type="application/json")


async def _stream(ctx: ServerContext, req: ChatCompletionRequest, stream: RequestStream, request_id: str,
                  created: int, include_usage: bool) -> AsyncIterator[str]:
    def chunk(choice: ChatChunkChoice) -> str:
        return sse(ChatCompletionChunk(id=request_id, created=created, model=ctx.model_name,
                                       choices=[choice]))

    states = [ChoiceState() for _ in range(req.n)]
    final: RequestOutput | None = None
    try:
        # OpenAI opens every choice with a role-only delta.
        for i in range(req.n):
            yield chunk(ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content="")))
        async for out in stream:
            final = out
            for o in out.outputs:
                d = take_delta(states[o.index], o)
                if d is None or (not d.text and d.finish_reason is None and d.logprobs is None):
                    continue
                lp = None
                if d.logprobs is not None:
                    lp = _logprobs(d.token_ids, d.logprobs, req.top_logprobs or 0)
                delta = DeltaMessage(content=d.text) if d.text or d.finish_reason is None else DeltaMessage()
                yield chunk(ChatChunkChoice(index=o.index, delta=delta, logprobs=lp,
                                            finish_reason=d.finish_reason, stop_reason=d.stop_reason))
        if include_usage:
            yield sse(ChatCompletionChunk(id=request_id, created=created, model=ctx.model_name, choices=[],
                                          usage=UsageInfo(**usage([final]))))
        yield SSE_DONE
    except (EngineStepError, EngineDeadError) as e:
        yield sse_error(e)
        yield SSE_DONE
    finally:
        stream.abort()  # client gone (task cancelled) or done: free the engine request at once


def _logprobs(ids: list[int], lps: list[dict[int, Logprob]], k: int) -> ChatLogprobs:
    content = []
    for tid, d in zip(ids, lps, strict=False):
        chosen = d.get(tid)
        tok = token_text(chosen, tid)
        top = [TopLogprob(token=token_text(lp, t), logprob=lp.logprob, bytes=list(token_text(lp, t).encode()))
               for t, lp in ranked(d, k)]
        logprob = chosen.logprob if chosen is not None else float("-inf")
        content.append(TokenLogprob(token=tok, logprob=logprob, bytes=list(tok.encode()), top_logprobs=top))
    return ChatLogprobs(content=content)
