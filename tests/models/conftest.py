"""Fixtures for model tests: a paged-KV driver for kestrel models.

`paged_runner(model, hf_config)` returns a `PagedRunner`, which plays the model runner's part:
it owns per-layer KV caches, hands out shuffled block ids, builds `AttentionMetadata` and runs
one varlen forward per `step` with the reference attention backend. (`tiny_model`, the session
cache of tiny random checkpoints, lives in tests/conftest.py.)"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from kestrel.attention.backend import AttentionMetadata
from kestrel.attention.reference import ReferenceAttentionBackend
from kestrel.models.loader import kv_cache_shape_info
from kestrel.runner.forward_context import ForwardContext, set_forward_context


class PagedRunner:
    """Runs a kestrel model over a paged KV cache, one request dict per step."""

    def __init__(
        self,
        model: torch.nn.Module,
        hf_config: Any,
        *,
        block_size: int = 4,
        num_blocks: int = 64,
        seed: int = 0,
    ) -> None:
        num_layers, num_kv_heads, head_dim = kv_cache_shape_info(hf_config)
        weight = next(model.parameters())
        self.device = weight.device
        shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
        self.kv_caches = [
            torch.zeros(shape, dtype=weight.dtype, device=self.device) for _ in range(num_layers)
        ]
        self.model = model
        self.block_size = block_size
        # Shuffled so that a request's blocks are neither contiguous nor ordered.
        gen = torch.Generator().manual_seed(seed)
        self.free_blocks = torch.randperm(num_blocks, generator=gen).tolist()
        self.block_tables: dict[str, list[int]] = {}
        self.num_computed: dict[str, int] = {}

    @torch.inference_mode()
    def step(self, chunks: dict[str, list[int]]) -> dict[str, torch.Tensor]:
        """Append each request's new tokens and return their logits [len(chunk), vocab]."""
        ids, positions, slots, starts, seq_lens = [], [], [], [0], []
        for req, tokens in chunks.items():
            start = self.num_computed.get(req, 0)
            end = start + len(tokens)
            table = self.block_tables.setdefault(req, [])
            while len(table) * self.block_size < end:
                table.append(self.free_blocks.pop())
            ids += tokens
            positions += range(start, end)
            slots += [
                table[p // self.block_size] * self.block_size + p % self.block_size
                for p in range(start, end)
            ]
            starts.append(starts[-1] + len(tokens))
            seq_lens.append(end)
            self.num_computed[req] = end
        width = max(len(self.block_tables[r]) for r in chunks)
        tables = [self.block_tables[r] + [0] * (width - len(self.block_tables[r])) for r in chunks]
        meta = AttentionMetadata(
            num_tokens=len(ids),
            max_query_len=max(len(t) for t in chunks.values()),
            max_seq_len=max(seq_lens),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=self.device),
            block_table=torch.tensor(tables, dtype=torch.int32, device=self.device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=self.device),
            query_start_loc_cpu=starts,
            seq_lens_cpu=seq_lens,
        )
        ctx = ForwardContext(meta, self.kv_caches, ReferenceAttentionBackend())
        with set_forward_context(ctx):
            hidden = self.model(
                torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device)
            )
        logits = self.model.compute_logits(hidden)
        return {req: logits[starts[i] : starts[i + 1]] for i, req in enumerate(chunks)}


@pytest.fixture
def paged_runner() -> Callable[..., PagedRunner]:
    return PagedRunner
