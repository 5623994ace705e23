"""What the completion and chat endpoints share: prompt handling, submitting to the engine,
streaming several engine requests as one, client-disconnect handling, and SSE framing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send
from transformers import PreTrainedTokenizerBase

from nanoflow.engine.request import CompletionOutput, Logprob, RequestOutput
from nanoflow.entrypoints.server.async_engine import AsyncEngine, RequestStream
from nanoflow.entrypoints.server.protocol import ChatMessage, OpenAIError, TolerantModel, error_body
from nanoflow.sampling_params import SamplingParams

log = logging.getLogger(__name__)

T = TypeVar("T")
_MAX_LOGGED_FIELDS = 1024  # see ServerContext.logged_fields
MAX_BATCH = 256  # prompts in one completions request
MAX_SEQUENCES = 1024  # prompts x n: every sequence is built up front, so one request stays bounded


@dataclass
class ServerContext:
    engine: AsyncEngine
    # The HTTP side's own copy of the engine's tokenizer: the engine thread detokenizes with the
    # engine's, and a tokenizer object is not guaranteed safe to share across threads.
    tokenizer: PreTrainedTokenizerBase | None
    # --served-model-name: every name is accepted in requests; the first is the one responses report.
    served_names: tuple[str, ...]
    # --generation-config: sampling defaults for the fields a request leaves unset.
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    # vLLM logs every request it receives unless --disable-log-requests.
    log_requests: bool = True
    # Unknown request fields are logged once per name: a client sends the same extras on every request.
    # The set is bounded so that a client inventing names cannot grow it (or the log) without end.
    logged_fields: set[str] = field(default_factory=set)

    @property
    def model_name(self) -> str:
        return self.served_names[0]

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.served_names:
            raise OpenAIError(f"The model `{model}` does not exist.", status=404, param="model",
                              code="model_not_found")

    def check_room(self, inputs: Sequence[tuple[str | None, list[int]]], max_tokens: int | None, what: str,
                   param: str) -> None:
        """vLLM's 400 for max_tokens beyond what max_model_len leaves after the prompt (the engine
        would cut the output short silently). A prompt with no room at all is the engine's error."""
        limit = self.engine.max_model_len
        for _, ids in inputs:
            n = len(ids)
            if max_tokens is not None and n < limit and n + max_tokens > limit:
                raise OpenAIError(
                    f"This model's maximum context length is {limit} tokens. However, you requested "
                    f"{n + max_tokens} tokens ({n} in the {what}, {max_tokens} in the completion). "
                    f"Please reduce the length of the {what} or the completion ({param}).", param=param)

    def log_ignored_fields(self, body: TolerantModel) -> None:
        """One log line per unknown field name (vLLM ignores them with a warning as well)."""
        for name in body.ignored_fields():
            if name not in self.logged_fields and len(self.logged_fields) < _MAX_LOGGED_FIELDS:
                self.logged_fields.add(name)
                log.warning("ignoring the unknown request field %r (logged once per field name)", name)

    def _need_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            raise OpenAIError("this server runs without a tokenizer: send prompts as token ids",
                              param="prompt")
        return self.tokenizer

    def encode(self, text: str, param: str = "prompt", add_special_tokens: bool = True) -> list[int]:
        tok = self._need_tokenizer()
        try:
            return list(tok.encode(text, add_special_tokens=add_special_tokens))
        except Exception as e:  # e.g. lone surrogates the Rust tokenizer cannot take
            raise OpenAIError(f"the {param} could not be tokenized: {e}", param=param) from e

    def decode(self, ids: list[int], param: str = "tokens") -> str:
        tok = self._need_tokenizer()
        bad = [t for t in ids if not 0 <= t < self.engine.vocab_size]
        if bad:
            raise OpenAIError(f"token ids must be in [0, {self.engine.vocab_size}), got {bad[:5]}",
                              param=param)
        return tok.decode(ids)

    def apply_chat_template(self, messages: Sequence[ChatMessage], add_generation_prompt: bool
                            ) -> tuple[str, list[int]]:
        """The rendered chat prompt and its ids, as LLM.chat builds them."""
        tok = self._need_tokenizer()
        if not tok.chat_template:
            raise OpenAIError("this model has no chat template; use /v1/completions", param="messages")
        try:
            text = tok.apply_chat_template([m.to_template() for m in messages],
                                           add_generation_prompt=add_generation_prompt, tokenize=False)
        except Exception as e:  # the template raised (e.g. roles out of order) or failed to render
            raise OpenAIError(f"the chat template could not render these messages: {e}",
                              param="messages") from e
        # The template writes its own special tokens (BOS), so encode adds none, as transformers does.
        return text, self.encode(text, "messages", add_special_tokens=False)

    async def submit(self, request_id: str, inputs: list[tuple[str | None, list[int]]],
                     params: SamplingParams, param: str) -> list[RequestStream]:
        """Adds one engine request per prompt; a rejection aborts the ones already added."""
        if self.log_requests:
            log.info("Received request %s: %d prompt(s) of %s tokens, %s", request_id, len(inputs),
                     [len(ids) for _, ids in inputs], params)
        streams: list[RequestStream] = []
        try:
            for i, (text, ids) in enumerate(inputs):
                rid = request_id if len(inputs) == 1 else f"{request_id}-{i}"
                streams.append(await self.engine.add_request(rid, text, ids, params))
        except ValueError as e:
            raise OpenAIError(str(e), param=param) from e
        finally:
            if len(streams) < len(inputs):
                for s in streams:
                    s.abort()
        return streams


@dataclass
class ChoiceState:
    """How much of one choice has been sent in a stream."""

    text_sent: int = 0
    tokens_sent: int = 0
    finished: bool = False
    text_offset: int = 0  # completions logprobs: offset of the next token's text


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None
    stop_reason: int | str | None = None


def take_delta(state: ChoiceState, out: CompletionOutput) -> Delta | None:
    """What is new in `out` since the last call, or None when nothing is; outputs are cumulative."""
    if state.finished:
        return None
    n = len(out.token_ids)
    text = out.text[state.text_sent :]
    ids = out.token_ids[state.tokens_sent :]
    # The logprobs list is the engine's live one: slice it to the tokens this output reports.
    lps = out.logprobs[state.tokens_sent : n] if out.logprobs is not None else None
    if not text and not ids and out.finish_reason is None:
        return None
    state.text_sent += len(text)
    state.tokens_sent = n
    state.finished = out.finish_reason is not None
    return Delta(text, ids, lps, out.finish_reason, out.stop_reason)


def usage(outputs: Sequence[RequestOutput | None]) -> dict[str, int]:
    prompt = sum(len(o.prompt_token_ids) for o in outputs if o is not None)
    completion = sum(len(c.token_ids) for o in outputs if o is not None for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def collect(streams: list[RequestStream]) -> list[RequestOutput]:
    """The final output of each stream (the others' mailboxes hold their latest meanwhile)."""
    finals: list[RequestOutput] = []
    for s in streams:
        last = None
        async for out in s:
            last = out
        assert last is not None and last.finished
        finals.append(last)
    return finals


async def merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) from all streams as they arrive. The next output of a stream is only
    awaited after its previous one was consumed, so a stalled client buffers nothing here."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    pending = {asyncio.ensure_future(s.__anext__()): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                try:
                    out = task.result()
                except StopAsyncIteration:
                    continue
                yield i, out
                pending[asyncio.ensure_future(streams[i].__anext__())] = i
    finally:
        for task in pending:
            task.cancel()


class EngineStreamingResponse(StreamingResponse):
    """SSE over engine requests. Whatever ends the response (done, error, client gone, even
    before the body generator first ran) aborts the engine requests that are still running."""

    def __init__(self, content: AsyncIterator[str], streams: list[RequestStream]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._streams = streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for s in self._streams:
                s.abort()
            # Also finalize the body generator now (cancels merge()'s pump tasks) instead of at GC.
            with contextlib.suppress(RuntimeError):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]


class ClientDisconnected(Exception):
    pass


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Runs `work`, cancelling it if the client disconnects first (a non-streaming request must
    stop generating for nobody too). Waits on the ASGI disconnect message, no polling."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    raise ClientDisconnected


async def collect_final(request: Request, streams: list[RequestStream]) -> list[RequestOutput] | None:
    """Final outputs of a non-streaming request, or None when the client left first. Either way
    the streams are aborted afterwards, so nothing keeps generating for nobody."""
    try:
        return await until_disconnect(request, collect(streams))
    except ClientDisconnected:
        return None
    finally:
        for s in streams:
            s.abort()


def sse(obj: BaseModel | dict[str, Any]) -> str:
    body = obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj, ensure_ascii=True)
    return f"data: {body}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(e: Exception) -> str:
    log.warning("stream failed: %s", e)
    return sse(error_body(str(e), "internal_server_error"))


def token_text(lp: Logprob | None, token_id: int) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return f"token_id:{token_id}"  # no tokenizer (vLLM's convention)


def ranked(d: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    """The top-k entries by rank (the dict also holds the sampled token, whatever its rank)."""
    return sorted(((t, lp) for t, lp in d.items() if lp.rank <= k), key=lambda x: x[1].rank)[:k]
