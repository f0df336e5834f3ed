"""Machinery shared by the completion and chat handlers.

Owns: model-name checks, front-end tokenization, opening engine streams for one HTTP request
(several prompts and/or n samples), merging them, aborting them when the client goes away,
server-sent events and usage accounting. Must not build endpoint-specific payloads.

The front end keeps its own tokenizer instance: the engine thread uses the engine's, and a
Rust tokenizer must not be driven from two threads at once.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import replace
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from kestrel.engine.async_engine import AsyncEngine, RequestStream
from kestrel.entrypoints.openai.errors import APIError, from_exception
from kestrel.entrypoints.openai.protocol import PromptTokensDetails, Usage
from kestrel.outputs import CompletionOutput, RequestOutput
from kestrel.sampling_params import SamplingParams

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The HTTP client went away before the response was ready."""


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, tokenizer: Any, served_model_names: list[str]) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.served_model_names = served_model_names

    @property
    def default_params(self) -> SamplingParams:
        return self.engine.default_params

    def model_name(self, requested: str | None) -> str:
        """The name responses carry; 404 for a model this server does not serve."""
        if requested is None or requested == "":
            return self.served_model_names[0]
        if requested not in self.served_model_names:
            raise APIError(404, f"the model {requested!r} does not exist; this server serves "
                                f"{self.served_model_names}", param="model",
                           code="model_not_found")
        return requested

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not text:
            raise ValueError("prompt must not be empty")
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)

    async def open_streams(
        self,
        base_id: str,
        prompts: list[tuple[list[int], str | None]],
        params: SamplingParams,
        priority: int = 0,
    ) -> list[RequestStream]:
        """One engine request per prompt (each fans out to params.n samples), streaming delta
        outputs (`Accumulator` rebuilds whole ones). If any prompt is refused, the ones
        already queued are aborted and the error is raised."""
        streams: list[RequestStream] = []
        try:
            for i, (ids, text) in enumerate(prompts):
                rid = base_id if len(prompts) == 1 else f"{base_id}-{i}"
                streams.append(await self.engine.add_request(
                    rid, ids, params, priority=priority, prompt_text=text,
                    output_kind="delta"))
        except BaseException:
            for stream in streams:
                stream.abort()
            raise
        return streams


async def merge_streams(streams: list[RequestStream]
                        ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) from all streams as they arrive; aborts every stream that has
    not finished when the consumer stops (disconnect, error, cancellation)."""
    try:
        if len(streams) == 1:
            async for out in streams[0]:
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream: RequestStream) -> None:
            try:
                async for out in stream:
                    queue.put_nowait((i, out, None))
            except Exception as exc:  # noqa: BLE001 - re-raised by the consumer
                queue.put_nowait((i, None, exc))
            finally:
                queue.put_nowait((i, None, None))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        try:
            remaining = len(streams)
            while remaining:
                i, out, exc = await queue.get()
                if exc is not None:
                    raise exc
                if out is None:
                    remaining -= 1
                else:
                    yield i, out
        finally:
            for task in tasks:
                task.cancel()
    finally:
        for stream in streams:
            stream.abort()


class Accumulator:
    """The whole output of one request, rebuilt from its delta outputs."""

    def __init__(self) -> None:
        self._comps: dict[int, CompletionOutput] = {}
        self._last: RequestOutput | None = None

    def add(self, out: RequestOutput) -> None:
        for comp in out.outputs:
            acc = self._comps.get(comp.index)
            if acc is None:
                acc = self._comps[comp.index] = CompletionOutput(comp.index, "", [])
            acc.text += comp.text
            acc.token_ids.extend(comp.token_ids)
            if comp.logprobs is not None:
                acc.logprobs = acc.logprobs if acc.logprobs is not None else []
                acc.logprobs.extend(comp.logprobs)
            acc.cumulative_logprob = comp.cumulative_logprob
            acc.finish_reason, acc.stop_reason = comp.finish_reason, comp.stop_reason
        self._last = out

    @property
    def finished(self) -> bool:
        return self._last is not None and self._last.finished

    def result(self) -> RequestOutput:
        assert self._last is not None, "no output yet"
        return replace(self._last, outputs=[self._comps[i] for i in sorted(self._comps)])


async def collect_final(streams: list[RequestStream]) -> list[RequestOutput]:
    accs = [Accumulator() for _ in streams]
    async for i, out in merge_streams(streams):
        accs[i].add(out)
    return [acc.result() for acc in accs]


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (which aborts its engine requests) if the client leaves."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


class EventStreamResponse(StreamingResponse):
    """Server-sent events from an async iterator of `data:` payloads (dicts or strings).

    Unlike a plain streaming response it watches for the client's disconnect the whole time
    (even while no event is due) and always closes the iterator, so the engine requests
    behind it are aborted at once.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[Any]) -> None:
        super().__init__(events, status_code=200, media_type=self.media_type,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stream() -> None:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            async for event in self.events:
                await send({"type": "http.response.body", "body": sse(event), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        task = asyncio.ensure_future(stream())
        watch = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (task, watch):
                t.cancel()
            await asyncio.gather(task, watch, return_exceptions=True)
            await self.events.aclose()  # type: ignore[attr-defined]


def sse(event: Any) -> bytes:
    payload = event if isinstance(event, str) else json.dumps(event, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


async def guarded_events(events: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """Pass events through; an error mid-stream becomes one OpenAI error event. Always ends
    with `[DONE]`."""
    try:
        async for event in events:
            yield event
    except Exception as exc:  # noqa: BLE001 - the status line is sent already
        yield from_exception(exc).body()
    yield "[DONE]"


def make_usage(outputs: list[RequestOutput]) -> Usage:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in outputs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))

