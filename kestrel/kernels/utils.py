"""Small helpers shared by the Triton kernels: integer math, device queries, dtype checks.

Owns nothing stateful beyond per-device property caches, and the programmatic-dependent-launch
switch every kernel shares. Must not import engine code.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Dtypes the kernels accept for activations and KV. bf16 is GPU-only in practice: the Triton
# interpreter used for CPU tests cannot multiply bf16 tiles.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def is_interpreter(device: torch.device) -> bool:
    """True when kernels run under the Triton CPU interpreter (tensors on the host)."""
    return device.type == "cpu"


@functools.lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on `device`; a nominal 132 (one H100) for the interpreter."""
    if device.type != "cuda":
        return 132
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def is_hopper(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] == 9


def check_dtype(name: str, t: torch.Tensor) -> None:
    assert t.dtype in FLOAT_DTYPES, f"{name}: unsupported dtype {t.dtype}"


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    assert t.stride(-1) == 1, f"{name}: last dim must be contiguous, strides {t.stride()}"


def check_x_weight(x: torch.Tensor, weight: torch.Tensor, k: int) -> None:
    """x [m, k] and weight [n, k] of a linear kernel: same float dtype, rows contiguous."""
    assert weight.dim() == 2 and weight.shape[1] == k, (
        f"x {tuple(x.shape)} weight {tuple(weight.shape)}"
    )
    assert x.dtype == weight.dtype, f"x {x.dtype} vs weight {weight.dtype}"
    check_dtype("x", x)
    check_last_dim_contiguous("x", x)
    check_last_dim_contiguous("weight", weight)


@functools.lru_cache(maxsize=8)
def _pdl_ok(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9 and os.environ.get("KESTREL_PDL") != "0"


def pdl_options(device: torch.device) -> dict[str, bool]:
    """Launch options for a kernel that begins with `pdl_wait(USE_PDL)`: on Hopper and later
    it is launched with programmatic dependent launch, so its programs are scheduled while the
    previous kernel drains instead of after it (at batch-1 decode, ~230 kernel boundaries per
    token). KESTREL_PDL=0 turns it off. Empty (plain launch) elsewhere and in the interpreter."""
    if device.type != "cuda":
        return {}
    index = device.index if device.index is not None else torch.cuda.current_device()
    return {"launch_pdl": True} if _pdl_ok(index) else {}


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    """First statement of a kernel launched with `pdl_options`: wait until the previous
    kernel's writes are visible (it may still be running when this one starts), then let the
    next kernel's programs be scheduled. Every memory access must come after it."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
