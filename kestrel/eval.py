"""Held-out loss of a Hugging Face causal LM folder on a text file: the reference number for the
bundled default model's card and its tests.

Owns: one deterministic measurement (mean next-token cross-entropy in nats, float32 on CPU,
through transformers' own model). Must not: import kestrel's engine or run on an accelerator,
so the number is the same on any machine that has the same folder and text.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_SEQ_LEN = 512
DEFAULT_MAX_TOKENS = 16384


@torch.no_grad()
def heldout_loss(
    model_dir: str,
    text_path: str,
    seq_len: int = DEFAULT_SEQ_LEN,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> float:
    """Mean next-token cross-entropy (nats) of the model in `model_dir` over `text_path`.

    The text is encoded once with the folder's tokenizer (its special tokens included, so a
    leading BOS is added when the tokenizer adds one). The first `max_tokens + 1` ids are cut
    into non-overlapping windows of `seq_len` inputs; every id after the first is predicted
    exactly once, with the window's preceding ids as context.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if seq_len < 1 or max_tokens < 1:
        raise ValueError(f"seq_len and max_tokens must be >= 1, got {seq_len}, {max_tokens}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with open(text_path, encoding="utf-8") as f:
        ids = tokenizer(f.read(), verbose=False).input_ids
    if len(ids) < 2:
        raise ValueError(f"{text_path} encodes to fewer than 2 tokens")
    ids = torch.tensor(ids[: max_tokens + 1], dtype=torch.int64)
    num_targets = ids.numel() - 1

    model = AutoModelForCausalLM.from_pretrained(model_dir).to("cpu", torch.float32).eval()
    total = torch.zeros((), dtype=torch.float64)
    num_full = num_targets // seq_len
    if num_full:
        inputs = ids[: num_full * seq_len].view(num_full, seq_len)  # [num_full, seq_len]
        targets = ids[1 : num_full * seq_len + 1].view(num_full, seq_len)
        total += _sum_nll(model, inputs, targets)
    rest = num_targets - num_full * seq_len
    if rest:
        start = num_full * seq_len
        inputs = ids[start : start + rest].view(1, rest)  # [1, rest]
        total += _sum_nll(model, inputs, ids[start + 1 : start + rest + 1].view(1, rest))
    return float(total / num_targets)


def _sum_nll(model, inputs: torch.Tensor, targets: torch.Tensor, batch: int = 8) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for i in range(0, inputs.shape[0], batch):
        logits = model(input_ids=inputs[i : i + batch]).logits.float()  # [b, seq, vocab]
        loss = F.cross_entropy(
            logits.flatten(0, 1), targets[i : i + batch].flatten(), reduction="sum"
        )
        total += loss.double()
    return total
