"""The engine behind the HTTP server: one background thread runs it, asyncio tasks stream from it.

The engine is not thread safe, so only the engine thread touches it. Requests come in and are
aborted through a command deque that the thread drains between steps; when there is neither a
command nor unfinished work it sleeps on a Condition (no polling). Outputs go back to each
request's mailbox (a latest-value slot on the event loop) through loop.call_soon_threadsafe,
batched to one call per iteration so a step with 256 running requests costs one event-loop
wakeup, not 256.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from nanoflow.engine.engine import LLMEngine
from nanoflow.engine.request import RequestOutput
from nanoflow.entrypoints.server.metrics import EngineMetrics, EngineStats
from nanoflow.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine stopped (shutdown or a crashed engine thread): no request can be served."""


class EngineStepError(RuntimeError):
    """A step raised inside the engine; the requests in flight then were failed with this."""


class _Mailbox:
    """A latest-value slot, used on the event loop only. Outputs are cumulative, so a newer one
    replaces an unread older one: a stalled client holds one output, not one per step."""

    def __init__(self) -> None:
        self._item: RequestOutput | BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, item: RequestOutput | BaseException) -> None:
        if not isinstance(self._item, BaseException):  # an error is final
            self._item = item
            self._ready.set()

    async def get(self) -> RequestOutput | BaseException:
        while self._item is None:
            self._ready.clear()
            await self._ready.wait()
        item, self._item = self._item, None
        return item


@dataclass(eq=False)
class _Stream:
    """One engine request as the engine thread sees it; mailbox and future belong to `loop`."""

    request_id: str
    loop: asyncio.AbstractEventLoop
    mailbox: _Mailbox
    accepted: asyncio.Future
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    num_generated: int = 0


@dataclass
class _Add:
    stream: _Stream
    prompt: str | None
    prompt_token_ids: list[int] | None
    params: SamplingParams


@dataclass
class _Abort:
    request_id: str


class RequestStream:
    """Async iterator over one request's cumulative outputs; ends after the finished one.
    A consumer that falls behind skips straight to the newest output: fewer, larger chunks."""

    def __init__(self, engine: AsyncEngine, stream: _Stream) -> None:
        self._engine = engine
        self._stream = stream
        self.finished = False

    @property
    def request_id(self) -> str:
        return self._stream.request_id

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._stream.mailbox.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def abort(self) -> None:
        """Stops the request inside the engine (frees its KV pages); a no-op once it finished."""
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: EngineMetrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        # Read-only after construction, so the HTTP side may read them from its own thread.
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.arch.vocab_size
        self.num_pages = engine.num_pages
        self._cv = threading.Condition()
        self._commands: deque[_Add | _Abort] = deque()
        self._stopping = False
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._pending: dict[asyncio.AbstractEventLoop, list[tuple[Callable[..., Any], tuple]]] = {}
        self._last_preemptions = 0
        self._thread: threading.Thread | None = None
        self.dead: BaseException | None = None

    # --- lifecycle (any thread) ------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="nanoflow-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Aborts whatever is still in flight, then stops the engine thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():
            self.engine.shutdown()  # stops tensor-parallel workers, if any

    @property
    def healthy(self) -> bool:
        alive = self._thread is not None and self._thread.is_alive()
        return alive and self.dead is None and not self._stopping

    # --- requests (event-loop side) --------------------------------------------------------------
    async def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int] | None,
                          params: SamplingParams) -> RequestStream:
        """Queues a request; returns once the engine accepted it. Raises the engine's ValueError
        when it rejected the request (prompt too long, bad token ids, ...)."""
        loop = asyncio.get_running_loop()
        stream = _Stream(request_id, loop, _Mailbox(), loop.create_future())
        self._submit(_Add(stream, prompt, prompt_token_ids, params))
        try:
            await stream.accepted
        except asyncio.CancelledError:
            # The caller went away between submit and acceptance: the request must not run orphaned.
            self.abort(request_id)
            raise
        return RequestStream(self, stream)

    async def generate(self, request_id: str, prompt: str | None, prompt_token_ids: list[int] | None,
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Yields cumulative outputs until the request finishes; a consumer that stops early
        (client disconnect -> task cancelled, or aclose()) aborts the request."""
        stream = await self.add_request(request_id, prompt, prompt_token_ids, params)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        with self._cv:
            if self._stopping:
                return  # shutdown aborts everything anyway
            self._commands.append(_Abort(request_id))
            self._cv.notify()

    def _submit(self, cmd: _Add) -> None:
        with self._cv:
            if self._stopping or self.dead is not None:
                raise EngineDeadError("the engine is shutting down" if self._stopping else "the engine died")
            self._commands.append(cmd)
            self._cv.notify()

    # --- the engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                commands, stopping = self._next_commands()
                for cmd in commands:
                    self._apply(cmd)
                if stopping:
                    self._abort_all(EngineDeadError("the server is shutting down"), graceful=True)
                    self._flush()
                    return
                if self.engine.has_unfinished_requests():
                    self._step()
                self._publish_stats()
                self._flush()
        except BaseException as e:  # a bug in this loop: fail everything rather than hang clients
            log.exception("engine thread crashed")
            self.dead = e
            self._fail_streams(EngineDeadError(f"the engine thread crashed: {e!r}"))
            self._flush()

    def _next_commands(self) -> tuple[list[_Add | _Abort], bool]:
        with self._cv:
            while not self._commands and not self._stopping and not self.engine.has_unfinished_requests():
                self._cv.wait()
            commands = list(self._commands)
            self._commands.clear()
            return commands, self._stopping

    def _apply(self, cmd: _Add | _Abort) -> None:
        if isinstance(cmd, _Abort):
            out = self.engine.abort_request(cmd.request_id)
            stream = self._streams.pop(cmd.request_id, None)
            if stream is not None:
                if out is not None:
                    self._post(stream.loop, stream.mailbox.put, out)
                self._finished(stream, "abort")
            return
        s = cmd.stream
        try:
            self.engine.add_request(s.request_id, cmd.prompt, cmd.prompt_token_ids, cmd.params)
        except ValueError as e:
            self._post(s.loop, _resolve, s.accepted, e)
            return
        self._streams[s.request_id] = s
        self._post(s.loop, _resolve, s.accepted, None)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            # Engine state after a failed step is unknown: fail the requests in flight (their
            # clients get an error) and free everything, so later requests start clean.
            log.exception("engine step failed; failing %d request(s)", len(self._streams))
            self._abort_all(EngineStepError(f"the engine failed: {e!r}"))
            return
        now = time.monotonic()
        m = self.metrics
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            n = sum(len(o.token_ids) for o in out.outputs)
            if m is not None and n > stream.num_generated:
                if stream.first_token_at is None:
                    m.first_token(now - stream.arrival, len(out.prompt_token_ids))
                m.generated(n - stream.num_generated)
            if stream.first_token_at is None and n > 0:
                stream.first_token_at = now
            stream.num_generated = n
            self._post(stream.loop, stream.mailbox.put, out)
            if out.finished:
                del self._streams[out.request_id]
                self._finished(stream, out.outputs[0].finish_reason or "stop",
                               max(len(o.token_ids) for o in out.outputs))

    def _finished(self, stream: _Stream, reason: str, tokens_per_seq: int = 0) -> None:
        if self.metrics is None:
            return
        now = time.monotonic()
        tpot = None
        if stream.first_token_at is not None and tokens_per_seq > 1:
            tpot = (now - stream.first_token_at) / (tokens_per_seq - 1)
        self.metrics.finished(reason, now - stream.arrival, tpot)

    def _abort_all(self, error: BaseException, graceful: bool = False) -> None:
        """Aborts every request in the engine. graceful (shutdown): streams end with their
        finish_reason "abort" output; otherwise they get `error` raised."""
        for rid in list(self.engine.requests):
            try:
                out = self.engine.abort_request(rid)
            except Exception:
                log.exception("abort of %s failed", rid)
                continue
            stream = self._streams.get(rid) if graceful and out is not None else None
            if stream is not None:
                del self._streams[rid]
                self._post(stream.loop, stream.mailbox.put, out)
                self._finished(stream, "abort")
        self._fail_streams(error)  # the streams left get `error`

    def _fail_streams(self, error: BaseException) -> None:
        for stream in self._streams.values():
            self._post(stream.loop, stream.mailbox.put, error)
            self._finished(stream, "error")
        self._streams.clear()
        if isinstance(error, EngineDeadError):
            self._refuse_pending(error)

    def _refuse_pending(self, error: BaseException) -> None:
        """Adds still queued behind a stop or a crash are refused, not left waiting forever."""
        with self._cv:
            leftover = [c for c in self._commands if isinstance(c, _Add)]
            self._commands = deque(c for c in self._commands if not isinstance(c, _Add))
        for cmd in leftover:
            self._post(cmd.stream.loop, _resolve, cmd.stream.accepted, EngineDeadError(str(error)))

    def _publish_stats(self) -> None:
        if self.metrics is None:
            return
        sched = self.engine.scheduler
        self.metrics.engine_stats(EngineStats(
            running=len({s.request_id for s in sched.running}),
            waiting=len({s.request_id for s in sched.waiting}),
            free_pages=self.engine.num_free_pages,
            total_pages=self.engine.num_pages,
            preemptions=sched.num_preemptions,
        ))

    def _post(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
        self._pending.setdefault(loop, []).append((fn, args))

    def _flush(self) -> None:
        pending, self._pending = self._pending, {}
        for loop, calls in pending.items():
            try:
                loop.call_soon_threadsafe(_run_calls, calls)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                pass


def _run_calls(calls: list[tuple[Callable[..., Any], tuple]]) -> None:
    for fn, args in calls:
        fn(*args)


def _resolve(fut: asyncio.Future, error: BaseException | None) -> None:
    if fut.done():  # the waiter was cancelled
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)
