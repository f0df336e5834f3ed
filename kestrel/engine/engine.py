"""Engine: the synchronous core loop. add_request / step / abort over scheduler + executor.

Owns: input validation that needs the model (context length, vocabulary), fan-out of n>1
requests into sibling sequences, detokenization and stop strings, and assembling
`RequestOutput`s. Must not touch tensors or KV blocks directly.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field

from kestrel.config import EngineConfig
from kestrel.engine.detokenizer import IncrementalDetokenizer, decode_token
from kestrel.engine.tokenizer import eos_token_ids, generation_defaults, load_tokenizer
from kestrel.executor.executor import UniprocExecutor
from kestrel.kv.kv_manager import KVCacheManager
from kestrel.models.loader import load_hf_config
from kestrel.outputs import CompletionOutput, Logprob, ModelOutput, RequestOutput, TokenLogprobs
from kestrel.request import Request, RequestStatus
from kestrel.sampling_params import SamplingParams
from kestrel.scheduler.output import SchedulerOutput
from kestrel.scheduler.scheduler import Scheduler

logger = logging.getLogger("kestrel")

# What step() returns for a request: everything so far, only what is new, or nothing until done.
OUTPUT_KINDS = ("cumulative", "delta", "final")


@dataclass
class _Group:
    """One user request: n sibling sequences sharing a prompt."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    child_ids: list[str]
    detoks: list[IncrementalDetokenizer]
    completions: list[CompletionOutput]
    output_kind: str = "cumulative"
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    num_cached_tokens: int = 0
    children_done: set[int] = field(default_factory=set)
    num_sent: list[int] = field(default_factory=list)  # tokens already sent, per child (delta)

    @property
    def finished(self) -> bool:
        return len(self.children_done) == len(self.child_ids)


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        t0 = time.perf_counter()
        model_dir = config.model.model
        hf_config = load_hf_config(model_dir)
        self.config = config.resolve(hf_config)
        self.tokenizer = load_tokenizer(config.model.tokenizer or model_dir)
        self.eos_token_ids = eos_token_ids(model_dir, self.tokenizer, hf_config)
        self.default_params = SamplingParams(
            **(generation_defaults(model_dir) if config.model.use_generation_config else {})
        )
        self.executor = UniprocExecutor(self.config)
        self.vocab_size = self.executor.vocab_size
        num_blocks = self.executor.determine_num_blocks()
        self.executor.initialize(num_blocks)
        cache = self.config.cache
        self.kv = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.scheduler = Scheduler(self.config.scheduler, self.kv)
        self._groups: dict[str, _Group] = {}
        self._async = self.config.scheduler.async_scheduling == "on"
        self._inflight: tuple[SchedulerOutput, object] | None = None  # launched, not yet read
        self._child_to_group: dict[str, tuple[_Group, int]] = {}
        # NOTE: the objects built so far (modules, configs, tokenizer) live as long as the
        # engine; moving them out of the collector's generations keeps full collections,
        # which run in the middle of steps, from rescanning them.
        gc.collect()
        gc.freeze()
        logger.info("engine ready in %.2f s", time.perf_counter() - t0)

    # ------------------------------------------------------------------ inputs
    @property
    def max_model_len(self) -> int:
        return self.config.model.max_model_len  # type: ignore[return-value]

    def encode(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            return list(self.tokenizer(prompt, add_special_tokens=add_special_tokens).input_ids)
        if not isinstance(prompt, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            raise ValueError("prompt must be a string or a list of integer token ids")
        return list(prompt)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Model-dependent checks; raises ValueError naming the field and the limit."""
        n, limit, vocab = len(prompt_ids), self.max_model_len, self.vocab_size
        if n == 0:
            raise ValueError("prompt must contain at least one token")
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(
                f"prompt_token_ids contains {bad}, outside the vocabulary [0, {vocab})"
            )
        if n >= limit:
            raise ValueError(
                f"prompt is {n} tokens long but max_model_len is {limit}: the prompt must be "
                f"at most {limit - 1} tokens to leave room for one output token"
            )
        if params.max_tokens is not None and n + params.max_tokens > limit:
            raise ValueError(
                f"max_tokens={params.max_tokens} cannot fit: prompt ({n} tokens) + max_tokens "
                f"must be <= max_model_len={limit}, so max_tokens <= {limit - n}"
            )
        for name, ids in (("stop_token_ids", params.stop_token_ids or []),
                          ("logit_bias", list(params.logit_bias or {}))):
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise ValueError(f"{name} contains {bad}, outside the vocabulary [0, {vocab})")

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        priority: int = 0,
        add_special_tokens: bool = True,
        extra_key: str | None = None,
        prompt_text: str | None = None,
        output_kind: str = "cumulative",
    ) -> list[int]:
        """Validate and queue a request; returns its prompt token ids. Raises ValueError on
        bad input before anything is queued or allocated.

        output_kind: "cumulative" (each RequestOutput holds all tokens and text so far),
        "delta" (only what is new since the previous one) or "final" (one output, at the end).
        """
        params = params if params is not None else self.default_params
        if output_kind not in OUTPUT_KINDS:
            raise ValueError(
                f"output_kind must be one of {list(OUTPUT_KINDS)}, got {output_kind!r}"
            )
        if request_id in self._groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if not isinstance(priority, int):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        prompt_ids = self.encode(prompt, add_special_tokens)
        self.validate(prompt_ids, params)
        if params.max_tokens is None:
            params = params.clone(max_tokens=self.max_model_len - len(prompt_ids))
        group = _Group(
            request_id=request_id,
            prompt=prompt if isinstance(prompt, str) else prompt_text,
            prompt_token_ids=prompt_ids,
            params=params,
            child_ids=[],
            detoks=[],
            completions=[],
            output_kind=output_kind,
            prompt_logprobs=(
                [None] * len(prompt_ids) if params.prompt_logprobs is not None else None
            ),
        )
        arrival = time.monotonic()
        for idx in range(params.n):
            child_id = f"{request_id}#{idx}"
            child_params = params.clone(
                n=1,
                seed=None if params.seed is None else params.seed + idx,
                prompt_logprobs=params.prompt_logprobs if idx == 0 else None,
            )
            request = Request(child_id, prompt_ids, child_params, self.eos_token_ids,
                              priority, arrival, extra_key)
            group.child_ids.append(child_id)
            group.detoks.append(IncrementalDetokenizer(self.tokenizer, prompt_ids, child_params))
            group.completions.append(CompletionOutput(index=idx, text="", token_ids=[]))
            group.num_sent.append(0)
            self._child_to_group[child_id] = (group, idx)
            self.scheduler.add_request(request)
        self._groups[request_id] = group
        return prompt_ids

    def abort(self, request_id: str) -> bool:
        group = self._groups.pop(request_id, None)
        if group is None:
            return False
        self.scheduler.finish_requests(group.child_ids, RequestStatus.FINISHED_ABORTED)
        for cid in group.child_ids:
            self._child_to_group.pop(cid, None)
        return True

    def has_unfinished(self) -> bool:
        return bool(self._groups) or self._inflight is not None

    # ------------------------------------------------------------------ step
    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; returns outputs of every request that progressed.

        With async scheduling, the step launched here runs while the previous one's tokens
        are read and processed, so outputs trail the launched work by one step.
        """
        sched_out = self.scheduler.schedule()
        if not self._async:
            model_out = self.executor.execute(sched_out)
            return self._process(sched_out, model_out,
                                 self.scheduler.update_from_output(sched_out, model_out))
        self.scheduler.advance(sched_out)
        handle = self.executor.launch(sched_out)
        outputs: list[RequestOutput] = []
        if self._inflight is not None:
            prev_out, prev_handle = self._inflight
            model_out = self.executor.finish(prev_handle)
            outputs = self._process(prev_out, model_out, self.scheduler.apply_output(model_out))
        self._inflight = None if sched_out.is_empty else (sched_out, handle)
        return outputs

    def _process(
        self,
        sched_out: SchedulerOutput,
        model_out: ModelOutput,
        produced: list[tuple[Request, list[int]]],
    ) -> list[RequestOutput]:
        touched: dict[str, _Group] = {}
        self._collect_prompt_logprobs(sched_out, model_out, touched)
        logprobs = dict(zip(model_out.req_ids, model_out.logprobs))
        for request, tokens in produced:
            entry = self._child_to_group.get(request.request_id)
            if entry is None:
                continue
            group, idx = entry
            self._advance_child(group, idx, request, tokens, logprobs.get(request.request_id))
            touched[group.request_id] = group
        return [
            self._make_output(g)
            for g in touched.values()
            if g.output_kind != "final" or g.finished
        ]

    def _collect_prompt_logprobs(
        self, sched_out: SchedulerOutput, model_out: ModelOutput, touched: dict[str, _Group]
    ) -> None:
        if not model_out.prompt_logprobs:
            return
        starts = {r.req_id: r.num_computed_tokens for r in sched_out.scheduled_new_reqs}
        cached = sched_out.scheduled_cached_reqs
        starts.update(zip(cached.req_ids, cached.num_computed_tokens))
        for rid, entries in model_out.prompt_logprobs.items():
            entry = self._child_to_group.get(rid)
            if entry is None:
                continue  # aborted while its step was in flight
            group = entry[0]
            assert group.prompt_logprobs is not None
            first = starts[rid] + 1  # row j of the chunk predicts prompt token start + 1 + j
            for j, entry in enumerate(entries):
                group.prompt_logprobs[first + j] = self._to_logprob_dict(entry)

    def _advance_child(
        self,
        group: _Group,
        idx: int,
        request: Request,
        tokens: list[int],
        logprobs: list[TokenLogprobs] | None,
    ) -> None:
        comp, detok = group.completions[idx], group.detoks[idx]
        comp.token_ids.extend(tokens)
        # NOTE: with no stop strings and nobody reading partial text, detokenize once at the end.
        lazy = group.output_kind == "final" and not group.params.stop
        if not lazy or request.is_finished:
            stop_str = detok.update(comp.token_ids[detok.num_output_tokens :])
            if stop_str is not None and not request.is_finished:
                request.stop_reason = stop_str
                self.scheduler.finish_requests([request.request_id],
                                               RequestStatus.FINISHED_STOPPED)
        if logprobs is not None:
            comp.logprobs = comp.logprobs or []
            for entry in logprobs:
                comp.logprobs.append(self._to_logprob_dict(entry))
                comp.cumulative_logprob = (comp.cumulative_logprob or 0.0) + entry.logprobs[0]
        if not lazy or request.is_finished:
            comp.delta_text += detok.get_delta(request.is_finished)  # flushes the text when done
            comp.text = detok.output_text
        if request.num_cached_tokens > 0 and idx == 0:
            group.num_cached_tokens = request.num_cached_tokens
        if request.is_finished:
            comp.finish_reason = request.status.finish_reason
            comp.stop_reason = request.stop_reason
            group.children_done.add(idx)

    def _to_logprob_dict(self, entry: TokenLogprobs) -> dict[int, Logprob]:
        out: dict[int, Logprob] = {}
        chosen = entry.token_ids[0]
        out[chosen] = Logprob(entry.logprobs[0], entry.rank, decode_token(self.tokenizer, chosen))
        for rank, (tok, lp) in enumerate(zip(entry.token_ids[1:], entry.logprobs[1:]), 1):
            if tok not in out:
                out[tok] = Logprob(lp, rank, decode_token(self.tokenizer, tok))
        return out

    def _make_output(self, group: _Group) -> RequestOutput:
        delta = group.output_kind == "delta"
        completions = []
        for comp in group.completions:
            start = group.num_sent[comp.index] if delta else 0
            group.num_sent[comp.index] = len(comp.token_ids)
            completions.append(
                CompletionOutput(
                    index=comp.index,
                    text=comp.delta_text if delta else comp.text,
                    token_ids=comp.token_ids[start:],
                    cumulative_logprob=comp.cumulative_logprob,
                    logprobs=comp.logprobs[start:] if comp.logprobs is not None else None,
                    finish_reason=comp.finish_reason,
                    stop_reason=comp.stop_reason,
                    delta_text=comp.delta_text,
                )
            )
            comp.delta_text = ""
        finished = group.finished
        if finished:
            del self._groups[group.request_id]
            for cid in group.child_ids:
                self._child_to_group.pop(cid, None)
        return RequestOutput(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=group.prompt_token_ids,
            outputs=completions,
            finished=finished,
            prompt_logprobs=list(group.prompt_logprobs) if group.prompt_logprobs else None,
            num_cached_tokens=group.num_cached_tokens,
        )

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict[str, float]:
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv_cache_usage": self.kv.usage,
            "prefix_cache_hit_rate": self.kv.hit_rate,
            "num_preemptions": self.scheduler.num_preemptions,
        }
