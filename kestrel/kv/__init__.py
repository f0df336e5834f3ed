"""Paged KV-cache bookkeeping (host side): blocks, the prefix cache and the manager the
scheduler uses. Tensors live in the runner; here a block is only an id."""

from kestrel.kv.block_pool import BlockPool, KVBlock
from kestrel.kv.kv_manager import KVCacheManager
from kestrel.kv.prefix_cache import HashPrefixCache, PrefixCache, SequenceKey, hash_block

__all__ = [
    "BlockPool",
    "HashPrefixCache",
    "KVBlock",
    "KVCacheManager",
    "PrefixCache",
    "SequenceKey",
    "hash_block",
]
