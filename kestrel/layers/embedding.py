"""Token embedding and the LM head (hidden states -> float32 logits).

Owns the vocabulary-sized parameters and weight tying. Must not sample or post-process logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kestrel.layers.linear import default_weight_loader, linear


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader  # type: ignore[attr-defined]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)  # [num_tokens, hidden_size]


class LMHead(nn.Module):
    """Projects hidden states to vocabulary logits. `tie_to` shares the embedding matrix."""

    def __init__(self, vocab_size: int, hidden_size: int, tie_to: VocabEmbedding | None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.tied = tie_to is not None
        if tie_to is not None:
            self.weight = tie_to.weight
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
            self.weight.weight_loader = default_weight_loader  # type: ignore[attr-defined]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # NOTE: the GEMM runs in the model dtype, as in HF. The logits stay in it: the fused
        # GPU sampler reads them once as they are, and every float32 consumer (sampler stages,
        # logprobs) upcasts itself.
        return linear(hidden, self.weight)  # [num_tokens, vocab_size]
