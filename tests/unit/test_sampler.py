"""Sampler: greedy, seeded generators, top-k/top-p/min-p masks, penalties, logit bias,
min_tokens, the sampled distribution and logprobs. Tiny vocabularies, CPU."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from kestrel.runner.sampler import (
    Sampler,
    SamplingBatch,
    compute_prompt_logprobs,
    make_generator,
    process_logits,
)
from kestrel.sampling_params import SamplingParams


def make_batch(
    params: list[SamplingParams],
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
    stops: list[list[int]] | None = None,
    generators: list[torch.Generator | None] | None = None,
) -> SamplingBatch:
    n = len(params)
    return SamplingBatch(
        params=params,
        prompt_token_ids=prompts or [[] for _ in range(n)],
        output_token_ids=outputs or [[] for _ in range(n)],
        stop_token_ids=stops or [[] for _ in range(n)],
        generators=generators or [None] * n,
    )


def sample(logits: torch.Tensor, params: list[SamplingParams], **kw) -> list[int]:
    return Sampler()(logits, make_batch(params, **kw)).sampled_token_ids.tolist()


def support(logits_row: list[float], params: SamplingParams, draws: int = 3000) -> set[int]:
    """Token ids sampled at least once in `draws` independent rows of the same logits."""
    torch.manual_seed(1234)
    logits = torch.tensor([logits_row]).repeat(draws, 1)
    return set(sample(logits, [params] * draws))


def logits_of(probs: list[float]) -> list[float]:
    return [math.log(p) for p in probs]


def test_greedy_is_argmax_also_in_a_mixed_batch():
    torch.manual_seed(0)
    logits = torch.randn(8, 50)
    greedy = SamplingParams(temperature=0.0, top_k=3, top_p=0.2)  # ignored when greedy
    assert sample(logits, [greedy] * 8) == logits.argmax(-1).tolist()
    mixed = [greedy if i % 2 == 0 else SamplingParams(temperature=1.5, top_p=0.9) for i in range(8)]
    out = sample(logits, mixed)
    assert out[0::2] == logits[0::2].argmax(-1).tolist()


def test_empty_batch():
    out = Sampler()(torch.empty(0, 7), make_batch([]))
    assert out.sampled_token_ids.shape == (0,) and out.logprobs == []


def test_input_logits_are_not_modified():
    torch.manual_seed(0)
    logits = torch.randn(3, 20)
    before = logits.clone()
    params = [
        SamplingParams(logit_bias={1: 5.0}, repetition_penalty=1.5, top_k=4),
        SamplingParams(frequency_penalty=1.0, top_p=0.5, min_p=0.2, temperature=0.3),
        SamplingParams(min_tokens=3, temperature=0.0),
    ]
    sample(logits, params, outputs=[[1, 2], [3, 3], []], stops=[[], [], [5]])
    assert torch.equal(logits, before)


def _seeded_run(seed: int, logits_row: torch.Tensor, others: int, steps: int = 12) -> list[int]:
    """Sample `steps` tokens for one seeded request placed in the middle of a batch with
    `others` unrelated rows (different params, some seeded with other seeds)."""
    generator = make_generator(seed, "cpu")
    target = SamplingParams(temperature=0.9, seed=seed)
    out = []
    for step in range(steps):
        torch.manual_seed(100 + step)  # the default generator moves differently per call
        other_params = [
            SamplingParams(temperature=0.5 + 0.1 * j, top_k=3 + j, seed=j if j % 2 else None)
            for j in range(others)
        ]
        other_gens = [make_generator(1000 + j, "cpu") if j % 2 else None for j in range(others)]
        rows = others // 2
        params = other_params[:rows] + [target] + other_params[rows:]
        gens = other_gens[:rows] + [generator] + other_gens[rows:]
        logits = torch.randn(others + 1, logits_row.numel())
        logits[rows] = logits_row
        out.append(sample(logits, params, generators=gens)[rows])
    return out


def test_seeded_request_is_independent_of_its_batch():
    torch.manual_seed(0)
    row = torch.randn(64) * 0.3  # flat enough that samples vary
    alone = _seeded_run(7, row, others=0)
    assert alone == _seeded_run(7, row, others=5)
    assert alone == _seeded_run(7, row, others=2)
    assert len(set(alone)) > 1
    assert alone != _seeded_run(8, row, others=0)


def test_same_seed_same_draws_in_one_batch():
    torch.manual_seed(0)
    logits = (torch.randn(1, 100) * 0.2).repeat(4, 1)
    params = [SamplingParams(seed=s) for s in (3, 3, 4, 4)]
    gens = [make_generator(s, "cpu") for s in (3, 3, 4, 4)]
    runs = [sample(logits, params, generators=gens) for _ in range(6)]
    assert all(r[0] == r[1] and r[2] == r[3] for r in runs)
    assert [r[0] for r in runs] != [r[2] for r in runs]


def test_top_k_support():
    row = [3.0, 2.5, 2.0, 1.0, 0.5, 0.0]
    assert support(row, SamplingParams(top_k=3)) == {0, 1, 2}
    assert support(row, SamplingParams(top_k=1)) == {0}
    assert support(row, SamplingParams(top_k=100)) == set(range(6))


def test_top_k_keeps_ties_with_the_kth_logit():
    assert support([2.0, 1.0, 1.0, 0.0], SamplingParams(top_k=2)) == {0, 1, 2}


def test_rows_without_filters_keep_every_token_next_to_filtered_rows():
    torch.manual_seed(3)
    row = logits_of([0.4, 0.3, 0.2, 0.06, 0.04])
    params = [SamplingParams(top_k=2), SamplingParams(), SamplingParams(top_k=3, top_p=0.5)]
    out = sample(torch.tensor([row]).repeat(3 * 2000, 1), params * 2000)
    assert set(out[0::3]) == {0, 1}
    assert set(out[1::3]) == set(range(5))
    assert set(out[2::3]) == {0, 1}


def test_top_p_support():
    row = logits_of([0.4, 0.3, 0.2, 0.06, 0.04])
    assert support(row, SamplingParams(top_p=0.65)) == {0, 1}
    assert support(row, SamplingParams(top_p=0.75)) == {0, 1, 2}
    assert support(row, SamplingParams(top_p=0.95)) == {0, 1, 2, 3}
    assert support(row, SamplingParams(top_p=0.01)) == {0}
    assert support(row, SamplingParams(top_p=1.0)) == set(range(5))


def test_top_p_applies_to_the_top_k_renormalized_distribution():
    row = logits_of([0.4, 0.3, 0.2, 0.06, 0.04])
    # After top-k=3: [0.444, 0.333, 0.222]; 0.444 < 0.5 <= 0.777 keeps two tokens.
    assert support(row, SamplingParams(top_k=3, top_p=0.5)) == {0, 1}
    assert support(row, SamplingParams(top_k=2, top_p=0.9)) == {0, 1}


def test_min_p_support():
    row = logits_of([0.5, 0.2, 0.15, 0.1, 0.05])
    assert support(row, SamplingParams(min_p=0.25)) == {0, 1, 2}  # keep p >= 0.125
    assert support(row, SamplingParams(min_p=0.15)) == {0, 1, 2, 3}  # keep p >= 0.075
    assert support(row, SamplingParams(min_p=1.0)) == {0}


def test_filters_in_a_mixed_batch_apply_per_row():
    torch.manual_seed(5)
    row = logits_of([0.4, 0.3, 0.2, 0.06, 0.04])
    params = [SamplingParams(top_k=1), SamplingParams(), SamplingParams(top_p=0.65)]
    logits = torch.tensor([row]).repeat(3 * 2000, 1)
    out = sample(logits, params * 2000)
    assert set(out[0::3]) == {0}
    assert set(out[1::3]) == set(range(5))
    assert set(out[2::3]) == {0, 1}


def reference_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Straightforward per-row, per-token penalties, as documented by HF and OpenAI."""
    out = logits.clone()
    for i, p in enumerate(batch.params):
        seen = set(batch.prompt_token_ids[i]) | set(batch.output_token_ids[i])
        for tok in seen:
            value = out[i, tok].item()
            if value > 0:
                out[i, tok] = value / p.repetition_penalty
            else:
                out[i, tok] = value * p.repetition_penalty
        for tok, count in Counter(batch.output_token_ids[i]).items():
            out[i, tok] -= p.frequency_penalty * count + p.presence_penalty
    return out


@pytest.mark.parametrize("all_rows", [True, False])
def test_penalties_match_reference(all_rows: bool):
    torch.manual_seed(0)
    vocab = 12
    params = [
        SamplingParams(repetition_penalty=1.7),
        SamplingParams(frequency_penalty=0.8, presence_penalty=-0.3),
        SamplingParams(repetition_penalty=0.6, frequency_penalty=-1.2, presence_penalty=1.5),
        SamplingParams(repetition_penalty=1.2) if all_rows else SamplingParams(),
        SamplingParams(presence_penalty=2.0),
    ]
    prompts = [[1, 2, 2, 3], [4, 5], [0, 11], [6, 6, 6], []]
    outputs = [[3, 7, 7], [5, 5, 5, 8, 0], [11, 11, 2], [9], [10, 10, 1]]
    batch = make_batch(params, prompts=prompts, outputs=outputs)
    logits = torch.randn(len(params), vocab) * 3
    got = process_logits(logits, batch)
    torch.testing.assert_close(got, reference_penalties(logits, batch), rtol=1e-6, atol=1e-6)
    if not all_rows:
        assert torch.equal(got[3], logits[3])


def test_penalties_change_the_greedy_choice():
    logits = torch.tensor([[2.0, 1.9, 0.0, -1.0]])
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.2)]
    assert sample(logits, params, outputs=[[0]]) == [1]
    params = [SamplingParams(temperature=0.0, presence_penalty=0.2)]
    assert sample(logits, params, outputs=[[0]]) == [1]
    assert sample(logits, params, outputs=[[1]]) == [0]


def test_no_processing_returns_the_same_tensor():
    logits = torch.randn(2, 9)
    assert process_logits(logits, make_batch([SamplingParams(), SamplingParams()])) is logits


def test_logit_bias():
    torch.manual_seed(0)
    logits = torch.randn(2, 6)
    params = [SamplingParams(logit_bias={3: 10.0, 0: -2.5}), SamplingParams()]
    got = process_logits(logits, make_batch(params))
    expected = logits.clone()
    expected[0, 3] += 10.0
    expected[0, 0] -= 2.5
    assert torch.equal(got, expected)
    flat = torch.zeros(1, 6)
    assert sample(flat, [SamplingParams(temperature=0.0, logit_bias={4: 1.0})]) == [4]
    banned = SamplingParams(logit_bias={0: -100.0}, seed=1)
    peaked = torch.tensor([[5.0, 0.0, 0.0, 0.0, 0.0, 0.0]]).repeat(500, 1)
    assert 0 not in sample(peaked, [banned] * 500)


def test_min_tokens_masks_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 1.0, 5.0, 4.0], [0.0, 1.0, 5.0, 4.0]])
    greedy = SamplingParams(temperature=0.0, min_tokens=2)
    # Row 0 has one output token (< 2): stop ids 2 and 3 are masked.
    out = sample(logits, [greedy, greedy], outputs=[[1], [1, 1]], stops=[[2, 3], [2, 3]])
    assert out == [1, 2]
    batch = make_batch([greedy, greedy], outputs=[[1], [1, 1]], stops=[[2, 3], [2, 3]])
    processed = process_logits(logits, batch)
    assert processed[0, 2] == -math.inf and processed[0, 3] == -math.inf
    assert torch.equal(processed[1], logits[1])


def test_temperature_distribution():
    torch.manual_seed(0)
    row = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0])
    draws = 20_000
    for temperature in (0.7, 1.0, 2.0):
        params = [SamplingParams(temperature=temperature)] * draws
        out = torch.tensor(sample(row.repeat(draws, 1), params))
        freq = torch.bincount(out, minlength=5).float() / draws
        expected = torch.softmax(row / temperature, dim=-1)
        assert (freq - expected).abs().max().item() < 0.015, (temperature, freq, expected)


def test_seeded_rows_follow_the_distribution():
    torch.manual_seed(0)
    row = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0])
    draws = 4000
    params = [SamplingParams(temperature=0.8, seed=s) for s in range(draws)]
    gens = [make_generator(s, "cpu") for s in range(draws)]
    out = torch.tensor(sample(row.repeat(draws, 1), params, generators=gens))
    freq = torch.bincount(out, minlength=5).float() / draws
    expected = torch.softmax(row / 0.8, dim=-1)
    assert (freq - expected).abs().max().item() < 0.03


def test_sample_logprobs_are_raw_with_ranks():
    torch.manual_seed(0)
    vocab = 30
    logits = torch.randn(4, vocab) * 2
    params = [
        SamplingParams(temperature=3.0, logprobs=5, repetition_penalty=2.0, logit_bias={0: 50}),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, logprobs=0),
        SamplingParams(temperature=0.0, logprobs=2, presence_penalty=2.0),
    ]
    out = Sampler()(logits, make_batch(params, outputs=[[1, 2], [], [], [3]]))
    sampled = out.sampled_token_ids.tolist()
    raw = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[1] is None
    for i in (0, 2, 3):
        entry = out.logprobs[i]
        assert entry is not None
        n = params[i].logprobs
        assert len(entry.token_ids) == len(entry.logprobs) == n + 1
        chosen = sampled[i]
        assert entry.token_ids[0] == chosen
        assert entry.logprobs[0] == pytest.approx(raw[i, chosen].item(), abs=1e-6)
        assert entry.rank == 1 + int((raw[i] > raw[i, chosen]).sum())
        top = raw[i].topk(n) if n else None
        if top is not None:
            assert entry.token_ids[1:] == top.indices.tolist()
            assert entry.logprobs[1:] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert sampled[0] == 0  # the bias decides the token but not its reported logprob


def test_logprob_rank_of_a_non_argmax_token():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    params = [SamplingParams(temperature=0.0, logprobs=1, logit_bias={2: 10.0})]
    entry = Sampler()(logits, make_batch(params)).logprobs[0]
    assert entry.token_ids == [2, 0] and entry.rank == 3


def test_compute_prompt_logprobs():
    torch.manual_seed(0)
    logits = torch.randn(6, 17)
    targets = torch.tensor([3, 0, 16, 5, 5, 9])
    raw = torch.log_softmax(logits, dim=-1)
    for num_top in (0, 1, 4):
        entries = compute_prompt_logprobs(logits, targets, num_top)
        assert len(entries) == 6
        for j, entry in enumerate(entries):
            t = targets[j].item()
            assert entry.token_ids[0] == t
            assert entry.logprobs[0] == pytest.approx(raw[j, t].item(), abs=1e-6)
            assert entry.rank == 1 + int((raw[j] > raw[j, t]).sum())
            top = raw[j].topk(num_top)
            assert entry.token_ids[1:] == top.indices.tolist()
            assert entry.logprobs[1:] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert compute_prompt_logprobs(torch.empty(0, 17), torch.empty(0, dtype=torch.long), 2) == []


def test_make_generator_accepts_any_int_seed():
    a = torch.rand(3, generator=make_generator(2**70 + 5, "cpu"))
    b = torch.rand(3, generator=make_generator(2**70 + 5, "cpu"))
    assert torch.equal(a, b)
    torch.rand(3, generator=make_generator(-1, "cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_semantics():
    device = torch.device("cuda")
    torch.manual_seed(0)
    logits = torch.randn(6, 1000, device=device)
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.3, logprobs=3),
        SamplingParams(top_k=5, top_p=0.9, seed=11),
        SamplingParams(min_p=0.1, frequency_penalty=0.5, logit_bias={7: 3.0}),
        SamplingParams(min_tokens=4, seed=12, logprobs=0),
        SamplingParams(top_k=1),
        SamplingParams(),
    ]
    outputs = [[1, 2], [3], [4, 4], [], [5], []]
    batch = make_batch(params, prompts=[[9, 9]] * 6, outputs=outputs, stops=[[0]] * 6)
    cpu_batch = make_batch(params, prompts=[[9, 9]] * 6, outputs=outputs, stops=[[0]] * 6)
    torch.testing.assert_close(
        process_logits(logits, batch).cpu(), process_logits(logits.cpu(), cpu_batch)
    )
    batch.generators = [None, make_generator(11, device), None, make_generator(12, device)] + [
        None
    ] * 2
    out = Sampler()(logits, batch)
    ids = out.sampled_token_ids.tolist()
    assert ids[0] == process_logits(logits.cpu(), cpu_batch)[0].argmax().item()
    assert ids[4] == logits[4].argmax().item()
    assert out.logprobs[0] is not None and len(out.logprobs[0].token_ids) == 4
    # A seeded row draws the same on its own.
    solo = make_batch([params[1]], outputs=[outputs[1]], generators=[make_generator(11, device)])
    assert Sampler()(logits[1:2], solo).sampled_token_ids.item() == ids[1]
