"""What one sampling step needs, decided on the host from the rows' `SamplingParams`.

Owns the per-batch summary the sampler branches on (which stages run, per-row temperatures,
top-k/top-p/min-p values, seeded rows). Must not touch tensors.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from kestrel.sampling_params import SamplingParams

if TYPE_CHECKING:
    from kestrel.runner.sampler import SamplingBatch


def _sampling_key(p: SamplingParams) -> tuple:
    """The fields of `p` the plan reads, cached on the object (params do not change once a
    request is queued). Equal keys across a batch let the plan be built from one row."""
    key = p.__dict__.get("_sampling_key")
    if key is None:
        key = (p.greedy, p.temperature, bool(p.logit_bias), p.min_tokens,
               p.repetition_penalty, p.frequency_penalty, p.presence_penalty, p.logprobs,
               p.top_k, p.top_p, p.min_p, p.seed is None)
        p.__dict__["_sampling_key"] = key
    return key


class SamplingPlan:
    """Host-side summary of which stages the batch needs (one pass over the params, or one
    row broadcast when every row samples the same way: the common offline case)."""

    def __init__(self, batch: SamplingBatch, vocab: int) -> None:
        params, n = batch.params, len(batch.params)
        keys = [_sampling_key(p) for p in params]
        uniform = keys.count(keys[0]) == n
        self._per_row(params[:1] if uniform else params, vocab)
        if uniform and n > 1:
            for name in ("greedy", "temperatures", "fused_temperatures", "top_k", "top_p",
                         "filtered", "min_p"):
                setattr(self, name, getattr(self, name) * n)
            for name in ("bias_rows", "penalty_rows", "logprob_rows"):
                setattr(self, name, list(range(n)) if getattr(self, name) else [])
        self.min_tokens_rows = [
            i
            for i, p in enumerate(params)
            if p.min_tokens and batch.stop_token_ids[i]
            and len(batch.output_token_ids[i]) < p.min_tokens
        ] if params[0].min_tokens or not uniform else []
        num_sampling = n - sum(self.greedy)
        if batch.generators is not None:
            self.seeded_rows = [
                i
                for i, (g, gen) in enumerate(zip(self.greedy, batch.generators, strict=True))
                if not g and gen is not None
            ]
        elif batch.noise_seeds is not None:  # generators are made from the noise seeds
            self.seeded_rows = [
                i for i, (p, g) in enumerate(zip(params, self.greedy, strict=True))
                if not g and p.seed is not None
            ]
        else:
            self.seeded_rows = []
        self.any_unseeded = len(self.seeded_rows) < num_sampling

    def _per_row(self, params: list[SamplingParams], vocab: int) -> None:
        self.greedy = [p.greedy for p in params]
        self.all_greedy = all(self.greedy)
        self.any_greedy = any(self.greedy)
        self.bias_rows = [i for i, p in enumerate(params) if p.logit_bias]
        self.penalty_rows = [
            i
            for i, p in enumerate(params)
            if p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty
        ]
        self.logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        # Greedy rows take the argmax of the penalized logits; the rest of their sampling
        # parameters are neutralized so they never force a stage on the batch.
        sampling = [p for p, g in zip(params, self.greedy, strict=True) if not g]
        self.temperatures = [
            1.0 if g else p.temperature for p, g in zip(params, self.greedy, strict=True)
        ]
        self.any_temperature = any(p.temperature != 1.0 for p in sampling)
        self.fused_temperatures = [0.0 if g else t for g, t in zip(self.greedy, self.temperatures)]
        self.top_k = [
            vocab if g or p.top_k == -1 else min(p.top_k, vocab)
            for p, g in zip(params, self.greedy, strict=True)
        ]
        self.any_top_k = min(self.top_k) < vocab
        # top_p = 1 is sent as +inf so float rounding in the cumulative sum never masks a row.
        self.top_p = [
            math.inf if g or p.top_p >= 1.0 else p.top_p
            for p, g in zip(params, self.greedy, strict=True)
        ]
        self.any_top_p = any(p.top_p < 1.0 for p in sampling)
        self.filtered = [
            k < vocab or p < math.inf for k, p in zip(self.top_k, self.top_p, strict=True)
        ]
        # Sorted candidates needed per row: its k, or the whole vocabulary for top-p alone.
        self.top_k_width = max(
            (k for k, f in zip(self.top_k, self.filtered, strict=True) if f), default=vocab
        )
        self.min_p = [0.0 if g else p.min_p for p, g in zip(params, self.greedy, strict=True)]
        self.any_min_p = any(p.min_p > 0.0 for p in sampling)
        self.needs_sorting = self.any_top_k or self.any_top_p or self.any_min_p
