"""Gated activations applied to a merged [gate | up] projection.

Owns the activation math only. Must not own weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kestrel.utils.registry import Registry


class SiluAndMul(nn.Module):
    """silu(gate) * up for x = [gate | up] along the last dim."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from kestrel.kernels.activation import silu_and_mul

            return silu_and_mul(x)  # one pass instead of three
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up  # [num_tokens, intermediate_size]


class GeluTanhAndMul(nn.Module):
    """gelu_tanh(gate) * up for x = [gate | up] along the last dim."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up  # [num_tokens, intermediate_size]


# HF `hidden_act` -> gated activation module
ACTIVATIONS: Registry[type[nn.Module]] = Registry("hidden_act")
ACTIVATIONS.register("silu", SiluAndMul)
ACTIVATIONS.register("swish", SiluAndMul)
ACTIVATIONS.register("gelu_pytorch_tanh", GeluTanhAndMul)
