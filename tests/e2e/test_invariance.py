"""Features that must not change outputs: batch composition, chunked prefill, prefix cache,
preemption, n>1 fan-out. Greedy and seeded sampling alike."""

from __future__ import annotations

import random

import pytest

from kestrel import LLM, SamplingParams

_rng = random.Random(1234)
PROMPTS = [[_rng.randint(3, 380) for _ in range(n)] for n in (3, 17, 40, 65, 9, 30)]
SHARED = [_rng.randint(3, 380) for _ in range(33)]
PREFIXED = [SHARED + [_rng.randint(3, 380) for _ in range(n)] for n in (1, 5, 12, 20)]

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def path(tiny_model):
    return tiny_model("qwen3")


def tokens(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def reference(path):
    """Every prompt alone, whole prompt in one step, no prefix caching."""
    llm = LLM(path, dtype="float32", enable_prefix_caching=False, max_num_seqs=1,
              attention_backend="reference")
    return {i: tokens(llm, [p])[0] for i, p in enumerate(PROMPTS + PREFIXED)}


def test_batch_of_many_equals_one_at_a_time(path, reference):
    llm = LLM(path, dtype="float32", enable_prefix_caching=False)
    assert tokens(llm, PROMPTS + PREFIXED) == [reference[i] for i in range(len(reference))]


@pytest.mark.parametrize("budget", [5, 16])
def test_chunked_prefill_equals_whole_prompts(path, reference, budget):
    llm = LLM(path, dtype="float32", enable_prefix_caching=False,
              max_num_batched_tokens=budget)
    assert tokens(llm, PROMPTS) == [reference[i] for i in range(len(PROMPTS))]


def test_without_chunking_long_prompts_still_run(path, reference):
    llm = LLM(path, dtype="float32", enable_chunked_prefill=False, max_num_batched_tokens=16)
    assert tokens(llm, PROMPTS) == [reference[i] for i in range(len(PROMPTS))]


def test_prefix_cache_hit_equals_miss(path, reference):
    llm = LLM(path, dtype="float32", block_size=4)
    expected = [reference[len(PROMPTS) + i] for i in range(len(PREFIXED))]
    first = llm.generate(PREFIXED, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in first] == expected
    again = llm.generate(PREFIXED, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == expected
    assert all(o.num_cached_tokens >= 32 for o in again)
    assert llm.engine.kv.prefix_cache_hits > 0
    assert llm.engine.kv.usage == 0.0


def test_forced_preemption_equals_none(path, reference):
    # 24 blocks of 4 tokens: one full-length sequence fits, six long ones do not.
    # new_token_ratio=0: admit while blocks are free, so preemption must happen
    llm = LLM(path, dtype="float32", block_size=4, num_blocks=24, max_model_len=96,
              enable_prefix_caching=False, new_token_ratio=0.0)
    assert tokens(llm, PROMPTS) == [reference[i] for i in range(len(PROMPTS))]
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.kv.usage == 0.0


def test_known_lengths_in_a_tight_cache_never_preempt(path, reference):
    # The same tight cache with the default admission: every request ends by length
    # (ignore_eos), so the projected KV footprint is exact and nothing is ever preempted.
    llm = LLM(path, dtype="float32", block_size=4, num_blocks=24, max_model_len=96,
              enable_prefix_caching=False)
    assert tokens(llm, PROMPTS) == [reference[i] for i in range(len(PROMPTS))]
    assert llm.engine.scheduler.num_preemptions == 0
    assert llm.engine.kv.usage == 0.0


def test_seeded_sampling_ignores_batch_and_preemption(path):
    params = [SamplingParams(temperature=0.9, top_p=0.95, max_tokens=20, ignore_eos=True,
                             seed=100 + i) for i in range(len(PROMPTS))]
    alone = LLM(path, dtype="float32", max_num_seqs=1)
    expected = [tokens(alone, [p], sp)[0] for p, sp in zip(PROMPTS, params)]
    batched = LLM(path, dtype="float32")
    assert tokens(batched, PROMPTS, params) == expected
    tight = LLM(path, dtype="float32", block_size=4, num_blocks=24, max_model_len=96,
                max_num_batched_tokens=7, new_token_ratio=0.0)
    assert tokens(tight, PROMPTS, params) == expected
    assert tight.engine.scheduler.num_preemptions > 0


def test_n_samples_share_prompt_blocks_and_match_single_seeds(path):
    llm = LLM(path, dtype="float32", block_size=4)
    prompt = PROMPTS[3]
    group = llm.generate([prompt], SamplingParams(n=4, temperature=1.0, max_tokens=12,
                                                   ignore_eos=True, seed=7), use_tqdm=False)[0]
    assert [c.index for c in group.outputs] == [0, 1, 2, 3]
    samples = [c.token_ids for c in group.outputs]
    assert len({tuple(s) for s in samples}) > 1
    # the three siblings reuse the full prompt blocks the first one computed
    assert llm.engine.kv.prefix_cache_hits >= 3 * (len(prompt) // 4 * 4 - 4)
    for i, sample in enumerate(samples):
        single = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, seed=7 + i)
        assert tokens(llm, [prompt], single)[0] == sample


@pytest.mark.parametrize("opts", [
    {},
    {"max_num_batched_tokens": 7},
    {"block_size": 4, "num_blocks": 24, "max_model_len": 96},
])
def test_async_scheduling_equals_sync(path, reference, opts):
    llm = LLM(path, dtype="float32", async_scheduling="on", **opts)
    assert llm.engine._async
    assert tokens(llm, PROMPTS + PREFIXED) == [reference[i] for i in range(len(reference))]
    params = [SamplingParams(temperature=0.9, max_tokens=20, ignore_eos=True, seed=100 + i,
                             repetition_penalty=1.2 if i % 2 else 1.0,
                             frequency_penalty=0.5 if i % 3 == 0 else 0.0)
              for i in range(len(PROMPTS))]
    sync = LLM(path, dtype="float32", async_scheduling="off")
    assert tokens(llm, PROMPTS, params) == tokens(sync, PROMPTS, params)
    assert llm.engine.kv.usage == 0.0 and not llm.engine.has_unfinished()


def test_staged_step_copies_equal_sync(path, reference, monkeypatch):
    """The GPU path's one-copy staging (StepArena slots, placeholder slices), run on CPU."""
    from kestrel.runner import model_runner
    from kestrel.runner.staging import StepArena

    monkeypatch.setattr(model_runner, "StepArena",
                        lambda device, nbytes: StepArena(device, nbytes, staged=True))
    llm = LLM(path, dtype="float32", async_scheduling="on", max_num_batched_tokens=16)
    assert llm.engine.executor.runner.arena.enabled
    # Requests finish at different steps, so placeholder rows are both contiguous
    # (one slice copy) and scattered (index upload).
    params = [GREEDY.clone(max_tokens=4 + 4 * i) for i in range(len(PROMPTS))]
    expected = [reference[i][: 4 + 4 * i] for i in range(len(PROMPTS))]
    assert tokens(llm, PROMPTS, params) == expected
    assert tokens(llm, PROMPTS, params) == expected  # prefix-cache hits reorder the rows
    assert llm.engine.kv.usage == 0.0


def test_async_scheduling_stops_like_sync(path):
    base = SamplingParams(temperature=0, max_tokens=30)
    sync = LLM(path, dtype="float32", async_scheduling="off")
    first = sync.generate(PROMPTS[:3], base, use_tqdm=False)
    stop_tok = first[0].outputs[0].token_ids[4]
    text = first[1].outputs[0].text
    stop_str = text[len(text) // 2 : len(text) // 2 + 2] or "x"
    params = [base.clone(stop_token_ids=[stop_tok]), base.clone(stop=[stop_str]),
              base.clone(n=3, temperature=1.0, seed=5, max_tokens=9)]
    asy = LLM(path, dtype="float32", async_scheduling="on")
    a = asy.generate(PROMPTS[:3], params, use_tqdm=False)
    s = sync.generate(PROMPTS[:3], params, use_tqdm=False)
    for x, y in zip(a, s):
        assert [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in x.outputs] == [
            (c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in y.outputs]
    assert asy.engine.kv.usage == 0.0
    asy.engine.kv.check_integrity()


def test_torch_backend_equals_reference_backend(path, reference):
    llm = LLM(path, dtype="float32", attention_backend="torch", max_num_batched_tokens=16)
    assert llm.engine.executor.runner.backend.name == "torch"
    assert tokens(llm, PROMPTS) == [reference[i] for i in range(len(PROMPTS))]
