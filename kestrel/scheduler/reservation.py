"""KV admission control: the peak KV footprint the running requests are expected to reach.

Admitting a request that later runs the cache out of blocks costs a preemption, i.e. a full
recompute of some running request. The scheduler therefore admits a request only if the
projected footprint of everything running, the newcomer included, stays within the cache at
every future step. The projection assumes each request adds one token per step until it
reaches its expected length and then frees all its blocks:

    tokens held
      ^        request a (3 steps left)       peak = max over the steps s at which
      |     ___                                some request ends of the sum, over the
      |  __|   |__ request b (5 steps left)    requests still alive at s, of (now + s)
      | |         |
      +-------------> steps from now

Summing every request's final length instead (all of them full at once) is the bound a
reservation would use without this: it over-reserves by about half when requests started at
different times, which is the usual case under continuous batching.

Must not touch requests or the KV manager: it works on (tokens now, steps left) pairs.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable


class KVProjection:
    """Requests as (tokens held now, steps until they end); `try_add` admits if it fits."""

    def __init__(self, capacity: int, slack: int = 0,
                 requests: Iterable[tuple[int, int]] = ()) -> None:
        self.capacity = capacity  # KV slots of the whole cache
        # Slots a request may hold beyond its tokens before it ends (block_size - 1: its
        # last block is partly filled); at its end it holds exactly the tokens given.
        self.slack = slack
        # Sorted by steps left, descending, stored negated for bisect: (-steps, tokens).
        self._items = sorted((-steps, tokens) for tokens, steps in requests)

    def add(self, tokens: int, steps: int) -> None:
        bisect.insort(self._items, (-steps, tokens))

    def peak(self) -> int:
        return _peak(self._items, self.slack)

    def try_add(self, tokens: int, steps: int) -> bool:
        """Add the request if the projected peak stays within capacity; report whether."""
        items = self._items
        pos = bisect.bisect(items, (-steps, tokens))
        items.insert(pos, (-steps, tokens))
        if _peak(items, self.slack) <= self.capacity:
            return True
        del items[pos]
        return False


def _peak(items: list[tuple[int, int]], slack: int) -> int:
    # items sorted by steps left, descending. At step s = steps_k the requests alive are those
    # with at least steps_k left, each holding its tokens plus s new ones; those ending at s
    # hold exactly that, the others up to `slack` more.
    best = held = 0
    k = 0
    n = len(items)
    while k < n:
        neg_steps = items[k][0]
        start = k
        while k < n and items[k][0] == neg_steps:
            held += items[k][1]
            k += 1
        best = max(best, held - k * neg_steps + slack * start)
    return best
