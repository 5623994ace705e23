"""POST /v1/completions: a prompt (or a batch of them) in, n choices per prompt out."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from starlette.responses import Response

from nanoflow.engine.request import Logprob, RequestOutput
from nanoflow.entrypoints.server.async_engine import EngineDeadError, EngineStepError, RequestStream
from nanoflow.entrypoints.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    OpenAIError,
    UsageInfo,
)
from nanoflow.entrypoints.server.serving import (
    MAX_BATCH,
    MAX_SEQUENCES,
    SSE_DONE,
    ChoiceState,
    EngineStreamingResponse,
    ServerContext,
    collect_final,
    merge,
    ranked,
    sse,
    sse_error,
    take_delta,
    token_text,
    usage,
)


async def create_completion(ctx: ServerContext, req: CompletionRequest, raw: Request) -> Response:
    ctx.log_ignored_fields(req)
    ctx.check_model(req.model)
    params = req.to_sampling_params(ctx.engine.vocab_size, ctx.sampling_defaults)
    prompts = req.prompts()
    if len(prompts) > MAX_BATCH:
        raise OpenAIError(f"at most {MAX_BATCH} prompts per request, got {len(prompts)}", param="prompt")
    if len(prompts) * req.n > MAX_SEQUENCES:
        raise OpenAIError(f"prompts x n must be at most {MAX_SEQUENCES}, got {len(prompts) * req.n}",
                          param="n")
    inputs: list[tuple[str | None, list[int]]] = []
    for p in prompts:
        if isinstance(p, str):
            inputs.append((p, ctx.encode(p)))
        else:
            inputs.append((None, list(p)))
    ctx.check_room(inputs, params.max_tokens, "prompt", "max_tokens")
    request_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    echo = [_echo_text(ctx, text, ids) if req.echo else "" for text, ids in inputs]
    # Nothing may raise between submit and handing the streams to a response that aborts them.
    streams = await ctx.submit(request_id, inputs, params, "prompt")
    if req.stream:
        gen = _stream(ctx, req, streams, request_id, created, echo, req.include_usage)
        return EngineStreamingResponse(gen, streams)
    finals = await collect_final(raw, streams)
    if finals is None:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    choices = []
    for i, out in enumerate(finals):
        for o in out.outputs:
            lp = _logprobs(o.token_ids, o.logprobs[: len(o.token_ids)], 0, req.logprobs) \
                if o.logprobs is not None else None
            choices.append(CompletionChoice(index=i * req.n + o.index, text=echo[i] + o.text, logprobs=lp,
                                            finish_reason=o.finish_reason, stop_reason=o.stop_reason))
    resp = CompletionResponse(id=request_id, created=created, model=ctx.model_name, choices=choices,
                              usage=UsageInfo(**usage(finals)))
    return Response(resp.model_dump_json(), media_type="application/json")


def _echo_text(ctx: ServerContext, text: str | None, ids: list[int]) -> str:
    if text is not None:
        return text
    return ctx.decode(ids, "prompt") if ctx.tokenizer is not None else ""


async def _stream(ctx: ServerContext, req: CompletionRequest, streams: list[RequestStream], request_id: str,
                  created: int, echo: list[str], include_usage: bool) -> AsyncIterator[str]:
    states = [ChoiceState() for _ in range(len(streams) * req.n)]
    finals: list[RequestOutput | None] = [None] * len(streams)
    try:
        async for i, out in merge(streams):
            finals[i] = out
            for o in out.outputs:
                idx = i * req.n + o.index
                state = states[idx]
                first = state.tokens_sent == 0 and state.text_sent == 0
                d = take_delta(state, o)
                if d is None or (not d.text and d.finish_reason is None and d.logprobs is None):
                    continue
                text = (echo[i] if first else "") + d.text
                lp = None
                if d.logprobs is not None:
                    lp = _logprobs(d.token_ids, d.logprobs, state.text_offset, req.logprobs)
                    state.text_offset += sum(len(t) for t in lp.tokens)
                choice = CompletionChoice(index=idx, text=text, logprobs=lp, finish_reason=d.finish_reason,
                                          stop_reason=d.stop_reason)
                yield sse(CompletionResponse(id=request_id, created=created, model=ctx.model_name,
                                             choices=[choice]))
        if include_usage:
            yield sse(CompletionResponse(id=request_id, created=created, model=ctx.model_name, choices=[],
                                         usage=UsageInfo(**usage(finals))))
        yield SSE_DONE
    except (EngineStepError, EngineDeadError) as e:
        yield sse_error(e)
        yield SSE_DONE
    finally:
        # Reached on normal end, on error, and when the client disconnects (the response task
        # is cancelled): the requests still in the engine are aborted and their pages freed.
        for s in streams:
            s.abort()


def _logprobs(ids: list[int], lps: list[dict[int, Logprob]], offset: int, k: int | None
              ) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for tid, d in zip(ids, lps, strict=False):
        chosen = d.get(tid)
        tok = token_text(chosen, tid)
        out.tokens.append(tok)
        out.token_logprobs.append(chosen.logprob if chosen is not None else None)
        out.top_logprobs.append({token_text(lp, t): lp.logprob for t, lp in ranked(d, k or 0)})
        out.text_offset.append(offset)
        offset += len(tok)
    return out
