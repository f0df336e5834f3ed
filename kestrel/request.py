"""The engine-side record of one sequence and its status state machine.

Owns: token ids (prompt + output), `num_computed_tokens` (the one progress variable the
scheduler reads), status and finish reason. Must not hold tensors or runner state: the runner
keeps its own copy, fed only through `SchedulerOutput`.
"""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kestrel.sampling_params import SamplingParams


PLACEHOLDER = -1  # a sampled token whose id has not reached the host yet


class RequestStatus(enum.Enum):
    # NOTE: the finished states come last: is_finished compares values.
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()  # waiting again after its blocks were taken; recomputes its tokens
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self._value_ >= _FIRST_FINISHED  # NOTE: hot (every request, every step)

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FIRST_FINISHED = RequestStatus.FINISHED_STOPPED.value
_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request:
    """One sequence. A user request with n > 1 becomes n of these (sharing prompt blocks).

    NOTE: `num_tokens` = prompt + output; the scheduler computes tokens
    [num_computed_tokens, num_tokens) and never branches on prefill vs decode.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: list[int] | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
        extra_key: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = list(eos_token_ids or [])
        self.priority = priority
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        # Namespace for prefix-cache hashes (adapter id, cache salt); None shares with all.
        self.extra_key = extra_key
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hit at first schedule; -1 = not yet scheduled
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None  # the stop token id or stop string that hit
        # Async scheduling: tokens sampled by a step still in flight sit at the end of the
        # output as PLACEHOLDER until their ids arrive; once they reach a length limit the
        # request is not scheduled again.
        self.num_pending = 0
        self.length_capped = False
        self._stop_id_set: frozenset[int] | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_known_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_pending

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_tokens(self, token_ids: list[int]) -> None:
        self.output_token_ids.extend(token_ids)
        self.all_token_ids.extend(token_ids)

    def add_placeholder(self) -> None:
        self.append_output_tokens([PLACEHOLDER])
        self.num_pending += 1

    def resolve_placeholder(self, token_id: int) -> None:
        """Give the oldest pending token its id."""
        assert self.num_pending > 0, self.request_id
        pos = len(self.output_token_ids) - self.num_pending
        self.output_token_ids[pos] = token_id
        self.all_token_ids[self.num_prompt_tokens + pos] = token_id
        self.num_pending -= 1

    def drop_pending(self) -> None:
        """Forget tokens sampled after the sequence ended (they are never shown)."""
        if self.num_pending:
            del self.output_token_ids[-self.num_pending :]
            del self.all_token_ids[-self.num_pending :]
            self.num_pending = 0

    def stop_token_ids(self) -> list[int]:
        """Token ids that end this sequence (eos unless ignore_eos, plus stop_token_ids)."""
        params = self.sampling_params
        ids = [] if params.ignore_eos else list(self.eos_token_ids)
        ids.extend(t for t in params.stop_token_ids or [] if t not in ids)
        return ids

    @property
    def stop_id_set(self) -> frozenset[int]:
        """stop_token_ids() as a set, built once: it is read for every sampled token."""
        ids = self._stop_id_set
        if ids is None:
            ids = self._stop_id_set = frozenset(self.stop_token_ids())
        return ids

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, "
            f"computed={self.num_computed_tokens}/{self.num_tokens})"
        )
