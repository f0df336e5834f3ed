"""BlockPool: allocation, reference counts, the free / evictable queues and LRU eviction."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kestrel.kv.block_pool import BlockPool


def _hash(i: int) -> bytes:
    return i.to_bytes(32, "little")


def _cached_and_freed(pool: BlockPool, num_blocks: int, first_hash: int = 0) -> list[int]:
    """Allocate blocks, give each a hash, free them in order; returns their ids."""
    blocks = pool.allocate(num_blocks)
    for i, block in enumerate(blocks):
        assert pool.cache_block(block, _hash(first_hash + i))
    pool.free(blocks)
    return [b.block_id for b in blocks]


def test_initial_state():
    pool = BlockPool(4)
    assert pool.num_blocks == 4
    assert pool.num_free_blocks == 4
    assert pool.num_evictable_blocks == 0 and pool.num_cached_blocks == 0
    assert [b.block_id for b in pool.blocks] == [0, 1, 2, 3]
    pool.check_integrity()
    with pytest.raises(ValueError):
        BlockPool(0)


def test_allocate_and_free_ref_counts():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    assert len({b.block_id for b in blocks}) == 3
    assert all(b.ref_cnt == 1 for b in blocks)
    assert pool.num_free_blocks == 1
    pool.touch(blocks[:1])
    assert blocks[0].ref_cnt == 2
    pool.free(blocks)
    assert blocks[0].ref_cnt == 1 and blocks[1].ref_cnt == 0
    assert pool.num_free_blocks == 3
    pool.check_integrity()
    pool.free(blocks[:1])
    assert pool.num_free_blocks == 4
    pool.check_integrity()


def test_over_allocation_raises_and_changes_nothing():
    pool = BlockPool(3)
    _cached_and_freed(pool, 1)
    held = pool.allocate(1)
    assert pool.num_free_blocks == 2
    with pytest.raises(ValueError):
        pool.allocate(3)
    assert pool.num_free_blocks == 2 and pool.num_evictable_blocks == 1
    assert pool.num_cached_blocks == 1 and held[0].ref_cnt == 1
    pool.check_integrity()


def test_double_free_asserts():
    pool = BlockPool(2)
    blocks = pool.allocate(1)
    pool.free(blocks)
    with pytest.raises(AssertionError):
        pool.free(blocks)
    assert blocks[0].ref_cnt == 0


def test_unhashed_free_blocks_are_used_before_cached_ones():
    pool = BlockPool(4)
    cached = _cached_and_freed(pool, 2)
    assert pool.num_evictable_blocks == 2 and pool.num_free_blocks == 4
    fresh = pool.allocate(2)
    assert not {b.block_id for b in fresh} & set(cached)
    assert pool.num_cached_blocks == 2  # nothing evicted yet
    pool.check_integrity()


def test_lru_eviction_order_and_hash_drop():
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    for i, block in enumerate((a, b, c)):
        pool.cache_block(block, _hash(i))
    pool.free([b, c, a])  # b is the least recently freed
    assert pool.evictable_block_ids() == [b.block_id, c.block_id, a.block_id]
    (first,) = pool.allocate(1)
    assert first is b and b.block_hash is None
    assert pool.get_cached_block(_hash(1)) is None
    assert pool.get_cached_block(_hash(0)) is a
    pool.check_integrity()
    second, third = pool.allocate(2)
    assert (second, third) == (c, a)
    assert pool.num_cached_blocks == 0
    pool.check_integrity()


def test_touch_revives_evictable_block():
    pool = BlockPool(3)
    ids = _cached_and_freed(pool, 2)
    block = pool.get_cached_block(_hash(0))
    assert block is not None and block.block_id == ids[0]
    pool.touch([block])
    assert block.ref_cnt == 1 and block.block_hash == _hash(0)
    assert pool.evictable_block_ids() == [ids[1]]
    assert pool.num_free_blocks == 2
    pool.check_integrity()
    # Freed again it becomes the most recently used.
    pool.free([block])
    assert pool.evictable_block_ids() == [ids[1], ids[0]]


def test_touch_of_free_uncached_block_asserts():
    pool = BlockPool(2)
    with pytest.raises(AssertionError):
        pool.touch([pool.blocks[0]])


def test_cache_block_first_writer_wins():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    assert pool.cache_block(a, _hash(7))
    assert not pool.cache_block(b, _hash(7))
    assert b.block_hash is None and pool.get_cached_block(_hash(7)) is a
    pool.free([a, b])
    assert pool.num_evictable_blocks == 1
    pool.check_integrity()


def test_uncache_referenced_block():
    pool = BlockPool(2)
    (a,) = pool.allocate(1)
    pool.cache_block(a, _hash(1))
    pool.uncache_block(a)
    assert a.block_hash is None and pool.get_cached_block(_hash(1)) is None
    pool.free([a])
    assert pool.num_evictable_blocks == 0
    pool.check_integrity()


def test_evict_and_reset():
    pool = BlockPool(4)
    ids = _cached_and_freed(pool, 3)
    assert pool.evict(1) == 1
    assert pool.evictable_block_ids() == ids[1:]
    held = pool.allocate(1)
    assert held[0].block_id not in ids[1:]  # the free queue goes first
    assert not pool.reset_cache()
    assert pool.num_cached_blocks == 2
    pool.free(held)
    assert pool.reset_cache()
    assert pool.num_cached_blocks == 0 and pool.num_evictable_blocks == 0
    assert pool.num_free_blocks == 4
    pool.check_integrity()


def test_check_integrity_catches_corruption():
    pool = BlockPool(3)
    blocks = pool.allocate(2)
    blocks[0].ref_cnt = 0  # unreferenced but in no queue
    with pytest.raises(AssertionError):
        pool.check_integrity()
    blocks[0].ref_cnt = 1
    blocks[1].block_hash = _hash(5)  # hashed but missing from the map
    with pytest.raises(AssertionError):
        pool.check_integrity()
    blocks[1].block_hash = None
    pool.blocks[2].ref_cnt = -1
    with pytest.raises(AssertionError):
        pool.check_integrity()


_OPS = st.lists(
    st.tuples(
        st.sampled_from(["alloc", "free", "touch", "cache", "evict"]),
        st.integers(0, 5),
        st.integers(0, 3),
    ),
    max_size=40,
)


@settings(max_examples=80, deadline=None)
@given(num_blocks=st.integers(1, 6), ops=_OPS)
def test_random_operations_keep_integrity(num_blocks, ops):
    """Random operations against a reference model of what each holder owns."""
    pool = BlockPool(num_blocks)
    held: list[list] = []  # each entry: the blocks one holder references
    for op, a, b in ops:
        if op == "alloc":
            if a > pool.num_free_blocks:
                with pytest.raises(ValueError):
                    pool.allocate(a)
            else:
                held.append(pool.allocate(a))
        elif op == "free" and held:
            pool.free(reversed(held.pop(a % len(held))))
        elif op == "touch":
            block = pool.get_cached_block(_hash(b))
            if block is not None:
                pool.touch([block])
                held.append([block])
        elif op == "cache" and held and held[a % len(held)]:
            holder = held[a % len(held)]
            block = holder[b % len(holder)]
            if block.block_hash is None:
                was_new = pool.get_cached_block(_hash(b)) is None
                assert pool.cache_block(block, _hash(b)) == was_new
        elif op == "evict":
            before = pool.num_evictable_blocks
            assert pool.evict(a) == min(a, before)
        pool.check_integrity()
        for block in pool.blocks:
            assert block.ref_cnt == sum(h.count(block) for h in held)
    for holder in held:
        pool.free(holder)
    pool.check_integrity()
    assert pool.num_free_blocks == num_blocks
    assert all(block.ref_cnt == 0 for block in pool.blocks)
