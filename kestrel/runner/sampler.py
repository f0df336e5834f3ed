"""Token sampling for one step: logits processing, sampling and logprobs.

Owns: turning a [batch, vocab] float32 logits tensor into one token id per row under that
row's `SamplingParams` (logit bias, min_tokens, repetition / frequency / presence penalties,
temperature, top-k, top-p, min-p, per-request seeded generators) and the logprobs of the raw
distribution. Must not touch requests, the scheduler or the KV cache, and must not read device
values on the host: sampled ids stay on the device and the caller does the one copy back.
The exception is logprobs, which are host lists by contract and cost one extra copy, only in
steps where some row asks for them.

Processing order (each stage is skipped when no row of the batch needs it):

    logit_bias -> mask stop ids below min_tokens -> repetition penalty -> frequency/presence
    -> [greedy rows: argmax] -> / temperature -> top-k -> top-p -> min-p -> exponential race

On CUDA, batches that need no top-k, top-p or min-p (the common case) skip the float32 copy,
the softmax and the noise tensor: one fused Triton kernel takes argmax(logits / T + Gumbel
noise) straight from the model-dtype logits, keyed per row by `SamplingBatch.noise_seeds`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from kestrel.outputs import TokenLogprobs
from kestrel.runner.sampling_plan import SamplingPlan
from kestrel.sampling_params import SamplingParams

_NEG_INF = float("-inf")


@dataclass
class SamplingBatch:
    """Per-row sampling inputs; row i describes row i of the logits given to `Sampler`."""

    params: list[SamplingParams]
    prompt_token_ids: list[list[int]]
    output_token_ids: list[list[int]]
    # Ids that end the sequence; masked while len(output_token_ids[i]) < params[i].min_tokens.
    stop_token_ids: list[list[int]]
    # A row with a generator draws exactly one [vocab] noise vector from it per sample, so its
    # tokens do not depend on the rest of the batch; None = the device's default generator.
    # Left None, seeded rows (params.seed set) get a generator seeded with their noise seed.
    generators: list[torch.Generator | None] | None = None
    # Per-row 63-bit noise keys: derived from (seed, output position) for seeded rows, fresh
    # random ones for the rest. Needed by the fused sampler; None = torch path only.
    noise_seeds: list[int] | None = None

    def __len__(self) -> int:
        return len(self.params)


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [batch] int64, on the logits' device
    # Per row: TokenLogprobs (chosen token, then the top-`params.logprobs` tokens, values from
    # the raw log_softmax) when params.logprobs is set, else None.
    logprobs: list[TokenLogprobs | None]


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator on `device` seeded with `seed` (any Python int; folded to 64 bits)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return generator


class Sampler:
    """Stateless; per-request state (generators, token history) lives in `SamplingBatch`.

    fused: use the Triton Gumbel-max kernel where the batch allows it (CUDA only).
    to_device_many: how the fused path ships its per-row host data, in one copy (the
    runner's pinned arena)."""

    def __init__(
        self, fused: bool = False,
        to_device_many: Callable[..., list[torch.Tensor]] | None = None,
    ) -> None:
        self.fused = fused
        self.to_device_many = to_device_many

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        assert logits.dim() == 2 and logits.shape[0] == len(batch), (logits.shape, len(batch))
        num_rows, vocab = logits.shape
        if num_rows == 0:
            empty = torch.empty(0, dtype=torch.int64, device=logits.device)
            return SamplerOutput(empty, [])
        plan = SamplingPlan(batch, vocab)
        if self.fused and batch.noise_seeds is not None and not plan.needs_sorting:
            sampled = _sample_fused(logits, batch, plan, self.to_device_many)
        else:
            sampled = _sample_torch(logits.float(), batch, plan)
        logprobs: list[TokenLogprobs | None] = [None] * num_rows
        if plan.logprob_rows:  # reported on the unprocessed distribution
            _fill_sample_logprobs(logprobs, logits, sampled, batch, plan.logprob_rows)
        return SamplerOutput(sampled, logprobs)


def _sample_torch(logits: torch.Tensor, batch: SamplingBatch, plan: SamplingPlan) -> torch.Tensor:
    """float32 logits -> [batch] int64 ids through the staged torch path."""
    logits = process_logits(logits, batch, plan)
    if plan.all_greedy:
        return logits.argmax(dim=-1)
    sampled = _sample_random(logits, batch, plan)
    if plan.any_greedy:
        greedy = _to_device(plan.greedy, torch.bool, logits.device)
        sampled = torch.where(greedy, logits.argmax(dim=-1), sampled)
    return sampled


def _sample_fused(
    logits: torch.Tensor,
    batch: SamplingBatch,
    plan: SamplingPlan,
    to_device_many: Callable[..., list[torch.Tensor]] | None,
) -> torch.Tensor:
    """Penalties/bias (if any) in float32, then one Gumbel-max pass over the logits."""
    from kestrel.kernels.sampling import gumbel_sample

    if plan.bias_rows or plan.min_tokens_rows or plan.penalty_rows:
        logits = process_logits(logits.float(), batch, plan)
    assert batch.noise_seeds is not None
    seeds = np.asarray(batch.noise_seeds, dtype=np.int64)
    temps = np.asarray(plan.fused_temperatures, dtype=np.float32)  # 0 = greedy
    if to_device_many is None:
        temps_t = _to_device(temps, torch.float32, logits.device)
        seeds_t = _to_device(seeds, torch.int64, logits.device)
    else:  # one copy for both
        temps_t, seeds_t = to_device_many([(temps, torch.float32), (seeds, torch.int64)])
    return gumbel_sample(logits, temps_t, seeds_t)


def _to_device(data: list | np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host data -> device tensor without a blocking copy (pinned staging on CUDA)."""
    host = torch.from_numpy(data) if isinstance(data, np.ndarray) else torch.tensor(data)
    host = host.to(dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def process_logits(
    logits: torch.Tensor, batch: SamplingBatch, plan: SamplingPlan | None = None
) -> torch.Tensor:
    """Logit bias, min_tokens masking and penalties: the logits greedy rows take the argmax
    of. Returns `logits` itself when no row needs any of them; never edits it in place."""
    plan = plan or SamplingPlan(batch, logits.shape[1])
    logits = _apply_token_rules(logits, batch, plan)
    return _apply_penalties(logits, batch, plan)


def _apply_token_rules(
    logits: torch.Tensor, batch: SamplingBatch, plan: SamplingPlan
) -> torch.Tensor:
    """Logit bias, then -inf on stop ids of rows below min_tokens. Never edits the input."""
    if not plan.bias_rows and not plan.min_tokens_rows:
        return logits
    logits = logits.clone()  # [batch, vocab]
    vocab, device = logits.shape[1], logits.device
    if plan.bias_rows:
        rows, toks, vals = [], [], []
        for i in plan.bias_rows:
            for tok, bias in batch.params[i].logit_bias.items():  # type: ignore[union-attr]
                if tok < vocab:  # ids beyond the vocabulary are rejected by input checks
                    rows.append(i)
                    toks.append(tok)
                    vals.append(float(bias))
        logits.index_put_(
            (_to_device(rows, torch.int64, device), _to_device(toks, torch.int64, device)),
            _to_device(vals, torch.float32, device),
            accumulate=True,
        )
    if plan.min_tokens_rows:
        rows, toks = [], []
        for i in plan.min_tokens_rows:
            ids = [t for t in batch.stop_token_ids[i] if t < vocab]
            rows.extend([i] * len(ids))
            toks.extend(ids)
        index = (_to_device(rows, torch.int64, device), _to_device(toks, torch.int64, device))
        logits.index_put_(index, logits.new_full((), _NEG_INF))
    return logits


def _token_counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(token_lists), vocab] float32: how often each token id occurs in each list."""
    num_rows = len(token_lists)
    counts = torch.zeros(num_rows * vocab, dtype=torch.float32, device=device)
    lengths = [len(t) for t in token_lists]
    total = sum(lengths)
    if total == 0:
        return counts.view(num_rows, vocab)
    # NOTE: numpy reads the lists several times faster than torch.tensor(list) does.
    flat = np.fromiter(chain.from_iterable(token_lists), dtype=np.int64, count=total)
    tokens = _to_device(flat, torch.int64, device)  # [total]
    row_ids = torch.repeat_interleave(
        torch.arange(num_rows, device=device),
        _to_device(lengths, torch.int64, device),
        output_size=total,
    )  # [total]; output_size given so the device never reports a size to the host
    counts.index_add_(0, row_ids * vocab + tokens, torch.ones_like(tokens, dtype=torch.float32))
    return counts.view(num_rows, vocab)


def _apply_penalties(
    logits: torch.Tensor, batch: SamplingBatch, plan: SamplingPlan
) -> torch.Tensor:
    """Repetition (HF/CTRL, prompt + output) then frequency/presence (OpenAI, output only).

    Only the rows with a penalty are gathered and processed; their counts are built on the
    device from the flattened token lists.
    """
    rows = plan.penalty_rows
    if not rows:
        return logits
    num_rows, vocab = logits.shape
    device = logits.device
    params = [batch.params[i] for i in rows]
    full = len(rows) == num_rows
    row_index = None if full else _to_device(rows, torch.int64, device)
    sub = logits if full else logits[row_index]  # [rows, vocab]
    out_counts = _token_counts([batch.output_token_ids[i] for i in rows], vocab, device)
    if any(p.repetition_penalty != 1.0 for p in params):
        prompt_counts = _token_counts([batch.prompt_token_ids[i] for i in rows], vocab, device)
        seen = (prompt_counts > 0) | (out_counts > 0)  # [rows, vocab]
        penalty = _to_device([p.repetition_penalty for p in params], torch.float32, device)
        penalty = penalty.unsqueeze(1)  # [rows, 1]
        penalized = torch.where(sub > 0, sub / penalty, sub * penalty)
        sub = torch.where(seen, penalized, sub)
    if any(p.frequency_penalty or p.presence_penalty for p in params):
        freq = _to_device([p.frequency_penalty for p in params], torch.float32, device)
        pres = _to_device([p.presence_penalty for p in params], torch.float32, device)
        sub = sub - freq.unsqueeze(1) * out_counts - pres.unsqueeze(1) * (out_counts > 0)
    return sub if full else logits.index_copy(0, row_index, sub)


def _apply_top_k_top_p(logits: torch.Tensor, plan: SamplingPlan) -> torch.Tensor:
    """Keep the top-k tokens, then the smallest set of those whose probability (renormalized
    over the top-k) reaches top_p; at least one token always survives.

    Both filters keep a prefix of the tokens sorted by logit, so each row reduces to one
    cutoff logit; tokens tied with the cutoff are kept. Only the first `plan.top_k_width`
    sorted candidates are materialized (a cheap topk when every top-p row also has a top-k).
    """
    device = logits.device
    vocab, width = logits.shape[1], plan.top_k_width
    if width < vocab:
        candidates = logits.topk(width, dim=-1).values  # [batch, width], descending
    else:
        candidates = logits.sort(dim=-1, descending=True).values  # [batch, vocab]
    top_k = _to_device(plan.top_k, torch.int64, device).clamp_(max=width).unsqueeze(1)
    keep = candidates >= candidates.gather(1, top_k - 1)  # [batch, width]
    if plan.any_top_p:
        top_p = _to_device(plan.top_p, torch.float32, device).unsqueeze(1)  # [batch, 1]
        probs = candidates.masked_fill(~keep, _NEG_INF).softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of strictly likelier tokens
        keep &= mass_before < top_p
    num_kept = keep.sum(dim=1, keepdim=True).clamp_(min=1)  # [batch, 1]
    cutoff = candidates.gather(1, num_kept - 1)  # [batch, 1], smallest kept logit
    if width < vocab:  # rows with neither filter were cut to `width` candidates: undo
        filtered = _to_device(plan.filtered, torch.bool, device).unsqueeze(1)
        cutoff = cutoff.masked_fill(~filtered, _NEG_INF)
    return logits.masked_fill(logits < cutoff, _NEG_INF)


def _sample_random(logits: torch.Tensor, batch: SamplingBatch, plan: SamplingPlan) -> torch.Tensor:
    """Temperature, top-k/top-p, min-p, then the exponential race: argmax(p / E) with
    E ~ Exponential(1) i.i.d. picks token i with probability p_i / sum(p), with no host sync
    and no need to normalize p."""
    device = logits.device
    if plan.any_temperature:
        temps = _to_device(plan.temperatures, torch.float32, device)
        logits = logits / temps.unsqueeze(1)  # [batch, vocab]
    if plan.any_top_k or plan.any_top_p:
        logits = _apply_top_k_top_p(logits, plan)
    probs = logits.softmax(dim=-1)  # [batch, vocab]
    if plan.any_min_p:
        min_p = _to_device(plan.min_p, torch.float32, device).unsqueeze(1)  # [batch, 1]
        threshold = min_p * probs.amax(dim=-1, keepdim=True)
        probs = probs.masked_fill(probs < threshold, 0.0)
    noise = torch.empty_like(probs)  # [batch, vocab]
    if plan.any_unseeded:
        noise.exponential_()
    for i in plan.seeded_rows:
        if batch.generators is not None:
            generator = batch.generators[i]
        else:
            assert batch.noise_seeds is not None
            generator = make_generator(batch.noise_seeds[i], device)
        noise[i].exponential_(generator=generator)
    # NOTE: a zero draw would turn a masked token's 0/0 into NaN, which argmax prefers.
    noise.clamp_min_(torch.finfo(torch.float32).tiny)
    return probs.div_(noise).argmax(dim=-1)


def _logprob_table(logprobs: torch.Tensor, chosen: torch.Tensor, num_top: int) -> list[list[float]]:
    """One host copy of [chosen id, chosen logprob, rank, top ids..., top logprobs...] per row.

    `logprobs` is [rows, vocab] log_softmax output and `chosen` [rows] int64. Packed in
    float64, which holds token ids and float32 values exactly.
    """
    chosen = chosen.unsqueeze(1)  # [rows, 1]
    chosen_lp = logprobs.gather(1, chosen)  # [rows, 1]
    rank = (logprobs > chosen_lp).sum(dim=1, keepdim=True) + 1  # [rows, 1]
    parts = [chosen.double(), chosen_lp.double(), rank.double()]
    if num_top > 0:
        top_lp, top_ids = logprobs.topk(num_top, dim=-1)  # [rows, num_top] each
        parts += [top_ids.double(), top_lp.double()]
    return torch.cat(parts, dim=1).tolist()


def _unpack(row: list[float], n: int, num_top: int) -> TokenLogprobs:
    top_ids = row[3 : 3 + n]
    top_lps = row[3 + num_top : 3 + num_top + n]
    return TokenLogprobs(
        token_ids=[int(row[0])] + [int(t) for t in top_ids],
        logprobs=[row[1]] + top_lps,
        rank=int(row[2]),
    )


def _fill_sample_logprobs(
    out: list[TokenLogprobs | None],
    raw: torch.Tensor,
    sampled: torch.Tensor,
    batch: SamplingBatch,
    rows: list[int],
) -> None:
    if len(rows) == raw.shape[0]:
        raw_rows, chosen = raw, sampled
    else:
        index = _to_device(rows, torch.int64, raw.device)
        raw_rows, chosen = raw[index], sampled[index]  # [rows, vocab], [rows]
    counts = [batch.params[i].logprobs or 0 for i in rows]
    num_top = min(max(counts), raw.shape[1])
    table = _logprob_table(torch.log_softmax(raw_rows.float(), dim=-1), chosen, num_top)
    for i, n, row in zip(rows, counts, table, strict=True):
        out[i] = _unpack(row, min(n, num_top), num_top)


def compute_prompt_logprobs(
    logits: torch.Tensor, target_ids: torch.Tensor, num_top: int
) -> list[TokenLogprobs]:
    """Logprobs of `target_ids` [N] under raw `logits` [N, vocab], plus the top `num_top`."""
    assert logits.dim() == 2 and target_ids.shape == (logits.shape[0],)
    if logits.shape[0] == 0:
        return []
    num_top = min(num_top, logits.shape[1])
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [N, vocab]
    table = _logprob_table(logprobs, target_ids.to(logits.device, torch.int64), num_top)
    return [_unpack(row, num_top, num_top) for row in table]
