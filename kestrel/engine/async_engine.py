"""AsyncEngine: the synchronous `Engine` driven by one background thread, with an asyncio
stream per request. The server's only dependency on the engine.

Owns: the engine thread (the only thread that ever calls into `Engine`), the thread-safe
command queue that carries requests and aborts to it, delivery of outputs to per-request
asyncio queues, per-request latency bookkeeping for metrics, and the engine's liveness (a step
that raises fails every in-flight request and marks the engine dead). Must not parse HTTP or
know about OpenAI formats.

    asyncio side                          engine thread
    ------------                          -------------
    add_request() --command--> queue ---> engine.add_request()   (between steps)
    stream.abort() --command--> queue --> engine.abort()         (frees KV at once)
    RequestStream  <--call_soon_threadsafe-- engine.step() outputs
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from kestrel.config import EngineConfig
from kestrel.outputs import RequestOutput
from kestrel.sampling_params import SamplingParams

logger = logging.getLogger("kestrel")
T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine loop stopped (a step raised, or it was shut down); nothing more will run."""


class QueueFullError(RuntimeError):
    """The waiting queue holds `max_queued_requests` requests already."""


class EngineObserver:
    """Metric hooks. Called on the engine thread after each step: keep them cheap; an
    exception raised here is logged and ignored, never fatal to the engine."""

    def on_first_token(self, ttft_s: float) -> None: ...

    def on_tokens(self, num_tokens: int, itl_s: float | None) -> None: ...

    def on_finish(self, finish_reason: str, e2e_s: float, num_prompt_tokens: int,
                  num_generated_tokens: int) -> None: ...

    def on_stats(self, stats: dict[str, float]) -> None: ...


class RequestStream:
    """The outputs of one request, in order, as an async iterator, of the `output_kind` it was
    added with ("cumulative" or "delta").

    When the consumer lags, outputs that queued up are merged into one (cumulative: the newest,
    whose token lists are complete; delta: token ids, logprobs and text concatenated; both:
    the `delta_text`s concatenated), so a stream never falls further behind than one item.
    Raises `EngineDeadError` if the engine dies.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], engine: AsyncEngine,
                 queue: asyncio.Queue, output_kind: str = "cumulative") -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.output_kind = output_kind
        self.finished = False
        self._engine = engine
        self._queue = queue

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        items = [await self._queue.get()]
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        error = next((i for i in items if isinstance(i, BaseException)), None)
        if error is not None:
            self.finished = True
            raise error
        out = _merge(items, self.output_kind == "delta")
        self.finished = out.finished
        return out

    def abort(self) -> None:
        """Stop the request (idempotent); its KV blocks are freed before the next step."""
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)


def _merge(items: list[RequestOutput], delta: bool) -> RequestOutput:
    last = items[-1]
    if len(items) > 1:
        for comp in last.outputs:
            parts = [o.outputs[comp.index] for o in items if comp.index < len(o.outputs)]
            comp.delta_text = "".join(c.delta_text for c in parts)
            if delta:
                comp.text = "".join(c.text for c in parts)
                comp.token_ids = [t for c in parts for t in c.token_ids]
                if any(c.logprobs is not None for c in parts):
                    comp.logprobs = [lp for c in parts for lp in c.logprobs or []]
    return last


@dataclass
class _Tracked:
    """Engine-thread view of one live request: where to deliver and latency bookkeeping."""

    stream: RequestStream
    loop: asyncio.AbstractEventLoop
    arrival: float
    num_prompt_tokens: int
    first_token: float | None = None
    last_token: float | None = None
    num_generated: int = 0


class AsyncEngine:
    """Runs an `Engine` on a background thread. Construct from a config (the engine is built
    on that thread; the constructor blocks until it is ready or re-raises its load error)."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        max_queued_requests: int | None = None,
        observer: EngineObserver | None = None,
        log_stats_interval_s: float = 10.0,
        engine_factory: Callable[[EngineConfig], Any] | None = None,
    ) -> None:
        self.max_queued_requests = max_queued_requests
        self.observer = observer or EngineObserver()
        self._log_interval = log_stats_interval_s
        self._cond = threading.Condition()
        self._commands: list[tuple[Callable[[Any], Any], concurrent.futures.Future]] = []
        self._tracked: dict[str, _Tracked] = {}
        self._stopping = False
        self.dead_error: EngineDeadError | None = None
        self._stats: dict[str, float] = {}
        ready: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._thread_main, args=(config, engine_factory, ready),
            name="kestrel-engine", daemon=True,
        )
        self._thread.start()
        self._engine = ready.result()  # re-raises a load error in the caller's thread
        # Constants of the loaded engine; safe to read from any thread.
        self.max_model_len: int = self._engine.max_model_len
        self.vocab_size: int = self._engine.vocab_size
        self.config: EngineConfig = self._engine.config
        self.default_params: SamplingParams = self._engine.default_params

    # ------------------------------------------------------------------ public API
    @property
    def is_alive(self) -> bool:
        return self.dead_error is None and self._thread.is_alive()

    def stats(self) -> dict[str, float]:
        """The newest engine-thread snapshot (running/waiting, KV usage, prefix cache)."""
        return dict(self._stats)

    def call(self, fn: Callable[[Any], T]) -> concurrent.futures.Future[T]:
        """Run `fn(engine)` on the engine thread between steps; from any thread."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self.dead_error is not None or self._stopping:
                future.set_exception(self.dead_error or EngineDeadError("engine is shut down"))
                return future
            self._commands.append((fn, future))
            self._cond.notify()
        return future

    async def run(self, fn: Callable[[Any], T]) -> T:
        return await asyncio.wrap_future(self.call(fn))

    async def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        priority: int = 0,
        add_special_tokens: bool = True,
        prompt_text: str | None = None,
        extra_key: str | None = None,
        output_kind: str = "cumulative",
    ) -> RequestStream:
        """Queue a request. Raises ValueError for bad input (nothing is queued),
        QueueFullError when the waiting queue is full, EngineDeadError when the engine died.
        output_kind "delta" yields only what is new in each output (token ids, logprobs,
        text): no step copies a request's whole output, which is what a server wants."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def add(engine: Any) -> RequestStream:
            limit = self.max_queued_requests
            if limit is not None and engine.scheduler.num_waiting >= limit:
                raise QueueFullError(
                    f"the server has {engine.scheduler.num_waiting} requests waiting, the "
                    f"limit set by max_queued_requests={limit}; retry later"
                )
            ids = engine.add_request(request_id, prompt, params, priority=priority,
                                     add_special_tokens=add_special_tokens,
                                     prompt_text=prompt_text, extra_key=extra_key,
                                     output_kind=output_kind)
            stream = RequestStream(request_id, ids, self, queue, output_kind)
            self._tracked[request_id] = _Tracked(stream, loop, time.monotonic(), len(ids))
            return stream

        return await self.run(add)

    async def generate(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[RequestOutput]:
        """add_request + iterate; the request is aborted if the caller stops early."""
        stream = await self.add_request(request_id, prompt, params, **kwargs)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        """Abort from any thread, without waiting; unknown or finished ids are ignored."""

        def do_abort(engine: Any) -> None:
            tracked = self._tracked.pop(request_id, None)
            if tracked is not None:
                engine.abort(request_id)
                self.observer.on_finish("abort", time.monotonic() - tracked.arrival,
                                        tracked.num_prompt_tokens, tracked.num_generated)

        self.call(do_abort)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop; in-flight requests fail with EngineDeadError."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ engine thread
    def _thread_main(self, config: EngineConfig, factory: Callable | None,
                     ready: concurrent.futures.Future) -> None:
        try:
            if factory is None:
                from kestrel.engine.engine import Engine

                factory = Engine
            engine = factory(config)
        except BaseException as exc:  # noqa: BLE001 - handed to the constructor's caller
            ready.set_exception(exc)
            return
        ready.set_result(engine)
        try:
            self._loop(engine)
        except BaseException as exc:  # noqa: BLE001 - any failure kills the engine, loudly
            logger.exception("engine loop failed; failing all in-flight requests")
            self._die(EngineDeadError(f"engine loop failed: {type(exc).__name__}: {exc}"))
        else:
            self._die(EngineDeadError("engine is shut down"))

    def _loop(self, engine: Any) -> None:
        """The one core loop: run queued commands, then one step if anything is unfinished;
        sleep on the condition while idle."""
        last_log = time.monotonic()
        while True:
            with self._cond:
                while not (self._commands or self._stopping or engine.has_unfinished()):
                    self._cond.wait()
                if self._stopping:
                    return
                commands, self._commands = self._commands, []
            for fn, future in commands:
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    future.set_result(fn(engine))
                except Exception as exc:  # noqa: BLE001 - bad input goes back to its caller
                    future.set_exception(exc)
            if engine.has_unfinished():
                outputs = engine.step()
                self._dispatch(outputs, time.monotonic())
            self._refresh_stats(engine)
            if self._log_interval > 0 and time.monotonic() - last_log >= self._log_interval:
                last_log = time.monotonic()
                if self._tracked:
                    logger.info("running=%d waiting=%d kv_usage=%.1f%% prefix_hit_rate=%.1f%%",
                                self._stats["num_running"], self._stats["num_waiting"],
                                100 * self._stats["kv_cache_usage"],
                                100 * self._stats["prefix_cache_hit_rate"])

    def _dispatch(self, outputs: list[RequestOutput], now: float) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        for out in outputs:
            tracked = self._tracked.get(out.request_id)
            if tracked is None:
                continue  # aborted while its step ran
            self._observe(tracked, out, now)
            if out.finished:
                del self._tracked[out.request_id]
            by_loop.setdefault(tracked.loop, []).append((tracked.stream._queue, out))
        for loop, items in by_loop.items():
            _deliver_threadsafe(loop, items)

    def _observe(self, tracked: _Tracked, out: RequestOutput, now: float) -> None:
        num = sum(len(c.token_ids) for c in out.outputs)
        if tracked.stream.output_kind == "delta":
            num += tracked.num_generated
        new = num - tracked.num_generated
        try:
            if new > 0:
                if tracked.first_token is None:
                    tracked.first_token = now
                    self.observer.on_first_token(now - tracked.arrival)
                    self.observer.on_tokens(new, None)
                else:
                    self.observer.on_tokens(new, now - (tracked.last_token or now))
                tracked.last_token = now
                tracked.num_generated = num
            if out.finished:
                reason = (out.outputs[0].finish_reason if out.outputs else None) or "stop"
                self.observer.on_finish(reason, now - tracked.arrival,
                                        tracked.num_prompt_tokens, num)
        except Exception:  # noqa: BLE001
            logger.exception("metrics observer failed")

    def _refresh_stats(self, engine: Any) -> None:
        stats = dict(engine.stats())
        kv = engine.kv
        stats.update(num_free_blocks=kv.num_free_blocks, num_blocks=kv.num_blocks,
                     prefix_cache_queries=kv.prefix_cache_queries,
                     prefix_cache_hits=kv.prefix_cache_hits)
        self._stats = stats
        try:
            self.observer.on_stats(stats)
        except Exception:  # noqa: BLE001
            logger.exception("metrics observer failed")

    def _die(self, error: EngineDeadError) -> None:
        with self._cond:
            self.dead_error = error
            commands, self._commands = self._commands, []
        for _, future in commands:
            if future.set_running_or_notify_cancel():
                future.set_exception(error)
        tracked, self._tracked = self._tracked, {}
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        for t in tracked.values():
            by_loop.setdefault(t.loop, []).append((t.stream._queue, error))
            try:
                self.observer.on_finish("error", time.monotonic() - t.arrival,
                                        t.num_prompt_tokens, t.num_generated)
            except Exception:  # noqa: BLE001
                logger.exception("metrics observer failed")
        for loop, items in by_loop.items():
            _deliver_threadsafe(loop, items)


def _deliver_threadsafe(loop: asyncio.AbstractEventLoop, items: list[tuple[asyncio.Queue, Any]]
                        ) -> None:
    def deliver() -> None:
        for queue, item in items:
            queue.put_nowait(item)

    try:
        loop.call_soon_threadsafe(deliver)
    except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
        pass
