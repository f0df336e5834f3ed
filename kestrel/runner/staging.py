"""Pinned host arenas for the small per-step host-to-device copies (indices, temperatures,
noise seeds) and device-to-host copies (sampled ids).

Owns a ring of preallocated pinned buffers, one per step in flight, each handed out by bump
allocation. Must not know what the bytes mean.

NOTE: `tensor.pin_memory()` per copy goes through the caching host allocator, which can fall
back to cudaHostAlloc (slow, and serializing) whenever its cached blocks are still owned by
copies in flight. With async scheduling at most two steps are in flight, so step k writes to
slot k % 3 and a slot is reused only after its step's tokens were read back.
"""

from __future__ import annotations

import numpy as np
import torch

_ALIGN = 64


class StepArena:
    def __init__(self, device: torch.device, nbytes: int = 1 << 20, slots: int = 3) -> None:
        self.device = device
        self.enabled = device.type == "cuda"
        self._slots = [
            torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(slots)
        ] if self.enabled else []
        self._step = 0
        self._offset = 0

    def begin_step(self) -> None:
        self._step += 1
        self._offset = 0

    def host(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A pinned [numel] host buffer valid until this slot comes round again."""
        if not self.enabled:
            return torch.empty(numel, dtype=dtype)
        nbytes = numel * dtype.itemsize
        slot = self._slots[self._step % len(self._slots)]
        start = -(-self._offset // _ALIGN) * _ALIGN
        if start + nbytes > slot.numel():  # larger than the arena: a one-off pinned buffer
            return torch.empty(numel, dtype=dtype, pin_memory=True)
        self._offset = start + nbytes
        return slot[start : start + nbytes].view(dtype)

    def to_device(self, data: list | np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        """Host data -> a device tensor, through this step's pinned slot (no blocking copy)."""
        array = np.asarray(data)
        if not self.enabled:
            return torch.from_numpy(array).to(dtype)
        buf = self.host(array.size, dtype)
        buf.numpy()[:] = array.reshape(-1)
        return buf.to(self.device, non_blocking=True)
