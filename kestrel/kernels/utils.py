"""Small helpers shared by the Triton kernels: integer math, device queries, dtype checks.

Owns nothing stateful beyond a per-device property cache. Must not import engine code.
"""

from __future__ import annotations

import functools

import torch

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
