"""RMSNorm, optionally fused with the residual add that precedes it.

Owns the normalization math (float32 statistics, like HF). Must not own residual bookkeeping
beyond the single add it fuses.
"""

from __future__ import annotations

import torch
from torch import nn

from kestrel.layers.linear import default_weight_loader


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader  # type: ignore[attr-defined]

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        # NOTE: cast back before scaling by the weight, matching HF's rounding in bf16/fp16.
        return self.weight * xf.to(dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without `residual`: norm(x). With it: s = x + residual, returns (norm(s), s)."""
        if x.is_cuda:
            from kestrel.kernels.norm import rms_norm

            if x.dim() == 2:
                return rms_norm(x, self.weight, self.eps, residual)  # fused add + norm
            if residual is None:  # per-head norm (q/k norm): rows of the last dim
                return rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
