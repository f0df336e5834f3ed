"""Attention kernels: varlen paged prefill, split-KV paged decode, and LSE state merging."""

from kestrel.kernels.attention.decode import DecodeConfig, choose_num_splits, decode_attention
from kestrel.kernels.attention.merge_states import merge_states
from kestrel.kernels.attention.prefill import (
    PrefillConfig,
    prefill_attention,
    prefill_reads_new_kv,
)

__all__ = [
    "DecodeConfig",
    "PrefillConfig",
    "choose_num_splits",
    "decode_attention",
    "merge_states",
    "prefill_attention",
    "prefill_reads_new_kv",
]
