"""LLM: the offline batch façade over `Engine` (generate / chat), vLLM-style.

Owns: normalising user prompts, running the engine to completion with a progress bar and
returning outputs in input order. Must stay thin: all logic lives in the engine.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from kestrel.config import EngineConfig
from kestrel.engine.engine import Engine
from kestrel.engine.tokenizer import render_chat
from kestrel.outputs import RequestOutput
from kestrel.sampling_params import SamplingParams

Prompt = str | list[int]
Message = dict[str, Any]


class LLM:
    def __init__(self, model: str | None = None, **engine_options: Any) -> None:
        if model is None:
            from kestrel.assets import default_model_path

            model = default_model_path()
        self.engine = Engine(EngineConfig.from_kwargs(model, **engine_options))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Complete every prompt; outputs come back in input order."""
        batch = _as_prompt_list(prompts)
        return self._run([(p, True) for p in batch], sampling_params, use_tqdm, priority)

    def chat(
        self,
        messages: list[Message] | Sequence[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        texts = [
            render_chat(self.engine.tokenizer, list(conv), add_generation_prompt, chat_template,
                        **(chat_template_kwargs or {}))
            for conv in conversations
        ]
        # NOTE: the template already holds any bos token, so none is added when encoding.
        return self._run([(t, False) for t in texts], sampling_params, use_tqdm, None)

    def _run(
        self,
        prompts: list[tuple[Prompt, bool]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
        use_tqdm: bool,
        priority: Sequence[int] | None,
    ) -> list[RequestOutput]:
        engine = self.engine
        params = _per_prompt(sampling_params, len(prompts), engine.default_params,
                             "sampling_params")
        priorities = _per_prompt(list(priority) if priority is not None else None,
                                 len(prompts), 0, "priority")
        # Validate everything first so a bad prompt queues nothing.
        encoded = [engine.encode(p, special) for p, special in prompts]
        for ids, sp in zip(encoded, params):
            engine.validate(ids, sp)
        order: dict[str, int] = {}
        for i, ((prompt, _), ids, sp, prio) in enumerate(zip(prompts, encoded, params, priorities)):
            rid = str(next(self._ids))
            engine.add_request(rid, ids, sp, priority=prio, output_kind="final",
                               prompt_text=prompt if isinstance(prompt, str) else None)
            order[rid] = i
        results: list[RequestOutput | None] = [None] * len(prompts)
        bar = tqdm(total=len(prompts), desc="generating", disable=not use_tqdm)
        try:
            while any(r is None for r in results):
                for out in engine.step():
                    if out.finished:
                        results[order[out.request_id]] = out
                        bar.update(1)
        finally:
            bar.close()
            for rid, i in order.items():
                if results[i] is None:
                    engine.abort(rid)
        return [r for r in results if r is not None]


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


def _per_prompt(value: Any, n: int, default: Any, name: str) -> list[Any]:
    if value is None:
        return [default] * n
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries but there are {n} prompts")
        return list(value)
    return [value] * n
