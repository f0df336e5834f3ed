"""Rotary position embeddings (RoPE): HF config parsing, inverse frequencies, cos/sin cache.

Owns the rope variants kestrel serves ("default", "linear", "llama3") and their exact float32
math, written to match transformers bit for bit in float32. Must not know about attention or
KV caches.

HF rotation convention ("rotate half"): a head vector x = [x1 | x2] (halves of head_dim) becomes
[x1 * cos - x2 * sin | x2 * cos + x1 * sin], with angle = position * inv_freq[i].
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """Normalized rope settings {"rope_type", "rope_theta", ...scaling keys} from an HF config.

    Accepts both conventions: transformers >= 5 `rope_parameters` (theta inside the dict) and
    the older `rope_theta` attribute plus optional `rope_scaling` dict (whose type key may be
    spelled "type").
    """
    params = getattr(hf_config, "rope_parameters", None)
    if not params:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
    params = dict(params)
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"per-layer rope parameters are not supported: {params}")
    if "rope_type" not in params:
        params["rope_type"] = params.pop("type", "default")
    params.pop("type", None)
    if params.get("rope_theta") is None:
        params["rope_theta"] = getattr(hf_config, "rope_theta", None) or 10000.0
    return params


def check_rope_parameters(params: dict[str, Any]) -> None:
    """Raise ValueError naming the problem if kestrel cannot serve these rope settings."""
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope_type {rope_type!r}; supported: {list(SUPPORTED_ROPE_TYPES)}"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1.0 is not supported")
    needed = {"linear": ("factor",), "llama3": _LLAMA3_KEYS}.get(rope_type, ())
    missing = [key for key in needed if key not in params]
    if missing:
        raise ValueError(f"rope_type {rope_type!r} needs {missing} in the rope parameters")


def compute_inv_freq(params: dict[str, Any], head_dim: int) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in float32 on the CPU."""
    check_rope_parameters(params)
    base = float(params["rope_theta"])
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (base**exponents)  # [head_dim // 2]
    rope_type = params["rope_type"]
    if rope_type == "linear":
        inv_freq = inv_freq / float(params["factor"])
    elif rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, params)
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1 frequency-dependent scaling: short wavelengths (high frequency) are kept, long
    # wavelengths are divided by `factor`, and the band in between is interpolated smoothly.
    factor = float(params["factor"])
    low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    old_len = float(params["original_max_position_embeddings"])
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q and k given each token's absolute position.

    Holds a float32 cos/sin table for positions [0, max_position); one instance is shared by
    all layers of a model.
    """

    def __init__(self, head_dim: int, max_position: int, params: dict[str, Any]) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        inv_freq = compute_inv_freq(params, head_dim)  # [head_dim // 2]
        positions = torch.arange(max_position, dtype=torch.float32, device="cpu")
        freqs = positions[:, None] * inv_freq[None, :]  # [max_position, head_dim // 2]
        cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)  # [max_position, head_dim]
        # Built on the CPU for device-independent values, then moved to the construction device.
        self.register_buffer(
            "cos_sin_cache", cache.to(torch.get_default_device()), persistent=False
        )

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [num_tokens]; q [num_tokens, num_heads, head_dim]; k likewise (kv heads)."""
        if q.is_cuda:
            from kestrel.kernels.rotary import apply_rotary

            apply_rotary(q, k, positions, self.cos_sin_cache)  # in place, fp32 math
            return q, k
        cos, sin = self.cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)  # [T, 1, D/2] each
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)  # [num_tokens, num_heads, head_dim // 2] each
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)
