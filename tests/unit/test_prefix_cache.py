"""HashPrefixCache: chained block hashes, hit / miss, extra_key isolation, eviction."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kestrel.kv.block_pool import BlockPool
from kestrel.kv.prefix_cache import (
    HashPrefixCache,
    PrefixCache,
    PrefixCacheStats,
    SequenceKey,
    hash_block,
)

BS = 4


def _cache(num_blocks: int = 8) -> HashPrefixCache:
    return HashPrefixCache(BlockPool(num_blocks), BS)


def _store(cache: HashPrefixCache, tokens: list[int], extra_key: str | None = None):
    """Allocate blocks for `tokens`, insert the full ones; returns (blocks, key)."""
    num_blocks = -(-len(tokens) // BS)
    blocks = cache.pool.allocate(num_blocks)
    key = SequenceKey(extra_key)
    cache.insert(tokens, key, blocks[: len(tokens) // BS])
    return blocks, key


def test_is_a_prefix_cache():
    assert isinstance(_cache(), PrefixCache)
    with pytest.raises(TypeError):
        PrefixCache(BS)  # abstract


def test_hash_is_chained_and_namespaced():
    block = [1, 2, 3, 4]
    root = hash_block(None, block, None)
    assert len(root) == 32 and root == hash_block(None, list(block), None)
    other_parent = hash_block(None, [9, 9, 9, 9], None)
    # Same block tokens after a different parent: a different hash.
    assert hash_block(root, block, None) != hash_block(other_parent, block, None)
    assert hash_block(None, block, "lora-1") != root
    assert hash_block(None, block, "lora-1") != hash_block(None, block, "lora-2")
    assert hash_block(None, block, "") != root  # empty key is not "no key"
    assert hash_block(None, [1, 2, 3, 5], None) != root
    assert hash_block(None, [2**40, -1], None) != hash_block(None, [0, -1], None)


def test_hash_is_stable_across_processes():
    code = (
        "from kestrel.kv.prefix_cache import hash_block;"
        "print(hash_block(hash_block(None, [5, 6], 'salt'), [7, 8], 'salt').hex())"
    )
    expected = hash_block(hash_block(None, [5, 6], "salt"), [7, 8], "salt").hex()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == expected


def test_miss_then_hit():
    cache = _cache()
    tokens = list(range(10))  # 2 full blocks + 2 tokens
    assert cache.match(tokens, SequenceKey(), max_blocks=10) == []
    blocks, key = _store(cache, tokens)
    assert key.num_inserted_blocks == 2 and cache.pool.num_cached_blocks == 2
    assert blocks[2].block_hash is None  # partial block never cached
    hit = cache.match(tokens, SequenceKey(), max_blocks=10)
    assert hit == blocks[:2]
    # A longer sequence with the same head hits the same blocks.
    assert cache.match(tokens + [77] * 8, SequenceKey(), max_blocks=10) == blocks[:2]
    cache.check_integrity()


def test_match_respects_max_blocks_and_takes_no_refs():
    cache = _cache()
    tokens = list(range(12))
    blocks, _ = _store(cache, tokens)
    refs = [b.ref_cnt for b in blocks]
    assert cache.match(tokens, SequenceKey(), max_blocks=2) == blocks[:2]
    assert cache.match(tokens, SequenceKey(), max_blocks=0) == []
    assert [b.ref_cnt for b in blocks] == refs


def test_chain_breaks_on_different_parent():
    cache = _cache()
    blocks, _ = _store(cache, [1, 1, 1, 1, 2, 2, 2, 2])
    # Second block's tokens match, first block's do not: no hit at all.
    assert cache.match([3, 3, 3, 3, 2, 2, 2, 2], SequenceKey(), max_blocks=2) == []
    # First block matches, second differs: only the first.
    assert cache.match([1, 1, 1, 1, 2, 2, 2, 9], SequenceKey(), max_blocks=2) == blocks[:1]


def test_extra_key_isolation():
    cache = _cache()
    tokens = list(range(8))
    blocks_a, _ = _store(cache, tokens, extra_key="adapter-a")
    assert cache.match(tokens, SequenceKey(), max_blocks=2) == []
    assert cache.match(tokens, SequenceKey("adapter-b"), max_blocks=2) == []
    assert cache.match(tokens, SequenceKey("adapter-a"), max_blocks=2) == blocks_a[:2]
    # The same tokens without a key are cached separately, not deduplicated away.
    blocks_none, _ = _store(cache, tokens)
    assert all(b.block_hash is not None for b in blocks_none)
    assert cache.match(tokens, SequenceKey(), max_blocks=2) == blocks_none


def test_memo_is_extended_lazily_and_reused():
    cache = _cache()
    tokens = list(range(16))
    key = SequenceKey()
    assert cache.match(tokens, key, max_blocks=4) == []
    assert len(key.block_hashes) == 1  # the walk stops at the first miss
    hashes = cache.block_hashes(tokens, key, 4)
    assert len(hashes) == 4
    assert hashes[1] == hash_block(hashes[0], tokens[4:8], None)
    assert cache.block_hashes(tokens, key, 2) is hashes  # never shrinks, never recomputes
    assert cache.block_hashes(tokens[:9], SequenceKey(), 9) == hashes[:2]  # full blocks only


def test_insert_is_incremental_and_first_writer_wins():
    cache = _cache()
    tokens = list(range(12))
    blocks_a, key_a = _store(cache, tokens[:4])
    more = cache.pool.allocate(2)
    assert cache.insert(tokens, key_a, blocks_a + more[:1]) == 1
    assert key_a.num_inserted_blocks == 2
    # A second sequence that computed the same prefix itself keeps its blocks uncached.
    blocks_b = cache.pool.allocate(2)
    key_b = SequenceKey()
    assert cache.insert(tokens, key_b, blocks_b) == 0
    assert all(b.block_hash is None for b in blocks_b)
    assert key_b.num_inserted_blocks == 2
    assert cache.match(tokens, SequenceKey(), max_blocks=3) == [blocks_a[0], more[0]]
    cache.check_integrity()


def test_insert_accepts_prefix_hits():
    cache = _cache()
    tokens = list(range(8))
    blocks_a, _ = _store(cache, tokens)
    key = SequenceKey()
    hit = cache.match(tokens, key, max_blocks=2)
    cache.pool.touch(hit)
    assert cache.insert(tokens, key, hit) == 0
    assert key.num_inserted_blocks == 2
    assert [b.ref_cnt for b in blocks_a] == [2, 2]


def test_evict_drops_only_unreferenced_blocks_lru_first():
    cache = _cache(num_blocks=4)
    blocks_a, _ = _store(cache, [1] * 8)
    blocks_b, _ = _store(cache, [2] * 8)
    cache.pool.free(reversed(blocks_a))  # tail first: block 1 of a is evicted first
    assert cache.evict(1) == 1
    assert cache.match([1] * 8, SequenceKey(), max_blocks=2) == blocks_a[:1]
    assert cache.evict(10) == 1  # b's blocks are referenced, so only a's head goes
    assert cache.match([1] * 8, SequenceKey(), max_blocks=2) == []
    assert cache.match([2] * 8, SequenceKey(), max_blocks=2) == blocks_b
    cache.check_integrity()


def test_evicted_block_reuse_changes_its_mapping():
    cache = _cache(num_blocks=2)
    blocks_a, _ = _store(cache, [1] * 8)
    cache.pool.free(reversed(blocks_a))
    blocks_b, _ = _store(cache, [2] * 8)  # must evict both of a's blocks
    assert {b.block_id for b in blocks_b} == {b.block_id for b in blocks_a}
    assert cache.match([1] * 8, SequenceKey(), max_blocks=2) == []
    assert cache.match([2] * 8, SequenceKey(), max_blocks=2) == blocks_b
    cache.check_integrity()


def test_reset():
    cache = _cache()
    blocks, _ = _store(cache, list(range(8)))
    assert not cache.reset()
    cache.pool.free(blocks)
    assert cache.reset()
    assert cache.match(list(range(8)), SequenceKey(), max_blocks=2) == []
    cache.check_integrity()


def test_stats():
    stats = PrefixCacheStats()
    assert stats.hit_rate == 0.0
    stats.record(10, 4)
    stats.record(6, 0)
    assert (stats.queries, stats.hits) == (16, 4)
    assert stats.hit_rate == 0.25
    with pytest.raises(AssertionError):
        stats.record(2, 3)
