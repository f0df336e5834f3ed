"""POST /v1/chat/completions.

Owns: turning messages into a prompt through the chat template (see `chat_prompt` for how
typed special tokens are neutralised), the chat logprobs format, and the stream payloads:
for each choice a first chunk with the role, then content deltas, then one with
`finish_reason`; optionally a final usage chunk. Must not touch the engine beyond
`OpenAIServing`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kestrel.engine.async_engine import AsyncEngine, RequestStream
from kestrel.entrypoints.openai.chat_prompt import ChatEncoder, messages_to_dicts
from kestrel.entrypoints.openai.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    TokenLogprob,
    TopLogprob,
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
    token_bytes,
    unless_disconnected,
)
from kestrel.outputs import Logprob

# apply_chat_template's own parameters: a request may not override them through
# chat_template_kwargs.
_RESERVED_TEMPLATE_KWARGS = {
    "conversation", "messages", "tokenize", "return_dict", "return_tensors", "padding",
    "truncation", "max_length", "tokenizer_kwargs", "chat_template", "add_generation_prompt",
    "continue_final_message", "return_assistant_tokens_mask",
}


class ServingChat(OpenAIServing):
    def __init__(self, engine: AsyncEngine, tokenizer: Any, served_model_names: list[str],
                 allow_special_tokens_in_messages: bool = False) -> None:
        super().__init__(engine, tokenizer, served_model_names)
        self.encoder = ChatEncoder(tokenizer, allow_special_tokens_in_messages)

    def render(self, request: Any) -> tuple[str, list[int]]:
        """(prompt text, prompt ids) for a request with `messages`; ValueError on failure."""
        kwargs = dict(getattr(request, "chat_template_kwargs", None) or {})
        reserved = sorted(_RESERVED_TEMPLATE_KWARGS & kwargs.keys())
        if reserved:
            raise ValueError(f"chat_template_kwargs may not set {reserved}")
        continue_final = getattr(request, "continue_final_message", False)
        if continue_final and request.add_generation_prompt:
            raise ValueError("continue_final_message requires add_generation_prompt to be false")
        if continue_final:
            kwargs["continue_final_message"] = True
        messages = messages_to_dicts(request.messages)
        return self.encoder.encode(messages, request.add_generation_prompt, **kwargs)

    async def create(self, request: ChatCompletionRequest, raw: Request) -> Response:
        model = self.model_name(request.model)
        params = request.to_sampling_params(self.default_params)
        text, ids = self.render(request)
        rid = new_id("chatcmpl")
        streams = await self.open_streams(rid, [(ids, text)], params, request.priority)
        if request.stream:
            return EventStreamResponse(guarded_events(self._stream(request, rid, model, streams)))
        (out,) = await unless_disconnected(raw, collect_final(streams))
        choices = []
        for comp in out.outputs:
            logprobs = None
            if request.logprobs:
                logprobs = _logprobs(comp.logprobs or [], comp.token_ids, request.top_logprobs)
            choices.append(ChatChoice(
                index=comp.index, message=AssistantMessage(content=comp.text),
                logprobs=logprobs, finish_reason=comp.finish_reason,
                stop_reason=comp.stop_reason))
        body = ChatCompletionResponse(id=rid, model=model, choices=choices,
                                      usage=make_usage([out]))
        return JSONResponse(body.model_dump())

    async def _stream(self, request: ChatCompletionRequest, rid: str, model: str,
                      streams: list[RequestStream]) -> AsyncIterator[Any]:
        created = int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
        yield {**head, "choices": [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None} for i in range(request.n)]}
        whole = Accumulator()  # for the usage chunk
        async for _, out in merge_streams(streams):
            whole.add(out)
            choices = []
            for comp in out.outputs:  # deltas: what is new since the previous output
                new_tokens = comp.token_ids
                wants_logprobs = request.logprobs and new_tokens
                if not (comp.delta_text or wants_logprobs or comp.finished):
                    continue
                choice: dict[str, Any] = {
                    "index": comp.index, "delta": {"content": comp.delta_text},
                    "logprobs": None, "finish_reason": comp.finish_reason}
                if comp.finished:
                    choice["stop_reason"] = comp.stop_reason
                if wants_logprobs:
                    choice["logprobs"] = _logprobs(comp.logprobs or [], new_tokens,
                                                   request.top_logprobs).model_dump()
                choices.append(choice)
            if choices:
                yield {**head, "choices": choices}
        if request.include_usage and whole.finished:
            yield {**head, "choices": [], "usage": make_usage([whole.result()]).model_dump()}


def _logprobs(entries: list[dict[int, Logprob]], token_ids: list[int], top: int | None
              ) -> ChoiceLogprobs:
    content = []
    for tok, entry in zip(token_ids, entries, strict=False):
        chosen = entry.get(tok)
        if chosen is None:
            continue
        text = chosen.decoded_token or ""
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank)[: top or 0]
        content.append(TokenLogprob(
            token=text, logprob=chosen.logprob, bytes=token_bytes(text),
            top_logprobs=[TopLogprob(token=lp.decoded_token or "", logprob=lp.logprob,
                                     bytes=token_bytes(lp.decoded_token or ""))
                          for _, lp in ranked]))
    return ChoiceLogprobs(content=content)
