"""Pinned host arenas for the small per-step host-to-device copies (indices, temperatures,
noise seeds) and device-to-host copies (sampled ids).

Owns a ring of preallocated pinned buffers, one per step in flight, each handed out by bump
allocation, and a device mirror of each. Must not know what the bytes mean.

NOTE: `tensor.pin_memory()` per copy goes through the caching host allocator, which can fall
back to cudaHostAlloc (slow, and serializing) whenever its cached blocks are still owned by
copies in flight. With async scheduling at most two steps are in flight, so step k writes to
slot k % 3 and a slot is reused only after its step's tokens were read back, i.e. after step
k's kernels finished: the device mirror of the slot is then free to rewrite as well.

Several arrays staged together travel in one copy: between two decode steps the GPU runs
every copy one after another, at ~3 us each (one H100, batch-1 decode), so a step's inputs go
as one copy rather than one per array.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

_ALIGN = 64


def _align(offset: int) -> int:
    return -(-offset // _ALIGN) * _ALIGN


class StepArena:
    def __init__(self, device: torch.device, nbytes: int = 1 << 20, slots: int = 3,
                 staged: bool | None = None) -> None:
        """staged: go through the slots (default: on CUDA; elsewhere tensors are built
        directly, and `staged=True` runs the slot logic on CPU for tests)."""
        self.device = device
        self.enabled = device.type == "cuda" if staged is None else staged
        self._pin = device.type == "cuda"
        self.nbytes = nbytes
        self._slots = [
            torch.empty(nbytes, dtype=torch.uint8, pin_memory=self._pin) for _ in range(slots)
        ] if self.enabled else []
        self._device_slots = [
            torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(slots)
        ] if self.enabled else []
        # NOTE: copies to the device go on a stream of their own, so a step's inputs (staged
        # while the previous step still runs) arrive during that step instead of after it:
        # a copy queued on the compute stream waits its turn there, ~3 us plus ~6 us of
        # switching to the copy engine at each step boundary (one H100, batch-1 decode).
        self._h2d = torch.cuda.Stream(device) if self.enabled and self._pin else None
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
        start = _align(self._offset)
        if start + nbytes > slot.numel():  # larger than the arena: a one-off pinned buffer
            return torch.empty(numel, dtype=dtype, pin_memory=self._pin)
        self._offset = start + nbytes
        return slot[start : start + nbytes].view(dtype)

    def to_device(self, data: list | np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        """Host data -> a device tensor, through this step's pinned slot (no blocking copy)."""
        return self.to_device_many([(data, dtype)])[0]

    def to_device_many(
        self, items: Sequence[tuple[list | np.ndarray, torch.dtype]]
    ) -> list[torch.Tensor]:
        """Several host arrays -> device tensors (same shapes) through one copy.

        The results are views of this slot's device mirror: valid until the slot comes round
        again, i.e. for the kernels of this step.
        """
        arrays = [np.asarray(data, dtype=_numpy_dtype(dtype)) for data, dtype in items]
        if not self.enabled:
            return [torch.from_numpy(a.copy()) for a in arrays]
        index = self._step % len(self._slots)
        start = _align(self._offset)
        offsets, end = [], start
        for a in arrays:
            offsets.append(_align(end))
            end = offsets[-1] + a.nbytes
        if end > self.nbytes:  # larger than the arena: one-off pinned copies
            return [_one_off_copy(a, dtype, self.device, self._pin)
                    for a, (_, dtype) in zip(arrays, items)]
        host = self._slots[index].numpy()
        for a, off in zip(arrays, offsets):
            host[off : off + a.nbytes].view(a.dtype)[:] = a.reshape(-1)
        dev = self._device_slots[index]
        if self._h2d is None:
            dev[start:end].copy_(self._slots[index][start:end], non_blocking=True)
        else:
            # Safe to overwrite: this slot's previous step has finished (see the NOTE above).
            compute = torch.cuda.current_stream(self.device)
            with torch.cuda.stream(self._h2d):
                dev[start:end].copy_(self._slots[index][start:end], non_blocking=True)
            compute.wait_stream(self._h2d)
        self._offset = end
        return [
            dev[off : off + a.nbytes].view(dtype).view(a.shape)
            for a, off, (_, dtype) in zip(arrays, offsets, items)
        ]


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


def _one_off_copy(array: np.ndarray, dtype: torch.dtype, device: torch.device,
                  pin: bool) -> torch.Tensor:
    host = torch.from_numpy(array).to(dtype)
    return (host.pin_memory() if pin else host.clone()).to(device, non_blocking=pin)
