"""The token-budget scheduler: decides which tokens of which requests run each step.

Owns the waiting queue, the running list and request status transitions. Talks to the KV cache
only through `KVCacheManager` and to the runner only through `SchedulerOutput` /
`ModelOutput`. Must not touch tensors, tokenizers or text (stop strings are the engine's).

One rule covers everything: each step tops requests up from one token budget, running requests
first, then waiting ones; a request computes tokens [num_computed_tokens, num_tokens). A long
prompt simply takes several steps (chunked prefill), a prefix-cache hit starts with
num_computed_tokens > 0, and a preempted request restarts from 0 (recompute).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from kestrel.config import SchedulerConfig
from kestrel.kv.kv_manager import KVCacheManager
from kestrel.outputs import ModelOutput
from kestrel.request import Request, RequestStatus
from kestrel.scheduler.output import CachedRequestData, NewRequestData, SchedulerOutput
from kestrel.scheduler.policy import WaitingQueue, pick_victim
from kestrel.scheduler.reservation import KVProjection
from kestrel.utils.math import cdiv


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.requests: dict[str, Request] = {}
        self.waiting = WaitingQueue()
        self.running: list[Request] = []  # in admission order
        # Ids the runner still holds state for but must drop at the next step.
        self._finished_for_runner: set[str] = set()
        self._runner_holds: set[str] = set()
        self.num_preemptions = 0
        # Share of running requests' remaining tokens kept free when admitting (adaptive).
        self.new_token_ratio = config.new_token_ratio
        self._min_token_ratio = config.new_token_ratio / 10

    # ------------------------------------------------------------------ requests
    def add_request(self, request: Request) -> None:
        assert request.request_id not in self.requests, request.request_id
        self.requests[request.request_id] = request
        self.waiting.push(request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        """Finish (stop string, abort, ...) requests in any state; frees their blocks now."""
        assert status.is_finished
        for rid in request_ids:
            request = self.requests.get(rid)
            if request is None or request.is_finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(rid)
            request.status = status
            request.drop_pending()  # a token still in flight for it is never shown
            self._release(request)

    def _release(self, request: Request) -> None:
        self.kv.free(request)
        del self.requests[request.request_id]
        if request.request_id in self._runner_holds:
            self._runner_holds.discard(request.request_id)
            self._finished_for_runner.add(request.request_id)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------ schedule
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: dict[str, int] = {}  # req_id -> tokens this step, in batch order
        new_block_ids: dict[str, list[int]] = {}
        preempted_now = False

        # 1) Running requests first: each gets the rest of its tokens, up to the budget.
        idx = 0
        while idx < len(self.running) and budget > 0:
            request = self.running[idx]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if num_new <= 0 or request.length_capped:
                idx += 1
                continue
            blocks = self.kv.allocate_slots(request, num_new)
            while blocks is None:
                victim = pick_victim(self.running)
                budget += scheduled.pop(victim.request_id, 0)
                new_block_ids.pop(victim.request_id, None)
                victim_idx = self.running.index(victim)
                self._preempt(victim)
                preempted_now = True
                if victim is request:
                    break
                if victim_idx < idx:
                    idx -= 1
                blocks = self.kv.allocate_slots(request, num_new)
            if blocks is None:
                continue  # the request itself was preempted; running[idx] is now the next one
            scheduled[request.request_id] = num_new
            new_block_ids[request.request_id] = blocks
            budget -= num_new
            idx += 1

        # 2) Waiting requests, in rank order, while budget, seats and blocks last. After a
        # preemption this step, admitting others would only thrash.
        self._adapt_token_ratio(preempted_now)
        projection: KVProjection | None = None  # built on the first admission attempt
        new_reqs: list[NewRequestData] = []
        while not preempted_now and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting.peek()
            if request is None:
                break
            hit_blocks, num_hit = [], 0
            if request.sampling_params.prompt_logprobs is None:
                # NOTE: prompt logprobs need the logits of every prompt token, so such
                # requests never start from cached blocks.
                hit_blocks, num_hit = self.kv.get_computed_blocks(request)
            num_new = request.num_tokens - num_hit
            if num_new > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            # NOTE: a request admitted now that later forces a preemption costs a full
            # recompute; admit only if the projected KV footprint fits. With nothing
            # running there is nothing to protect (and refusing could stall forever).
            if self.config.new_token_ratio > 0.0:
                if projection is None:
                    projection = self._projection()
                growth = self._expected_growth(request)
                if not projection.try_add(*growth):
                    if self.running:
                        break
                    projection.add(*growth)
            if self.kv.allocate_slots(request, num_new, hit_blocks, num_hit) is None:
                break
            self.waiting.pop()
            request.num_computed_tokens = num_hit
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._runner_holds.add(request.request_id)
            new_reqs.append(self._new_request_data(request))
            budget -= num_new
            scheduled[request.request_id] = num_new

        return self._build_output(scheduled, new_block_ids, new_reqs)

    def _adapt_token_ratio(self, preempted: bool) -> None:
        if self.config.new_token_ratio == 0.0:
            return
        if preempted:
            self.new_token_ratio = min(1.0, self.new_token_ratio + 0.1)
        else:
            self.new_token_ratio = max(self._min_token_ratio, self.new_token_ratio - 0.001)

    def _expected_growth(self, request: Request) -> tuple[int, int]:
        """(KV slots it holds once its known tokens are in, steps until it ends) for the
        projection. A request that can only end by length grows by exactly its remaining
        max_tokens; one that may stop early by that share scaled by new_token_ratio."""
        params = request.sampling_params
        max_len = self.config.max_model_len
        final = request.num_prompt_tokens + (params.max_tokens or max_len or 0)
        final = min(final, max_len or final)
        output_left = max(final - request.num_tokens, 0)
        if request.stop_id_set or params.stop:
            output_left = math.ceil(output_left * self.new_token_ratio)
        # A prompt still in chunks ends later by the steps its chunks take, less the last
        # one, which also samples.
        to_compute = request.num_tokens - request.num_computed_tokens
        chunks_left = max(cdiv(to_compute, self.config.max_num_batched_tokens) - 1, 0)
        # NOTE: padded so that the request ends holding whole blocks (see KVProjection).
        pad = -(request.num_tokens + output_left) % self.kv.block_size
        return request.num_tokens + pad, output_left + chunks_left

    def _projection(self) -> KVProjection:
        bs = self.kv.block_size
        return KVProjection(self.kv.num_blocks * bs, bs - 1,
                            map(self._expected_growth, self.running))

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        if request.request_id in self._runner_holds:
            self._runner_holds.discard(request.request_id)
            self._finished_for_runner.add(request.request_id)
        self.waiting.push(request)

    def _new_request_data(self, request: Request) -> NewRequestData:
        return NewRequestData(
            req_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=list(request.output_token_ids),
            sampling_params=request.sampling_params,
            stop_token_ids=request.stop_token_ids(),
            block_ids=list(self.kv.get_block_ids(request.request_id)),
            num_computed_tokens=request.num_computed_tokens,
        )

    def _build_output(
        self,
        scheduled: dict[str, int],
        new_block_ids: dict[str, list[int]],
        new_reqs: list[NewRequestData],
    ) -> SchedulerOutput:
        cached = CachedRequestData()
        for rid in new_block_ids:  # running requests still scheduled, in batch order
            cached.req_ids.append(rid)
            cached.new_block_ids.append(new_block_ids[rid])
            cached.num_computed_tokens.append(self.requests[rid].num_computed_tokens)
        finished, self._finished_for_runner = self._finished_for_runner, set()
        return SchedulerOutput(
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=cached,
            num_scheduled_tokens={
                rid: scheduled[rid] for rid in [r.req_id for r in new_reqs] + cached.req_ids
            },
            total_num_scheduled_tokens=sum(scheduled.values()),
            finished_req_ids=finished,
        )

    # ------------------------------------------------------------------ update
    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_output: ModelOutput
    ) -> list[tuple[Request, list[int]]]:
        """The synchronous path: `advance` then `apply_output` for the same step."""
        self.advance(scheduler_output)
        return self.apply_output(model_output)

    def advance(self, scheduler_output: SchedulerOutput) -> None:
        """Account for a step as soon as it is launched, before its tokens are known.

        Every request that samples in the step gets a placeholder token, so the next step can
        be scheduled (and its input gathered on the device) while this one still runs. Length
        limits need no token ids, so they are applied here: a request whose placeholders
        reach max_tokens or max_model_len is not scheduled again.
        """
        for rid, num in scheduler_output.num_scheduled_tokens.items():
            request = self.requests.get(rid)
            if request is None:
                continue
            request.num_computed_tokens += num
            if request.num_computed_tokens == request.num_tokens:
                request.add_placeholder()
                max_tokens = request.sampling_params.max_tokens
                if (max_tokens is not None and request.num_output_tokens >= max_tokens) or (
                    request.num_tokens >= self.config.max_model_len
                ):
                    request.length_capped = True

    def apply_output(self, model_output: ModelOutput) -> list[tuple[Request, list[int]]]:
        """Give placeholders their sampled ids and apply the stop rules.

        Returns (request, new_token_ids) for every request that produced tokens, including
        those that just finished (their status says so; they are already released).
        """
        produced: list[tuple[Request, list[int]]] = []
        for rid, tokens in zip(model_output.req_ids, model_output.sampled_token_ids):
            request = self.requests.get(rid)
            if not tokens or request is None or request.is_finished:
                continue  # NOTE: a request that ended while a later step ran drops its token
            for tok in tokens:
                request.resolve_placeholder(tok)
            status = self._check_stop(request, tokens[-1])
            if status is not None:
                request.drop_pending()
                if request.status == RequestStatus.RUNNING:
                    self.running.remove(request)
                else:  # preempted after its token was sampled, before it was read
                    self.waiting.remove(rid)
                request.status = status
                self._release(request)
            produced.append((request, tokens))
        return produced

    def _check_stop(self, request: Request, last: int) -> RequestStatus | None:
        params = request.sampling_params
        num_known_outputs = request.num_output_tokens - request.num_pending
        if num_known_outputs >= params.min_tokens and last in request.stop_id_set:
            if last in params.stop_token_ids:
                request.stop_reason = last
            return RequestStatus.FINISHED_STOPPED
        if request.length_capped and request.num_pending == 0:
            return RequestStatus.FINISHED_LENGTH
        return None
