"""`SchedulerOutput`: the only message from the scheduler to the runner.

The runner keeps a persistent copy of every running request (token ids, block table, sampling
state). Each step the scheduler sends only what changed: requests the runner has not seen,
new blocks and progress of the ones it has, and the ids it must forget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kestrel.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the runner has not seen (first schedule, or resumed after preemption)."""

    req_id: str
    prompt_token_ids: list[int]
    # Output tokens already generated (non-empty only when resuming after preemption; the
    # runner must recompute their KV and continue sampling after them).
    output_token_ids: list[int]
    sampling_params: SamplingParams
    # Token ids that end the sequence (eos unless ignore_eos + stop_token_ids); the sampler
    # masks them until min_tokens outputs exist.
    stop_token_ids: list[int]
    block_ids: list[int]  # full block table for the tokens computed so far and this step
    num_computed_tokens: int  # tokens whose KV is already in block_ids (prefix-cache hits)


@dataclass
class CachedRequestData:
    """Requests the runner already holds; parallel lists, one entry per request."""

    req_ids: list[str] = field(default_factory=list)
    new_block_ids: list[list[int]] = field(default_factory=list)  # appended to the block table
    num_computed_tokens: list[int] = field(default_factory=list)  # before this step's tokens


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData] = field(default_factory=list)
    scheduled_cached_reqs: CachedRequestData = field(default_factory=CachedRequestData)
    # req_id -> tokens to compute this step. The runner may reorder the batch (it puts
    # one-token requests first); ModelOutput.req_ids says which row is which.
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    total_num_scheduled_tokens: int = 0
    # Requests the runner must drop (finished, aborted or preempted since the last step).
    finished_req_ids: set[str] = field(default_factory=set)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0

    def batch_req_ids(self) -> list[str]:
        new = [r.req_id for r in self.scheduled_new_reqs]
        return new + list(self.scheduled_cached_reqs.req_ids)
