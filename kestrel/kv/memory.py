"""KV-cache sizing and allocation: bytes per block, blocks for a memory budget, the tensors.

Owns the arithmetic from a memory budget (bytes, or a GPU utilisation fraction after a
profiled forward pass) to a block count. Must not know about requests.
"""

from __future__ import annotations

import torch

# Default budget on CPU when the user gives none: plenty for small models, and capped
# further by what max_num_seqs * max_model_len could ever use.
CPU_DEFAULT_KV_BYTES = 1 << 30


def bytes_per_block(
    num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype
) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * elem


def num_blocks_for(budget_bytes: int, block_bytes: int, max_useful_blocks: int) -> int:
    return max(0, min(budget_bytes // block_bytes, max_useful_blocks))


def gpu_kv_budget(device: torch.device, utilization: float) -> int:
    """Bytes left for KV after the profiled peak: total * utilization - peak in use.

    Call after a forward pass at the largest batch shape, with peak stats reset before it.
    """
    free, total = torch.cuda.mem_get_info(device)
    peak = torch.cuda.max_memory_allocated(device)
    non_torch = total - free - torch.cuda.memory_reserved(device)  # other processes, CUDA ctx
    return int(total * utilization - peak - max(non_torch, 0))


def allocate_kv_caches(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> list[torch.Tensor]:
    # NOTE: zero-filled so a kernel that reads a masked-out slot never meets NaN garbage.
    return [
        torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
        for _ in range(num_layers)
    ]
