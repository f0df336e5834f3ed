"""Prefix caching: which KV blocks already hold a given token prefix.

Owns: the `PrefixCache` interface, the per-sequence `SequenceKey`, block hashing
(`HashPrefixCache`) and the prefix-cache hit counters. Must not allocate blocks for requests or
take references (the KV cache manager does, through the `BlockPool`), and must not know about
requests or the scheduler.
"""

from __future__ import annotations

import hashlib
import struct
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from kestrel.kv.block_pool import BlockHash, BlockPool, KVBlock, check_invariant

_ROOT_PARENT = bytes(32)  # parent "hash" of a sequence's first block


def hash_block(
    parent: BlockHash | None, token_ids: Sequence[int], extra_key: str | None
) -> BlockHash:
    """Stable 32-byte hash of one full block given the hash of the block before it.

    Chaining makes a block's hash name its whole prefix, so equal hashes mean equal KV. The
    encoding is unambiguous (fixed-size parent, length-prefixed extra_key, int64 tokens) and
    independent of Python's per-process string hashing.
    """
    h = hashlib.blake2b(digest_size=32)
    h.update(_ROOT_PARENT if parent is None else parent)
    if extra_key is None:
        h.update(b"\x00")
    else:
        key = extra_key.encode()
        h.update(b"\x01" + struct.pack("<q", len(key)) + key)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


@dataclass
class SequenceKey:
    """One sequence's handle into the prefix cache; the caller keeps one per live sequence.

    NOTE: valid only while the sequence's token ids are append-only; drop it otherwise.
    """

    extra_key: str | None = None  # namespace: sequences with different keys never share blocks
    # Memo of the chained hashes of the first full blocks, extended on demand.
    block_hashes: list[BlockHash] = field(default_factory=list)
    num_inserted_blocks: int = 0  # leading blocks already offered through `insert`


@dataclass
class PrefixCacheStats:
    queries: int = 0  # tokens looked up
    hits: int = 0  # of those, tokens served from the cache

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    def record(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        assert 0 <= num_hit_tokens <= num_queried_tokens
        self.queries += num_queried_tokens
        self.hits += num_hit_tokens


class PrefixCache(ABC):
    """Maps token prefixes, in full blocks and namespaced by `extra_key`, to KV blocks.

    Invariants every implementation keeps:
    - Only full blocks are cached. A match covers `token_ids[:k * block_size]` for some k:
      block i matches only if blocks 0..i-1 match too.
    - Sequences whose `extra_key` differs never share a block.
    - A cached block stands for exactly the prefix it was inserted under until it is evicted;
      eviction takes only unreferenced blocks (ref_cnt == 0).
    - `match` and `insert` never change reference counts. Matched blocks may be unreferenced:
      the caller must reference them (`BlockPool.touch`) before any allocation, which could
      evict them.
    - `check_integrity` raises AssertionError on any broken invariant; it is O(num_blocks)
      and meant for tests and idle-time debugging.
    """

    def __init__(self, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.stats = PrefixCacheStats()

    @abstractmethod
    def match(self, token_ids: Sequence[int], key: SequenceKey, max_blocks: int) -> list[KVBlock]:
        """Cached blocks holding the longest prefix of `token_ids`, at most `max_blocks` full
        blocks, in sequence order."""

    @abstractmethod
    def insert(self, token_ids: Sequence[int], key: SequenceKey, blocks: Sequence[KVBlock]) -> int:
        """Offer the sequence's leading full blocks: `blocks[i]` holds block i of `token_ids`.

        `blocks` must cover only full blocks whose KV is (or is about to be) written, and
        extends the blocks given in earlier calls. Blocks before `key.num_inserted_blocks` are
        skipped. A block whose prefix is already cached under another block stays uncached: the
        first writer wins. Returns the number of blocks newly cached.
        """

    @abstractmethod
    def evict(self, num_blocks: int) -> int:
        """Forget up to `num_blocks` unreferenced cached blocks; returns how many were dropped."""

    @abstractmethod
    def reset(self) -> bool:
        """Forget every cached block; refused (False) while any block is referenced."""

    @abstractmethod
    def check_integrity(self) -> None:
        """Raise AssertionError if any invariant above, or of the block pool, is broken."""


class HashPrefixCache(PrefixCache):
    """Hash-chained full blocks looked up in the `BlockPool`'s hash map (the pool keeps the
    map consistent with eviction)."""

    def __init__(self, pool: BlockPool, block_size: int) -> None:
        super().__init__(block_size)
        self.pool = pool

    def block_hashes(
        self, token_ids: Sequence[int], key: SequenceKey, num_blocks: int
    ) -> list[BlockHash]:
        """`key.block_hashes`, extended to the first `num_blocks` full blocks of `token_ids`."""
        bs = self.block_size
        hashes = key.block_hashes
        num_blocks = min(num_blocks, len(token_ids) // bs)
        parent = hashes[-1] if hashes else None
        for i in range(len(hashes), num_blocks):
            parent = hash_block(parent, token_ids[i * bs : (i + 1) * bs], key.extra_key)
            hashes.append(parent)
        return hashes

    def match(self, token_ids: Sequence[int], key: SequenceKey, max_blocks: int) -> list[KVBlock]:
        bs = self.block_size
        hashes = key.block_hashes
        out: list[KVBlock] = []
        for i in range(min(max_blocks, len(token_ids) // bs)):
            if i == len(hashes):  # hash lazily: a miss ends the walk
                self.block_hashes(token_ids, key, i + 1)
            block = self.pool.get_cached_block(hashes[i])
            if block is None:
                break
            out.append(block)
        return out

    def insert(self, token_ids: Sequence[int], key: SequenceKey, blocks: Sequence[KVBlock]) -> int:
        start = key.num_inserted_blocks
        if len(blocks) <= start:
            return 0
        assert len(blocks) * self.block_size <= len(token_ids), "insert of a partial block"
        hashes = self.block_hashes(token_ids, key, len(blocks))
        num_cached = 0
        for i in range(start, len(blocks)):
            block = blocks[i]
            if block.block_hash is None:
                num_cached += self.pool.cache_block(block, hashes[i])
            else:  # a prefix hit: cached under this very prefix already
                assert block.block_hash == hashes[i], f"block {block.block_id} hash mismatch"
        key.num_inserted_blocks = len(blocks)
        return num_cached

    def evict(self, num_blocks: int) -> int:
        return self.pool.evict(num_blocks)

    def reset(self) -> bool:
        return self.pool.reset_cache()

    def check_integrity(self) -> None:
        self.pool.check_integrity()
        s = self.stats
        check_invariant(0 <= s.hits <= s.queries, f"hit counters out of range: {s}")
