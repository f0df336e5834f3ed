from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kestrel.kernels.sampling import gumbel_sample


def test_greedy_rows_take_the_argmax_with_smallest_id_on_ties(device):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3000, generator=gen)
    logits[2, 7] = logits[2, 2900] = 50.0  # tie across chunks: the smaller id wins
    logits[3, 1] = logits[3, 2] = 50.0  # tie inside a block
    logits[4, :] = float("-inf")
    logits[4, 2999] = 0.0  # the only unmasked token, in the last partial block
    out = gumbel_sample(logits.to(device), torch.zeros(5, device=device),
                        torch.arange(5, device=device))
    expect = logits.argmax(dim=1)
    assert out.dtype == torch.int64 and out.tolist() == expect.tolist()
    assert out[2] == 7 and out[3] == 1 and out[4] == 2999


def _mix32_np(x: np.ndarray) -> np.ndarray:
    m = np.uint64(0xFFFFFFFF)
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x7FEB352D)) & m
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & m
    return x ^ (x >> np.uint64(16))


def _hash_uniform_np(seed: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """NumPy twin of the kernel's noise: uniform in (0, 1) from (64-bit seed, token id)."""
    m = np.uint64(0xFFFFFFFF)
    seed = seed.astype(np.uint64)
    lo, hi = seed & m, (seed >> np.uint64(32)) & m
    key = _mix32_np((_mix32_np(lo) + hi) & m)
    x = _mix32_np((idx.astype(np.uint64) * np.uint64(0x9E3779B1) + key) & m)
    return ((x >> np.uint64(9)).astype(np.float64) + 0.5) / 2.0**23


def _reference_sample(logits: np.ndarray, temps: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """argmax(logits / T + Gumbel) with the kernel's noise, in float64 (T = 0: argmax)."""
    idx = np.arange(logits.shape[1])[None, :]
    u = _hash_uniform_np(seeds[:, None], idx)
    noisy = temps > 0
    scaled = logits / np.where(noisy, temps, 1.0)[:, None]
    scores = np.where(noisy[:, None], scaled - np.log(-np.log(u)), logits)
    return scores.argmax(axis=1)


def test_kernel_draws_match_the_reference_formula(device):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 700, generator=gen)
    temps = torch.tensor([0.3, 0.7, 1.0, 1.5, 0.0, 1.0])
    seeds = torch.tensor([1, 2**40 + 7, 99, 2**62 + 3, 5, 123456789])
    out = gumbel_sample(logits.to(device), temps.to(device), seeds.to(device)).cpu()
    ref = _reference_sample(logits.double().numpy(), temps.double().numpy(), seeds.numpy())
    assert out.tolist() == ref.tolist()


def test_noise_formula_draws_from_softmax_over_temperature():
    """Chi-square goodness of fit of the kernel's noise formula over 200k draws."""
    logits = np.array([0.0, 1.0, 2.0, -1.0, -np.inf])
    temp, rows = 0.7, 200_000
    seeds = np.arange(rows, dtype=np.uint64) * np.uint64(7919) + np.uint64(3)
    out = _reference_sample(np.tile(logits, (rows, 1)), np.full(rows, temp), seeds)
    counts = np.bincount(out, minlength=5)
    assert counts[4] == 0  # masked tokens are never drawn
    p = np.exp(logits[:4] / temp) / np.exp(logits[:4] / temp).sum()
    expected = rows * p
    chi2 = float(((counts[:4] - expected) ** 2 / expected).sum())
    assert chi2 < 16.3, (counts.tolist(), expected.tolist())  # p = 0.001 for 3 dof
    # temperature sharpens or flattens: P(token 0) for two tokens one logit apart
    for t in (0.25, 2.0):
        draws = _reference_sample(np.tile([1.0, 0.0], (rows, 1)), np.full(rows, t), seeds)
        p0 = 1 / (1 + math.exp(-1 / t))
        assert abs((draws == 0).mean() - p0) < 4 * math.sqrt(p0 * (1 - p0) / rows)


def test_draws_depend_on_seed_not_batch(device):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 2000, generator=gen).to(device)
    temps = torch.ones(6, device=device)
    seeds = torch.tensor([11, 12, 13, 14, 15, 16], device=device)
    full = gumbel_sample(logits, temps, seeds)
    again = gumbel_sample(logits, temps, seeds)
    alone = torch.cat([gumbel_sample(logits[i : i + 1], temps[:1], seeds[i : i + 1])
                       for i in range(6)])
    assert full.tolist() == again.tolist() == alone.tolist()
    # different seeds give different draws on a flat distribution
    flat = torch.zeros(32, 500, device=device)
    draws = gumbel_sample(flat, torch.ones(32, device=device), torch.arange(32, device=device))
    assert len(set(draws.tolist())) > 25


@pytest.mark.gpu
def test_rows_draw_from_softmax_over_temperature_on_gpu(device):
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, float("-inf")])
    temp, rows = 0.7, 200_000
    out = gumbel_sample(
        logits.expand(rows, 5).contiguous().to(device),
        torch.full((rows,), temp, device=device),
        torch.arange(rows, device=device) * 7919 + 3,
    ).cpu()
    counts = torch.bincount(out, minlength=5).double()
    assert counts[4] == 0
    expected = rows * torch.softmax(logits / temp, dim=0).double()[:4]
    chi2 = ((counts[:4] - expected) ** 2 / expected).sum().item()
    assert chi2 < 16.3, (counts.tolist(), expected.tolist())


@pytest.mark.gpu
def test_sampling_bf16_qwen_vocab(device):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(256, 151936, generator=gen).to(device=device, dtype=torch.bfloat16)
    temps = torch.zeros(256, device=device)
    out = gumbel_sample(logits, temps, torch.arange(256, device=device))
    assert out.tolist() == logits.float().argmax(dim=1).tolist()


def _batch(params, outputs=None, seeds=None):
    from kestrel.runner.sampler import SamplingBatch

    n = len(params)
    return SamplingBatch(params=params, prompt_token_ids=[[5, 6]] * n,
                         output_token_ids=outputs or [[]] * n, stop_token_ids=[[1]] * n,
                         noise_seeds=seeds if seeds is not None else list(range(100, 100 + n)))


def test_fused_sampler_matches_torch_path_on_greedy_and_processed_rows(device):
    """Greedy rows (with bias, penalties, min_tokens) pick the same ids on both paths, and a
    batch with top-p falls back to the torch path."""
    from kestrel.runner.sampler import Sampler
    from kestrel.sampling_params import SamplingParams

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 300, generator=gen).to(device)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, logit_bias={7: 30.0}),
        SamplingParams(temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.5),
        SamplingParams(temperature=0.0, min_tokens=4),
    ]
    outputs = [[3, 3], [9], [int(logits[2].argmax())] * 3, []]
    logits[3, 1] = 100.0  # a stop id masked by min_tokens
    fused = Sampler(fused=True)(logits, _batch(params, outputs)).sampled_token_ids
    ref = Sampler()(logits, _batch(params, outputs)).sampled_token_ids
    assert fused.tolist() == ref.tolist()
    assert fused[1] == 7 and fused[3] != 1


def test_fused_sampler_seeded_rows_ignore_their_batch(device):
    from kestrel.runner.sampler import Sampler
    from kestrel.sampling_params import SamplingParams

    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 500, generator=gen).to(device)
    params = [SamplingParams(temperature=1.0, seed=i) for i in range(5)]
    sampler = Sampler(fused=True)
    seeds = [11, 22, 33, 44, 55]
    full = sampler(logits, _batch(params, seeds=seeds)).sampled_token_ids.tolist()
    solo = [sampler(logits[i : i + 1], _batch(params[i : i + 1], seeds=seeds[i : i + 1]))
            .sampled_token_ids.item() for i in range(5)]
    assert full == solo
    # logprobs come from the raw distribution, for the sampled id
    lp_params = [SamplingParams(temperature=1.0, logprobs=2)]
    out = sampler(logits[:1], _batch(lp_params, seeds=[11]))
    entry = out.logprobs[0]
    assert entry is not None and entry.token_ids[0] == out.sampled_token_ids.item()
    expect = torch.log_softmax(logits[0].double(), dim=0)[entry.token_ids[0]].item()
    assert abs(entry.logprobs[0] - expect) < 1e-5


def test_noise_is_uniform_and_rows_are_independent():
    """The noise of seeds one apart (a seeded request's consecutive positions) or 2^32 apart
    (the high word alone) is uncorrelated, and each row's draws are uniform (KS distance)."""
    n = 151_936
    idx = np.arange(n)
    base = np.uint64(12345 * 1_000_003)
    rows = [_hash_uniform_np(np.array([s], dtype=np.uint64), idx)
            for s in (base, base + np.uint64(1), base + np.uint64(2**32))]  # fmt: skip
    for a in range(3):
        u = np.sort(rows[a])
        ks = np.abs(u - (np.arange(1, n + 1) - 0.5) / n).max()
        assert ks < 1.95 / math.sqrt(n), ks  # p = 0.001
        for b in range(a):
            corr = np.corrcoef(rows[a], rows[b])[0, 1]
            assert abs(corr) < 4 / math.sqrt(n), (a, b, corr)
