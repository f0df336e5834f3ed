"""POST /v1/completions: legacy text completions.

Owns: prompt normalisation (a string, strings, token ids or lists of token ids), fan-out of
several prompts times n samples into choices (choice index = prompt index * n + sample), echo,
the legacy logprobs format, and the stream/non-stream payloads. Must not touch the engine
beyond `OpenAIServing`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kestrel.engine.async_engine import RequestStream
from kestrel.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from kestrel.entrypoints.openai.serving_base import (
    Accumulator,
    EventStreamResponse,
    OpenAIServing,
    collect_final,
    guarded_events,
    make_usage,
    merge_streams,
    new_id,
    unless_disconnected,
)
from kestrel.outputs import Logprob, RequestOutput

MAX_SEQUENCES = 1024  # prompts x n in one request


class ServingCompletion(OpenAIServing):
    async def create(self, request: CompletionRequest, raw: Request) -> Response:
        model = self.model_name(request.model)
        params = request.to_sampling_params(self.default_params)
        prompts = self._prompts(request)
        if len(prompts) * params.n > MAX_SEQUENCES:
            raise ValueError(f"prompt count ({len(prompts)}) x n ({params.n}) must be at most "
                             f"{MAX_SEQUENCES}")
        rid = new_id("cmpl")
        streams = await self.open_streams(rid, prompts, params, request.priority)
        texts = [text for _, text in prompts]
        if request.stream:
            events = self._stream(request, rid, model, streams, texts)
            return EventStreamResponse(guarded_events(events))
        finals = await unless_disconnected(raw, collect_final(streams))
        choices = []
        for i, out in enumerate(finals):
            for comp in out.outputs:
                text = comp.text
                logprobs = None
                if request.logprobs is not None:
                    logprobs = _logprobs(comp.logprobs or [], comp.token_ids, 0)
                if request.echo:
                    text = texts[i] + text
                    if logprobs is not None:
                        logprobs = self._echo_logprobs(out, texts[i], logprobs)
                choices.append(CompletionChoice(
                    index=i * params.n + comp.index, text=text, logprobs=logprobs,
                    finish_reason=comp.finish_reason, stop_reason=comp.stop_reason))
        body = CompletionResponse(id=rid, model=model, choices=choices, usage=make_usage(finals))
        return JSONResponse(body.model_dump())

    def _prompts(self, request: CompletionRequest) -> list[tuple[list[int], str]]:
        """(token ids, text) per prompt; text is decoded for token-id prompts (echo)."""
        prompt = request.prompt
        if isinstance(prompt, str):
            items: list[Any] = [prompt]
        elif not prompt:
            raise ValueError("prompt must not be empty")
        elif all(isinstance(t, int) for t in prompt):
            items = [prompt]
        else:
            items = list(prompt)
        out: list[tuple[list[int], str]] = []
        for item in items:
            if isinstance(item, str):
                out.append((self.encode(item, request.add_special_tokens), item))
            else:
                if not item:
                    raise ValueError("prompt must contain at least one token")
                if any(t < 0 or t >= self.engine.vocab_size for t in item):
                    bad = next(t for t in item if t < 0 or t >= self.engine.vocab_size)
                    raise ValueError(f"prompt_token_ids contains {bad}, outside the vocabulary "
                                     f"[0, {self.engine.vocab_size})")
                out.append((list(item), self.tokenizer.decode(item)))
        return out

    async def _stream(self, request: CompletionRequest, rid: str, model: str,
                      streams: list[RequestStream], texts: list[str]) -> AsyncIterator[Any]:
        created = int(time.time())
        n = request.n
        started: set[int] = set()  # choice indices with a chunk sent
        wholes = [Accumulator() for _ in streams]  # for the usage chunk
        async for i, out in merge_streams(streams):
            wholes[i].add(out)
            choices = []
            for comp in out.outputs:  # deltas: what is new since the previous output
                index = i * n + comp.index
                first = index not in started
                new_tokens = comp.token_ids
                if not (first and request.echo) and not comp.delta_text and not (
                    new_tokens and request.logprobs is not None) and not comp.finished:
                    continue
                text, logprobs = comp.delta_text, None
                if request.logprobs is not None:
                    logprobs = _logprobs(comp.logprobs or [], new_tokens, 0)
                if first and request.echo:
                    text = texts[i] + text
                    if logprobs is not None:
                        logprobs = self._echo_logprobs(out, texts[i], logprobs)
                started.add(index)
                choices.append({"index": index, "text": text,
                                "logprobs": logprobs.model_dump() if logprobs else None,
                                "finish_reason": comp.finish_reason,
                                "stop_reason": comp.stop_reason})
            if choices:
                yield {"id": rid, "object": "text_completion", "created": created,
                       "model": model, "choices": choices}
        if request.include_usage and all(w.finished for w in wholes):
            usage = make_usage([w.result() for w in wholes])
            yield {"id": rid, "object": "text_completion", "created": created, "model": model,
                   "choices": [], "usage": usage.model_dump()}

    def _echo_logprobs(self, out: RequestOutput, prompt_text: str, gen: CompletionLogprobs
                       ) -> CompletionLogprobs:
        """Prompt-token logprobs (the first token has none) followed by the generated ones."""
        entries = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
        prompt = _logprobs([e or {} for e in entries], out.prompt_token_ids, 0)
        if out.prompt_token_ids:
            first = self.tokenizer.decode(out.prompt_token_ids[:1])
            prompt.tokens[0], prompt.token_logprobs[0], prompt.top_logprobs[0] = first, None, None
            prompt.text_offset = [0] + [o + len(first) for o in prompt.text_offset[1:]]
        shift = len(prompt_text)
        return CompletionLogprobs(
            tokens=prompt.tokens + gen.tokens,
            token_logprobs=prompt.token_logprobs + gen.token_logprobs,
            top_logprobs=prompt.top_logprobs + gen.top_logprobs,
            text_offset=prompt.text_offset + [o + shift for o in gen.text_offset],
        )


def _logprobs(entries: list[dict[int, Logprob]], token_ids: list[int], offset: int
              ) -> CompletionLogprobs:
    """The legacy format: one entry per token, text offsets from `offset`."""
    result = CompletionLogprobs()
    for tok, entry in zip(token_ids, entries, strict=False):
        chosen = entry.get(tok) if entry else None
        text = chosen.decoded_token if chosen and chosen.decoded_token is not None else ""
        result.tokens.append(text)
        result.token_logprobs.append(chosen.logprob if chosen else None)
        result.top_logprobs.append(
            {(lp.decoded_token or ""): lp.logprob for lp in entry.values()} if entry else None)
        result.text_offset.append(offset)
        offset += len(text)
    return result
