"""Per-forward state that attention layers read without threading it through every module.

Set by the runner around one forward pass; read only inside `kestrel.layers` and
`kestrel.attention`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from kestrel.attention.backend import AttentionBackend, AttentionMetadata


@dataclass
class ForwardContext:
    attn_metadata: AttentionMetadata
    kv_caches: list[torch.Tensor]  # per layer: [2, num_blocks, block_size, num_kv_heads, head_dim]
    backend: AttentionBackend


_CURRENT: ForwardContext | None = None


@contextmanager
def set_forward_context(ctx: ForwardContext) -> Iterator[None]:
    global _CURRENT
    assert _CURRENT is None, "forward contexts must not nest"
    _CURRENT = ctx
    try:
        yield
    finally:
        _CURRENT = None


def get_forward_context() -> ForwardContext:
    assert _CURRENT is not None, "attention layers must run inside set_forward_context()"
    return _CURRENT
