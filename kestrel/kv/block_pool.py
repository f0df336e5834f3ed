"""Physical KV block bookkeeping: ids, reference counts, the free and evictable queues.

Owns: every `KVBlock`, its reference count and cache hash, the queue of free uncached blocks,
the LRU queue of unreferenced cached (evictable) blocks and the hash -> block map. Must not
hash tokens, know about requests or touch tensors: the runner owns the KV memory and a block
id is only an index into it.

Every block is in exactly one state:

    state       ref_cnt   block_hash   lives in        reused
    referenced  > 0       any          request tables  never
    free        0         None         `_free`         first (FIFO)
    evictable   0         set          `_evictable`    when `_free` is empty, least recent first

Preferring free blocks over evictable ones keeps cached prefixes alive as long as possible.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass

BlockHash = bytes


@dataclass(eq=False, slots=True)
class KVBlock:
    block_id: int
    ref_cnt: int = 0  # number of request block tables holding this block
    block_hash: BlockHash | None = None  # set while the cache maps this hash to this block


def check_invariant(cond: bool, msg: str) -> None:
    # NOTE: a real raise, not `assert`, so integrity checks survive `python -O`.
    if not cond:
        raise AssertionError(msg)


class BlockPool:
    """Fixed set of KV blocks 0..num_blocks-1 with reference counting and an LRU of cached ones.

    Every operation is O(1) per block touched.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: deque[KVBlock] = deque(self.blocks)
        # block_id -> block, least recently freed first.
        self._evictable: OrderedDict[int, KVBlock] = OrderedDict()
        self._cached: dict[BlockHash, KVBlock] = {}

    # ------------------------------------------------------------------ sizes
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: free plus evictable."""
        return len(self._free) + len(self._evictable)

    @property
    def num_evictable_blocks(self) -> int:
        return len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks with a hash, referenced or not."""
        return len(self._cached)

    def evictable_block_ids(self) -> list[int]:
        """Evictable block ids in eviction order (the next victim first)."""
        return list(self._evictable)

    # ------------------------------------------------------------------ references
    def allocate(self, num_blocks: int) -> list[KVBlock]:
        """Take `num_blocks` blocks with ref_cnt 1, evicting cached ones once no free one is left.

        Raises ValueError (and changes nothing) when fewer than `num_blocks` can be taken.
        """
        if num_blocks > self.num_free_blocks:
            raise ValueError(f"cannot allocate {num_blocks} blocks, {self.num_free_blocks} free")
        out: list[KVBlock] = []
        for _ in range(num_blocks):
            if self._free:
                block = self._free.popleft()
            else:
                _, block = self._evictable.popitem(last=False)
                self._drop_hash(block)
            assert block.ref_cnt == 0, f"block {block.block_id} allocated while referenced"
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take one more reference on each block; an evictable one leaves the evictable queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                assert block.block_hash is not None, f"block {block.block_id} is free, not cached"
                del self._evictable[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference on each block, in order; the last reference frees it.

        A freed cached block joins the evictable queue at its most recent end, so the caller
        passes blocks in the order it wants them to survive longest last.
        """
        for block in blocks:
            assert block.ref_cnt > 0, f"block {block.block_id} freed with ref_cnt 0"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is None:
                    self._free.append(block)
                else:
                    self._evictable[block.block_id] = block

    # ------------------------------------------------------------------ hashes
    def get_cached_block(self, block_hash: BlockHash) -> KVBlock | None:
        return self._cached.get(block_hash)

    def cache_block(self, block: KVBlock, block_hash: BlockHash) -> bool:
        """Map `block_hash` to a referenced, unhashed block; False if the hash is already mapped
        (the existing block keeps it and `block` stays unhashed)."""
        assert block.ref_cnt > 0 and block.block_hash is None, f"cannot cache {block}"
        if block_hash in self._cached:
            return False
        block.block_hash = block_hash
        self._cached[block_hash] = block
        return True

    def uncache_block(self, block: KVBlock) -> None:
        """Forget the hash of a referenced block (its KV will not hold what the hash says)."""
        assert block.ref_cnt > 0, f"uncache of unreferenced block {block.block_id}"
        if block.block_hash is not None:
            self._drop_hash(block)

    def evict(self, num_blocks: int) -> int:
        """Move up to `num_blocks` evictable blocks, least recent first, to the free queue."""
        num_evicted = 0
        while num_evicted < num_blocks and self._evictable:
            _, block = self._evictable.popitem(last=False)
            self._drop_hash(block)
            self._free.append(block)
            num_evicted += 1
        return num_evicted

    def reset_cache(self) -> bool:
        """Drop every hash; refused (False) while any block is referenced."""
        if self.num_free_blocks != self.num_blocks:
            return False
        self.evict(len(self._evictable))
        return True

    def _drop_hash(self, block: KVBlock) -> None:
        assert block.block_hash is not None
        del self._cached[block.block_hash]
        block.block_hash = None

    # ------------------------------------------------------------------ checks
    def check_integrity(self) -> None:
        """Assert the state table of the module docstring and the hash map's consistency."""
        for i, block in enumerate(self.blocks):
            check_invariant(block.block_id == i, f"block at index {i} has id {block.block_id}")
            check_invariant(block.ref_cnt >= 0, f"block {i} has ref_cnt {block.ref_cnt}")
        free_ids = [b.block_id for b in self._free]
        check_invariant(len(set(free_ids)) == len(free_ids), "a block is twice in the free queue")
        for block in self._free:
            check_invariant(block.ref_cnt == 0, f"free block {block.block_id} is referenced")
            check_invariant(block.block_hash is None, f"free block {block.block_id} has a hash")
        for block_id, block in self._evictable.items():
            check_invariant(
                block is self.blocks[block_id], f"evictable key {block_id} names another block"
            )
            check_invariant(block.ref_cnt == 0, f"evictable block {block_id} is referenced")
            check_invariant(block.block_hash is not None, f"evictable block {block_id} has no hash")
        check_invariant(
            not set(free_ids) & self._evictable.keys(), "a block is both free and evictable"
        )
        num_unreferenced = sum(b.ref_cnt == 0 for b in self.blocks)
        check_invariant(
            num_unreferenced == self.num_free_blocks,
            f"{num_unreferenced} unreferenced blocks but {self.num_free_blocks} free/evictable",
        )
        for block_hash, block in self._cached.items():
            check_invariant(
                block.block_hash == block_hash, f"hash map entry for {block.block_id} is stale"
            )
        num_hashed = sum(b.block_hash is not None for b in self.blocks)
        check_invariant(
            num_hashed == len(self._cached), "a hashed block is missing from the hash map"
        )
