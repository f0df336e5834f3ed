"""`KVCacheManager`: the only KV-cache API the scheduler sees.

Owns: each request's block table (block ids in sequence order), its prefix-cache key, the
policy of when blocks are matched, referenced, registered in the prefix cache and freed, and
the prefix-cache statistics. Must not touch tensors (the runner owns KV memory and learns
block ids only through `SchedulerOutput`) nor decide which request runs.

Block table of one request (block_size 4), after `allocate_slots`:

    tokens     0 1 2 3 | 4 5 6 7 | 8 9 . .
    table      [  b0   |   b1    |   b2  ]
               hits    | computed / new  | free slots (decode, lookahead)
               '-- full blocks within the scheduled tokens are registered in the cache

NOTE: blocks are registered when they are allocated, before the step's forward writes their
KV, so a request scheduled later in the same step can already hit them (n > 1 samples share
the prompt this way). This is sound because the forward stores every token's KV before any
attention reads it, and because a request freed before its forward ran drops the hashes of
the blocks it never wrote (see `free`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kestrel.kv.block_pool import BlockPool, KVBlock, check_invariant
from kestrel.kv.prefix_cache import HashPrefixCache, PrefixCache, SequenceKey
from kestrel.utils.math import cdiv

if TYPE_CHECKING:
    from kestrel.request import Request


@dataclass
class _RequestState:
    blocks: list[KVBlock] = field(default_factory=list)  # the block table
    key: SequenceKey | None = None  # None when prefix caching is off
    counted: bool = False  # prefix-cache stats already recorded for this request


class KVCacheManager:
    """Block tables, prefix-cache matching and reference counting for all live requests.

    Call `free` for every request once it finishes, is aborted or is preempted, including
    requests that only went through `get_computed_blocks`.
    """

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.prefix_cache: PrefixCache | None = (
            HashPrefixCache(self.pool, block_size) if enable_prefix_caching else None
        )
        self._requests: dict[str, _RequestState] = {}

    # ------------------------------------------------------------------ sizes and stats
    @property
    def enable_prefix_caching(self) -> bool:
        return self.prefix_cache is not None

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take (free plus evictable cached ones)."""
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some request."""
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.pool.num_free_blocks

    @property
    def prefix_cache_queries(self) -> int:
        return self.prefix_cache.stats.queries if self.prefix_cache else 0

    @property
    def prefix_cache_hits(self) -> int:
        return self.prefix_cache.stats.hits if self.prefix_cache else 0

    @property
    def hit_rate(self) -> float:
        return self.prefix_cache.stats.hit_rate if self.prefix_cache else 0.0

    def get_block_ids(self, request_id: str) -> list[int]:
        state = self._requests.get(request_id)
        return [b.block_id for b in state.blocks] if state else []

    # ------------------------------------------------------------------ scheduling API
    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Longest cached prefix of full blocks of `request.all_token_ids` under its extra_key,
        and the number of tokens it covers. Takes no references.

        At least one token is always left to compute: its logits give the next token. Requests
        asking for prompt logprobs never hit (every prompt position needs logits). Stats count
        only a request's first admission (`num_cached_tokens < 0`), once however often it is
        retried while waiting.
        """
        cache = self.prefix_cache
        if cache is None or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        state = self._requests.get(request.request_id)
        if state is None:
            state = self._requests[request.request_id] = self._new_state(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        blocks = cache.match(request.all_token_ids, state.key, max_blocks)
        num_hit_tokens = len(blocks) * self.block_size
        if not state.counted and request.num_cached_tokens < 0:
            cache.stats.record(request.num_tokens, num_hit_tokens)
            state.counted = True
        return blocks, num_hit_tokens

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: list[KVBlock] | None = None,
        num_new_computed_tokens: int = 0,
    ) -> list[int] | None:
        """Grow the request's table to cover `num_computed_tokens + num_new_computed_tokens +
        num_new_tokens` tokens, referencing the prefix hits `new_computed_blocks` (from
        `get_computed_blocks`, called just before) and then fresh blocks.

        Returns the ids appended to the table (hits first), or None, changing nothing, when
        there are not enough free and evictable blocks. Then registers in the prefix cache
        every block that is full of known tokens within that range.
        """
        hits = new_computed_blocks or []
        bs = self.block_size
        if not hits and self._fits(request, num_new_tokens):
            return []  # fast path: most decode steps need no block and complete no block
        if num_new_tokens < 0 or num_new_computed_tokens != len(hits) * bs:
            raise ValueError(
                f"bad allocation: num_new_tokens={num_new_tokens}, {len(hits)} hit blocks for "
                f"num_new_computed_tokens={num_new_computed_tokens}"
            )
        state = self._requests.get(request.request_id) or self._new_state(request)
        if hits:
            self._check_hits(request, state, hits)
        num_tokens = request.num_computed_tokens + num_new_computed_tokens + num_new_tokens
        num_fresh = max(0, cdiv(num_tokens, bs) - len(state.blocks) - len(hits))
        # Hits waiting in the evictable queue are counted as free but are not ours to take.
        num_revived = sum(1 for b in hits if b.ref_cnt == 0)
        if num_fresh > self.pool.num_free_blocks - num_revived:
            return None
        self.pool.touch(hits)
        fresh = self.pool.allocate(num_fresh)
        state.blocks.extend(hits)
        state.blocks.extend(fresh)
        self._requests[request.request_id] = state
        if state.key is not None:
            self._cache_full_blocks(request, state, num_tokens)
        return [b.block_id for b in hits] + [b.block_id for b in fresh]

    def _fits(self, request: Request, num_new_tokens: int) -> bool:
        state = self._requests.get(request.request_id)
        if state is None or num_new_tokens < 0:
            return False
        num_tokens = request.num_computed_tokens + num_new_tokens
        if num_tokens > len(state.blocks) * self.block_size:
            return False
        key = state.key
        return key is None or min(num_tokens, request.num_known_tokens) // self.block_size <= (
            key.num_inserted_blocks
        )

    def free(self, request: Request) -> None:
        """Drop the request's references; a no-op for an unknown request.

        Call it before resetting `num_computed_tokens` (preemption): blocks past the computed
        tokens were registered for a forward that will not run for this request, so their
        hashes are dropped when no one else holds them. Blocks are released tail first, so a
        request's tail blocks are evicted before its head (later prompts share heads).
        """
        state = self._requests.pop(request.request_id, None)
        if state is None:
            return
        num_written = request.num_computed_tokens // self.block_size
        for block in state.blocks[num_written:]:
            if block.ref_cnt == 1 and block.block_hash is not None:
                self.pool.uncache_block(block)
        self.pool.free(reversed(state.blocks))

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block; refused (False) while any block is referenced."""
        if self.prefix_cache is None:
            return self.pool.reset_cache()
        return self.prefix_cache.reset()

    # ------------------------------------------------------------------ internals
    def _new_state(self, request: Request) -> _RequestState:
        key = SequenceKey(request.extra_key) if self.prefix_cache is not None else None
        return _RequestState(key=key)

    def _check_hits(self, request: Request, state: _RequestState, hits: list[KVBlock]) -> None:
        start = len(state.blocks)
        key = state.key
        if key is None:
            raise ValueError("prefix hits given while prefix caching is disabled")
        if (
            request.num_computed_tokens != start * self.block_size
            or key.num_inserted_blocks < start
        ):
            raise ValueError("prefix hits must start right after the request's full blocks")
        for i, block in enumerate(hits, start):
            # A mismatch means the blocks were evicted since get_computed_blocks returned them.
            if i >= len(key.block_hashes) or block.block_hash != key.block_hashes[i]:
                raise ValueError(f"block {block.block_id} is not the cached block {i} of request")

    def _cache_full_blocks(self, request: Request, state: _RequestState, num_tokens: int) -> None:
        # Only tokens whose ids are known: lookahead (speculative) slots and sampled-but-unread
        # tokens (async scheduling placeholders) stay unregistered.
        num_full = min(num_tokens, request.num_known_tokens) // self.block_size
        assert state.key is not None and self.prefix_cache is not None
        if num_full > state.key.num_inserted_blocks:
            self.prefix_cache.insert(request.all_token_ids, state.key, state.blocks[:num_full])

    # ------------------------------------------------------------------ checks
    def check_integrity(self) -> None:
        """Raise AssertionError unless: every block is exactly one of referenced / free /
        evictable, each ref_cnt equals the number of block tables holding the block, the hash
        map is consistent, and each table's hashes agree with its request's key."""
        if self.prefix_cache is not None:
            self.prefix_cache.check_integrity()
        else:
            self.pool.check_integrity()
            check_invariant(self.pool.num_cached_blocks == 0, "hashes while caching is off")
        refs: Counter[int] = Counter()
        for rid, state in self._requests.items():
            ids = [b.block_id for b in state.blocks]
            check_invariant(len(set(ids)) == len(ids), f"request {rid} holds a block twice")
            refs.update(ids)
            if state.key is not None:
                self._check_table_hashes(rid, state.blocks, state.key)
        for block in self.pool.blocks:
            check_invariant(
                block.ref_cnt == refs[block.block_id],
                f"block {block.block_id}: ref_cnt {block.ref_cnt}, "
                f"in {refs[block.block_id]} block tables",
            )

    @staticmethod
    def _check_table_hashes(rid: str, blocks: list[KVBlock], key: SequenceKey) -> None:
        n = key.num_inserted_blocks
        check_invariant(n <= len(blocks), f"request {rid}: {n} inserted of {len(blocks)} blocks")
        check_invariant(n <= len(key.block_hashes), f"request {rid}: inserted blocks unhashed")
        for i, block in enumerate(blocks):
            # An inserted block keeps its hash or stays uncached (another block had it first);
            # a block not yet inserted is never cached.
            expected = (None, key.block_hashes[i]) if i < n else (None,)
            check_invariant(
                block.block_hash in expected, f"request {rid}: block {i} has a foreign hash"
            )
