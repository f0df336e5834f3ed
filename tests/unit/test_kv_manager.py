"""KVCacheManager: block tables, prefix hits, registration, preemption and integrity.

The stateful test at the bottom drives the manager like a scheduler would and keeps an oracle
of what every KV slot holds, so a prefix hit on a block with the wrong content fails.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kestrel.kv.kv_manager import KVCacheManager
from kestrel.request import Request
from kestrel.sampling_params import SamplingParams

BS = 4


def make_request(
    rid: str, tokens: list[int], extra_key: str | None = None, prompt_logprobs: int | None = None
) -> Request:
    params = SamplingParams(max_tokens=None, prompt_logprobs=prompt_logprobs)
    return Request(rid, tokens, params, extra_key=extra_key)


def run(kv: KVCacheManager, req: Request, num_new: int) -> list[int]:
    """Allocate and "compute" `num_new` tokens of a running request."""
    ids = kv.allocate_slots(req, num_new)
    assert ids is not None
    req.num_computed_tokens += num_new
    return ids


def admit(kv: KVCacheManager, req: Request, num_new: int | None = None) -> list[int] | None:
    """Admit a waiting request like the scheduler: prefix hits, then its first chunk."""
    hits, num_hit = kv.get_computed_blocks(req)
    num_new = req.num_tokens - num_hit if num_new is None else num_new
    ids = kv.allocate_slots(req, num_new, hits, num_hit)
    if ids is not None:
        req.num_computed_tokens = num_hit + num_new
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = num_hit
    return ids


def snapshot(kv: KVCacheManager, request_ids: list[str] | None = None) -> tuple:
    """Everything an allocation could change."""
    pool = kv.pool
    return (
        [(b.ref_cnt, b.block_hash) for b in pool.blocks],
        pool.evictable_block_ids(),
        pool.num_free_blocks,
        {rid: kv.get_block_ids(rid) for rid in request_ids or ("a", "b", "c")},
    )


def test_allocate_grows_block_table():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    req = make_request("a", list(range(6)))
    assert kv.get_computed_blocks(req) == ([], 0)
    ids = run(kv, req, 6)
    assert len(ids) == 2 and kv.get_block_ids("a") == ids
    assert kv.num_free_blocks == 8 and kv.usage == pytest.approx(0.2)
    for token in (6, 7):  # decode into the second block's free slots
        req.append_output_tokens([token])
        assert run(kv, req, 1) == []
    req.append_output_tokens([8])
    new = run(kv, req, 1)
    assert len(new) == 1 and kv.get_block_ids("a") == ids + new
    kv.check_integrity()
    kv.free(req)
    assert kv.num_free_blocks == 10 and kv.usage == 0.0
    kv.check_integrity()


def test_full_blocks_are_registered_at_allocation():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    req = make_request("a", list(range(10)))
    kv.allocate_slots(req, 6)  # chunk: block 0 full, block 1 half
    assert kv.pool.num_cached_blocks == 1
    req.num_computed_tokens = 6
    kv.allocate_slots(req, 4)
    assert kv.pool.num_cached_blocks == 2  # block 2 holds only 2 tokens
    kv.check_integrity()


def test_hit_after_first_request_finishes():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a = make_request("a", list(range(10)))
    ids_a = run(kv, a, 10)
    kv.free(a)
    b = make_request("b", list(range(10)) + [50, 51])
    hits, num_hit = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == ids_a[:2] and num_hit == 8
    assert all(h.ref_cnt == 0 for h in hits)  # no references taken yet
    ids_b = kv.allocate_slots(b, 4, hits, num_hit)
    assert ids_b[:2] == ids_a[:2] and len(ids_b) == 3
    assert all(h.ref_cnt == 1 for h in hits)
    kv.check_integrity()


def test_never_a_full_hit():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a = make_request("a", list(range(8)))
    run(kv, a, 8)
    kv.free(a)
    b = make_request("b", list(range(8)))
    hits, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 4 and len(hits) == 1  # the last block is recomputed for its logits
    c = make_request("c", list(range(9)))
    assert kv.get_computed_blocks(c)[1] == 8


def test_extra_key_isolation():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a = make_request("a", list(range(9)), extra_key="adapter-1")
    run(kv, a, 9)
    assert kv.get_computed_blocks(make_request("b", list(range(9))))[1] == 0
    assert kv.get_computed_blocks(make_request("c", list(range(9)), extra_key="adapter-2"))[1] == 0
    assert kv.get_computed_blocks(make_request("d", list(range(9)), extra_key="adapter-1"))[1] == 8


def test_prompt_logprobs_never_hit():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    run(kv, make_request("a", list(range(9))), 9)
    req = make_request("b", list(range(9)), prompt_logprobs=1)
    assert kv.get_computed_blocks(req) == ([], 0)
    assert kv.prefix_cache_queries == 0


def test_stats_count_first_admission_once():
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    a = make_request("a", list(range(9)))
    assert admit(kv, a) is not None
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (9, 0)
    b = make_request("b", list(range(9)) + [1] * 8)  # needs 5 blocks: does not fit
    assert admit(kv, b) is None
    assert admit(kv, b) is None  # retried while waiting: not counted again
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (26, 8)
    assert kv.hit_rate == pytest.approx(8 / 26)
    # Preempted and readmitted: it was counted at its first admission already.
    kv.free(a)
    a.num_computed_tokens = 0
    assert admit(kv, a) is not None
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (26, 8)


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", list(range(9)))
    run(kv, a, 9)  # 3 blocks, 2 cached
    kv.free(a)  # 2 evictable + 2 free
    b = make_request("b", list(range(9)) + [7] * 12)  # 21 tokens: 2 hits + 4 fresh > 2 left
    hits, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 8
    before = snapshot(kv)
    assert kv.allocate_slots(b, b.num_tokens - num_hit, hits, num_hit) is None
    assert snapshot(kv) == before
    assert all(h.ref_cnt == 0 for h in hits)
    kv.check_integrity()


def test_evictable_hits_are_not_counted_as_free_for_fresh_blocks():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", list(range(8)))
    run(kv, a, 8)
    kv.free(a)  # 2 evictable, 2 free
    b = make_request("b", list(range(8)) + [9] * 9)  # 2 hits + 3 fresh: 5 > 4
    hits, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 8 and kv.num_free_blocks == 4
    assert kv.allocate_slots(b, 9, hits, num_hit) is None
    c = make_request("c", list(range(8)) + [9] * 5)  # 2 hits + 2 fresh: fits exactly
    hits, num_hit = kv.get_computed_blocks(c)
    ids = kv.allocate_slots(c, 5, hits, num_hit)
    assert ids is not None and ids[:2] == [h.block_id for h in hits]
    assert kv.num_free_blocks == 0
    kv.check_integrity()


def test_same_step_sharing():
    """n > 1 samples: the second request hits blocks allocated (not yet computed) this step."""
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    prompt = list(range(9))
    first, second = make_request("a", prompt), make_request("b", prompt)
    assert admit(kv, first) is not None
    hits, num_hit = kv.get_computed_blocks(second)
    assert num_hit == 8
    ids = kv.allocate_slots(second, 1, hits, num_hit)
    assert ids[:2] == kv.get_block_ids("a")[:2] and ids[2] != kv.get_block_ids("a")[2]
    assert [h.ref_cnt for h in hits] == [2, 2]
    kv.check_integrity()


def test_recomputed_duplicate_block_stays_unhashed():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    prompt = list(range(8))
    a, b = make_request("a", prompt), make_request("b", prompt)
    admit(kv, a, num_new=2)  # block 0 not full yet
    admit(kv, b, num_new=2)  # so b misses and computes block 0 itself
    run(kv, a, 6)
    run(kv, b, 6)
    block_a, block_b = (kv.pool.blocks[kv.get_block_ids(r)[0]] for r in ("a", "b"))
    assert block_a.block_hash is not None and block_b.block_hash is None
    kv.check_integrity()
    kv.free(a)
    kv.free(b)
    assert kv.pool.num_cached_blocks == 2 and kv.pool.num_evictable_blocks == 2
    kv.check_integrity()


def test_free_releases_tail_first():
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    a = make_request("a", list(range(12)))
    ids = run(kv, a, 12)
    kv.free(a)
    assert kv.pool.evictable_block_ids() == ids[::-1]
    b = make_request("b", [99] * 4)
    assert run(kv, b, 4) == [ids[2]]  # a's tail is evicted, its head stays cached
    c = make_request("c", list(range(12)))
    assert kv.get_computed_blocks(c)[1] == 8


def test_free_is_idempotent():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", list(range(5)))
    run(kv, a, 5)
    kv.free(a)
    kv.free(a)
    kv.free(make_request("never-seen", [1]))
    assert kv.num_free_blocks == 4 and kv.get_block_ids("a") == []
    kv.check_integrity()


def test_preempt_and_readmit_hits_own_blocks():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    a = make_request("a", list(range(10)))
    ids = run(kv, a, 10)
    a.append_output_tokens([42])
    kv.free(a)  # preempted
    a.num_computed_tokens = 0
    hits, num_hit = kv.get_computed_blocks(a)
    assert num_hit == 8 and [h.block_id for h in hits] == ids[:2]
    new = kv.allocate_slots(a, a.num_tokens - num_hit, hits, num_hit)
    assert new[:2] == ids[:2]
    kv.check_integrity()


def test_preempted_before_forward_drops_unwritten_hashes():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    a = make_request("a", list(range(10)))
    run(kv, a, 4)  # block 0 computed in an earlier step
    kv.allocate_slots(a, 6)  # registers block 1 for a forward that never runs
    assert kv.pool.num_cached_blocks == 2
    kv.free(a)  # preempted in the same step
    a.num_computed_tokens = 0
    assert kv.pool.num_cached_blocks == 1
    assert kv.get_computed_blocks(make_request("b", list(range(10))))[1] == 4
    kv.check_integrity()


def test_lookahead_slots_are_not_registered():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    a = make_request("a", list(range(6)))
    ids = kv.allocate_slots(a, 6 + 3)  # 3 speculative slots past the known tokens
    assert len(ids) == 3
    assert kv.pool.num_cached_blocks == 1  # tokens 4..7 are not all known
    kv.check_integrity()


def test_stale_hits_are_rejected():
    kv = KVCacheManager(num_blocks=2, block_size=BS)
    a = make_request("a", list(range(5)))
    run(kv, a, 5)
    kv.free(a)
    b = make_request("b", list(range(5)))
    hits, num_hit = kv.get_computed_blocks(b)
    run(kv, make_request("c", [7] * 8), 8)  # evicts the hit
    with pytest.raises(ValueError):
        kv.allocate_slots(b, 1, hits, num_hit)


def test_prefix_caching_disabled():
    kv = KVCacheManager(num_blocks=6, block_size=BS, enable_prefix_caching=False)
    a = make_request("a", list(range(9)))
    run(kv, a, 9)
    kv.free(a)
    assert kv.pool.num_cached_blocks == 0 and kv.pool.num_evictable_blocks == 0
    b = make_request("b", list(range(9)))
    assert kv.get_computed_blocks(b) == ([], 0)
    assert (kv.prefix_cache_queries, kv.hit_rate) == (0, 0.0)
    with pytest.raises(ValueError):
        kv.allocate_slots(b, 1, [kv.pool.blocks[0]], BS)
    kv.check_integrity()


def test_reset_prefix_cache():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    a = make_request("a", list(range(9)))
    run(kv, a, 9)
    assert not kv.reset_prefix_cache()
    kv.free(a)
    assert kv.reset_prefix_cache()
    assert kv.get_computed_blocks(make_request("b", list(range(9))))[1] == 0
    kv.check_integrity()


def test_check_integrity_catches_ref_mismatch():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", list(range(5)))
    ids = run(kv, a, 5)
    kv.pool.touch([kv.pool.blocks[ids[0]]])  # a reference no block table accounts for
    with pytest.raises(AssertionError):
        kv.check_integrity()


def test_can_allocate_and_bad_arguments():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    assert kv.can_allocate(4) and not kv.can_allocate(5)
    with pytest.raises(ValueError):
        kv.allocate_slots(make_request("a", [1]), -1)
    with pytest.raises(ValueError):
        kv.allocate_slots(make_request("a", [1]), 1, [], 4)
    with pytest.raises(ValueError):
        KVCacheManager(num_blocks=4, block_size=0)


# ---------------------------------------------------------------------------- stateful

_BASES = ([0] * 16, [0, 1] * 8, [1, 1, 0, 0] * 4)
_MAX_LEN = 24
_GARBAGE = ("garbage",)


class KVManagerMachine(RuleBasedStateMachine):
    """Scheduler-like driver with an oracle of each slot's content.

    A slot written for position p of a sequence holds (extra_key, tokens[: p + 1]): KV depends
    on the whole prefix and the namespace. Every prefix hit must find exactly that.
    """

    @initialize(
        block_size=st.sampled_from([1, 2, 4]),
        num_blocks=st.integers(3, 14),
        caching=st.sampled_from([True, True, True, False]),
    )
    def setup(self, block_size, num_blocks, caching):
        self.bs = block_size
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.slots: dict[int, list] = {i: [None] * block_size for i in range(num_blocks)}
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.counted: set[str] = set()
        self.queries = self.hits = 0
        self.next_id = 0

    # -------------------------------------------------------------- helpers
    def _write(self, req: Request, start: int, end: int, garbage_from: int) -> None:
        table = self.kv.get_block_ids(req.request_id)
        for pos in range(start, end):
            block, off = table[pos // self.bs], pos % self.bs
            content = _GARBAGE
            if pos < garbage_from:
                content = (req.extra_key, tuple(req.all_token_ids[: pos + 1]))
            self.slots[block][off] = content

    def _mark_fresh(self, ids: list[int]) -> None:
        for block_id in ids:  # whatever the block held before is not ours
            self.slots[block_id] = [None] * self.bs

    def _forward(self, req: Request, num_new: int, num_lookahead: int, rng: int) -> None:
        start = req.num_computed_tokens
        self._write(req, start, start + num_new + num_lookahead, garbage_from=start + num_new)
        req.num_computed_tokens += num_new
        if req.num_computed_tokens == req.num_tokens:
            req.append_output_tokens([rng % 2])  # the sampled token

    def _allocate(self, req, num_new, hits=None, num_hit=0) -> list[int] | None:
        live = [r.request_id for r in self.waiting + self.running]
        before = snapshot(self.kv, live)
        ids = self.kv.allocate_slots(req, num_new, hits, num_hit)
        if ids is None:
            assert snapshot(self.kv, live) == before
        else:
            self._mark_fresh(ids[len(hits or []) :])
        return ids

    # -------------------------------------------------------------- rules
    @precondition(lambda self: len(self.waiting) + len(self.running) < 6)
    @rule(base=st.sampled_from(_BASES), n=st.integers(1, 12), tail=st.lists(st.integers(0, 1)))
    def add_request(self, base, n, tail):
        prompt = (base[:n] + tail)[:_MAX_LEN]
        extra_key = "salt" if self.next_id % 4 == 3 else None
        self.waiting.append(make_request(f"r{self.next_id}", prompt, extra_key=extra_key))
        self.next_id += 1

    @precondition(lambda self: self.waiting)
    @rule(i=st.integers(0, 5), chunk=st.integers(1, 24), rng=st.integers(0, 1))
    def admit(self, i, chunk, rng):
        req = self.waiting[i % len(self.waiting)]
        hits, num_hit = self.kv.get_computed_blocks(req)
        assert num_hit == len(hits) * self.bs and num_hit < req.num_tokens
        for b, block in enumerate(hits):
            for off in range(self.bs):
                pos = b * self.bs + off
                want = (req.extra_key, tuple(req.all_token_ids[: pos + 1]))
                assert self.slots[block.block_id][off] == want, "prefix hit on wrong KV"
        if req.request_id not in self.counted and req.num_cached_tokens < 0:
            self.counted.add(req.request_id)
            if self.kv.enable_prefix_caching:
                self.queries += req.num_tokens
                self.hits += num_hit
        num_new = min(chunk, req.num_tokens - num_hit)
        if self._allocate(req, num_new, hits, num_hit) is None:
            return
        req.num_computed_tokens = num_hit
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = num_hit
        self.waiting.remove(req)
        self.running.append(req)
        self._forward(req, num_new, 0, rng)

    @precondition(lambda self: self.running)
    @rule(
        i=st.integers(0, 5),
        chunk=st.integers(1, 24),
        lookahead=st.integers(0, 3),
        rng=st.integers(0, 1),
    )
    def step(self, i, chunk, lookahead, rng):
        req = self.running[i % len(self.running)]
        if req.num_tokens >= _MAX_LEN:
            self._finish(req)
            return
        remaining = req.num_tokens - req.num_computed_tokens
        num_new = min(chunk, remaining)
        # Speculative slots exist only past the known tokens (decode).
        num_lookahead = lookahead if num_new == remaining else 0
        if self._allocate(req, num_new + num_lookahead) is not None:
            self._forward(req, num_new, num_lookahead, rng)

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 5), before_forward=st.booleans(), chunk=st.integers(1, 8))
    def preempt(self, i, before_forward, chunk):
        req = self.running[i % len(self.running)]
        if before_forward:  # scheduled this step, then chosen as the victim
            num_new = min(chunk, req.num_tokens - req.num_computed_tokens)
            self._allocate(req, num_new)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.running.remove(req)
        self.waiting.append(req)

    @precondition(lambda self: self.waiting or self.running)
    @rule(i=st.integers(0, 11))
    def finish(self, i):
        reqs = self.waiting + self.running
        self._finish(reqs[i % len(reqs)])

    def _finish(self, req: Request) -> None:
        self.kv.free(req)
        (self.running if req in self.running else self.waiting).remove(req)

    # -------------------------------------------------------------- invariants
    @invariant()
    def integrity(self):
        kv = self.kv
        kv.check_integrity()
        for req in self.running:
            assert len(kv.get_block_ids(req.request_id)) * self.bs >= req.num_computed_tokens
        assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (self.queries, self.hits)
        if not kv.enable_prefix_caching:
            assert kv.pool.num_cached_blocks == 0

    def teardown(self):
        kv = getattr(self, "kv", None)
        if kv is None:
            return
        for req in self.waiting + self.running:
            kv.free(req)
        kv.check_integrity()
        assert kv.num_free_blocks == kv.num_blocks and kv.usage == 0.0
        assert all(b.ref_cnt == 0 for b in kv.pool.blocks)
        assert kv.pool.num_evictable_blocks == kv.pool.num_cached_blocks


KVManagerMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None
)
TestKVManagerStateful = KVManagerMachine.TestCase
