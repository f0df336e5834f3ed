"""`AttentionBackend` ABC and the per-step `AttentionMetadata` every backend consumes.

Owns the contract between attention layers and attention implementations. The runner builds
one metadata object per step; layers call `backend.forward` once per layer. Must not know
about requests, schedulers or sampling.

KV cache layout (one tensor per layer):
    kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim]  (0 = K, 1 = V)
Token t of a request lives in block `block_table[req, t // block_size]`, slot
`t % block_size`; `slot_mapping[i] = block * block_size + slot` for each new token i.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Varlen batch description. Queries of request r are rows
    query_start_loc[r] : query_start_loc[r+1] of q; they sit at the last
    (query_len) positions of its seq_lens[r] tokens of context:

        context of r: [0 ........................ seq_lens[r])
                       [cached prefix ][ new queries ]
                                       ^ seq_lens[r] - query_len
    """

    num_tokens: int  # rows of q/k/v this step
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32, device
    seq_lens: torch.Tensor  # [num_reqs] int32, device: context length incl. this step's tokens
    block_table: torch.Tensor  # [num_reqs, max_blocks_per_req] int32, device
    slot_mapping: torch.Tensor  # [num_tokens] int64, device
    # Host copies for backends that loop in Python (the reference backend).
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    # Decode-only steps split the KV as a batch of this many requests would (0: num_reqs);
    # the runner sets the CUDA-graph bucket, so graphs on and off split, and round, alike.
    split_batch_size: int = 0

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens_cpu)


class AttentionBackend(ABC):
    """Paged attention over a varlen batch.

    Invariants every implementation keeps:
    - `forward` first writes this step's k/v into `kv_cache` at `slot_mapping`, then attends;
      a query at context position p sees exactly the keys at positions <= p of its own request
      (causal), whether they were written this step or earlier.
    - GQA/MQA: query head h reads KV head h // (num_q_heads // num_kv_heads).
    - Outputs depend only on each request's own rows: batch composition never changes results
      beyond floating-point reduction order.
    """

    name: str = "abstract"
    # True when `attend` exists: the model may then write this step's K/V with a fused kernel
    # (norm + RoPE + store in one launch) and skip the store inside `forward`.
    attends_stored_kv: bool = False

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_q_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_q_heads, head_dim]
        ...

    def attend(
        self,
        q: torch.Tensor,  # [num_tokens, num_q_heads, head_dim]
        kv_cache: torch.Tensor,  # already holds this step's K/V at `meta.slot_mapping`
        meta: AttentionMetadata,
        scale: float,
        new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:  # [num_tokens, num_q_heads, head_dim]
        """`forward` without the store; only for backends with `attends_stored_kv`.
        `new_kv` (k, v), rows aligned with q, are this step's keys/values as stored, left in
        place by the model when `reads_new_kv` asked for them; attending may read them instead
        of the cache."""
        raise NotImplementedError(f"the {self.name} backend writes K/V inside forward()")

    def reads_new_kv(self, meta: AttentionMetadata, kv_cache: torch.Tensor,
                     dtype: torch.dtype) -> bool:
        """Whether `attend` would read `new_kv` this step (q of `dtype`), so the model should
        leave its rotated keys in place for it."""
        return False
