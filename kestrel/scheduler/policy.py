"""Request ordering: the waiting queue and the choice of a preemption victim.

One rule for both: requests are ranked by (priority, arrival_time), lower first. With every
priority at its default of 0 this is plain FCFS. A preempted request keeps its rank, so it is
re-admitted before anything that arrived after it (no starvation).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Iterator

from kestrel.request import Request


def rank(request: Request) -> tuple[int, float]:
    return (request.priority, request.arrival_time)


class WaitingQueue:
    """Min-heap of waiting requests by rank; removal of arbitrary requests is lazy."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, Request]] = []
        self._members: dict[str, Request] = {}
        self._tiebreak = itertools.count()

    def push(self, request: Request) -> None:
        assert request.request_id not in self._members, request.request_id
        self._members[request.request_id] = request
        heapq.heappush(self._heap, (*rank(request), next(self._tiebreak), request))

    def peek(self) -> Request | None:
        self._drop_removed()
        return self._heap[0][3] if self._heap else None

    def pop(self) -> Request:
        self._drop_removed()
        request = heapq.heappop(self._heap)[3]
        del self._members[request.request_id]
        return request

    def remove(self, request_id: str) -> Request | None:
        # NOTE: the heap entry stays until it reaches the top; _drop_removed skips it.
        return self._members.pop(request_id, None)

    def _drop_removed(self) -> None:
        while self._heap:
            req = self._heap[0][3]
            if self._members.get(req.request_id) is req:
                return
            heapq.heappop(self._heap)

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._members

    def __iter__(self) -> Iterator[Request]:
        return iter(sorted(self._members.values(), key=rank))


def pick_victim(running: Iterable[Request]) -> Request:
    """The request to preempt when blocks run out: lowest priority, then newest."""
    return max(running, key=rank)
