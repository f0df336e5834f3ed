"""CUDA graphs for decode-only steps: one graph per batch-size bucket, replayed with padding.

Owns the static input buffers, capture (largest bucket first, one shared memory pool) and
replay. A decode step of n requests runs the graph of the smallest bucket >= n; rows past n are
padding: slot -1 (the KV store skips it), context length 1, block 0, outputs ignored. One
kernel fills the static inputs and the padding before each replay.
Mixed prefill/decode steps run eagerly. Must not be used on CPU.
"""

from __future__ import annotations

import logging
import time

import torch

from kestrel.attention.backend import AttentionBackend, AttentionMetadata
from kestrel.kernels.graph_inputs import fill_decode_inputs
from kestrel.runner.forward_context import ForwardContext, set_forward_context
from kestrel.utils.math import cdiv

logger = logging.getLogger("kestrel")


def batch_buckets(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_num_seqs + 1, 16))
    sizes = sorted({s for s in sizes if s <= max_num_seqs} | {max_num_seqs})
    return sizes


class CUDAGraphRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        backend: AttentionBackend,
        kv_caches: list[torch.Tensor],
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.max_model_len = max_model_len
        self.buckets = batch_buckets(max_num_seqs)
        n = self.buckets[-1]
        width = cdiv(max_model_len, block_size)
        i32, i64 = torch.int32, torch.int64
        self.input_ids = torch.zeros(n, dtype=i64, device=device)  # [max_bs]
        self.positions = torch.zeros(n, dtype=i64, device=device)  # [max_bs]
        self.slot_mapping = torch.full((n,), -1, dtype=i64, device=device)  # [max_bs]
        self.seq_lens = torch.ones(n, dtype=i32, device=device)  # [max_bs]
        self.block_table = torch.zeros(n, width, dtype=i32, device=device)  # [max_bs, width]
        self.query_start_loc = torch.arange(n + 1, dtype=i32, device=device)  # [max_bs + 1]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None

    def _metadata(self, bs: int) -> AttentionMetadata:
        # NOTE: host-side sizes are the worst case, so kernels sized from them (grids, KV
        # splits) are valid for every replay of this bucket.
        return AttentionMetadata(
            num_tokens=bs,
            max_query_len=1,
            max_seq_len=self.max_model_len,
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_table=self.block_table[:bs],
            slot_mapping=self.slot_mapping[:bs],
            query_start_loc_cpu=list(range(bs + 1)),
            seq_lens_cpu=[self.max_model_len] * bs,
        )

    def _forward(self, bs: int) -> torch.Tensor:
        ctx = ForwardContext(self._metadata(bs), self.kv_caches, self.backend)
        with set_forward_context(ctx):
            return self.model(self.input_ids[:bs], self.positions[:bs])

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        for bs in reversed(self.buckets):
            self._forward(bs)  # warm-up: compiles and autotunes outside capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[bs] = self._forward(bs)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs (batch %d..%d) in %.2f s", len(self.graphs),
                    self.buckets[0], self.buckets[-1], time.perf_counter() - t0)

    def can_run(self, meta: AttentionMetadata) -> bool:
        return (
            bool(self.graphs)
            and meta.num_tokens == meta.num_reqs  # decode only: one query per request
            and meta.num_reqs <= self.buckets[-1]
            and meta.block_table.shape[1] <= self.block_table.shape[1]
        )

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
        new_ids: tuple[torch.Tensor, int, int, int] | None = None,
    ) -> torch.Tensor:
        """new_ids: see `fill_decode_inputs` (placeholder ids taken from the device)."""
        n = meta.num_reqs
        bs = next(b for b in self.buckets if b >= n)
        fill_decode_inputs(
            (input_ids, positions, meta.slot_mapping, meta.seq_lens, meta.block_table),
            (self.input_ids, self.positions, self.slot_mapping, self.seq_lens, self.block_table),
            bs, new_ids,
        )
        self.graphs[bs].replay()
        return self.outputs[bs][:n]  # [n, hidden]
