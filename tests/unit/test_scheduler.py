"""Scheduler behaviour on CPU with the real KV manager and a fake runner."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kestrel.request import RequestStatus
from tests.conftest import fake_model_output, make_request, make_scheduler, run_step


def test_token_budget_chunks_prompts_and_runs_running_first():
    sched = make_scheduler(max_num_batched_tokens=16, block_size=4)
    a, b, c = make_request(10), make_request(10), make_request(10)
    for r in (a, b, c):
        sched.add_request(r)
    out, _ = run_step(sched)
    assert out.num_scheduled_tokens == {a.request_id: 10, b.request_id: 6}
    assert [r.req_id for r in out.scheduled_new_reqs] == [a.request_id, b.request_id]
    # a is decoding (1 token), b finishes its prompt (4), c gets the rest of the budget.
    out, _ = run_step(sched)
    assert out.num_scheduled_tokens == {c.request_id: 11 - 1, a.request_id: 1, b.request_id: 4}
    assert out.scheduled_cached_reqs.req_ids == [a.request_id, b.request_id]
    assert out.scheduled_cached_reqs.num_computed_tokens == [10, 6]
    assert out.total_num_scheduled_tokens == 15
    assert (a.num_output_tokens, b.num_output_tokens, c.num_output_tokens) == (2, 1, 1)


def test_without_chunking_a_prompt_waits_for_a_whole_budget():
    sched = make_scheduler(max_num_batched_tokens=16, chunked=False)
    a, b = make_request(10), make_request(10)
    sched.add_request(a)
    sched.add_request(b)
    out, _ = run_step(sched)
    assert out.num_scheduled_tokens == {a.request_id: 10}
    out, _ = run_step(sched)
    assert out.num_scheduled_tokens == {a.request_id: 1, b.request_id: 10}


def test_max_num_seqs_caps_the_batch():
    sched = make_scheduler(max_num_seqs=2)
    reqs = [make_request(3) for _ in range(4)]
    for r in reqs:
        sched.add_request(r)
    out, _ = run_step(sched)
    assert len(out.num_scheduled_tokens) == 2 and sched.num_waiting == 2


def test_finish_by_length_and_eos_releases_blocks():
    sched = make_scheduler()
    a = make_request(5, max_tokens=3)
    b = make_request(5, max_tokens=10, stop_token_ids=[4])
    sched.add_request(a)
    sched.add_request(b)
    while sched.has_unfinished():
        run_step(sched)
    assert a.status == RequestStatus.FINISHED_LENGTH and a.num_output_tokens == 3
    # fake outputs are 3, 4, ...: token 4 is b's second token
    assert b.status == RequestStatus.FINISHED_STOPPED and b.output_token_ids == [3, 4]
    assert b.stop_reason == 4
    assert sched.kv.usage == 0.0
    sched.kv.check_integrity()


def test_min_tokens_defers_stop_tokens():
    sched = make_scheduler()
    r = make_request(5, max_tokens=10, stop_token_ids=[3], min_tokens=2)
    sched.add_request(r)
    while sched.has_unfinished():
        run_step(sched)
    assert r.output_token_ids == [3, 4, 5, 6, 7, 8, 9, 10, 11, 12]  # 3 came before min_tokens


def test_abort_frees_blocks_and_tells_the_runner():
    sched = make_scheduler()
    a, b = make_request(9), make_request(9)
    sched.add_request(a)
    sched.add_request(b)
    run_step(sched)
    sched.finish_requests([a.request_id], RequestStatus.FINISHED_ABORTED)
    assert a.status == RequestStatus.FINISHED_ABORTED
    out, _ = run_step(sched)
    assert out.finished_req_ids == {a.request_id}
    assert a.request_id not in out.num_scheduled_tokens
    sched.finish_requests([b.request_id], RequestStatus.FINISHED_ABORTED)
    assert sched.kv.usage == 0.0 and not sched.has_unfinished()
    sched.kv.check_integrity()


def test_prefix_cache_hit_skips_cached_tokens():
    sched = make_scheduler(block_size=4)
    prompt = list(range(2, 15))  # 13 tokens: 3 full blocks
    a = make_request(prompt=prompt, max_tokens=2)
    sched.add_request(a)
    while sched.has_unfinished():
        run_step(sched)
    b = make_request(prompt=prompt, max_tokens=2)
    sched.add_request(b)
    out, _ = run_step(sched)
    assert b.num_cached_tokens == 12
    assert out.scheduled_new_reqs[0].num_computed_tokens == 12
    assert out.num_scheduled_tokens[b.request_id] == 1


def test_full_prompt_hit_still_computes_one_token():
    sched = make_scheduler(block_size=4)
    prompt = list(range(2, 14))  # exactly 3 blocks
    a = make_request(prompt=prompt, max_tokens=1)
    sched.add_request(a)
    while sched.has_unfinished():
        run_step(sched)
    b = make_request(prompt=prompt, max_tokens=1)
    sched.add_request(b)
    out, _ = run_step(sched)
    assert 0 < out.num_scheduled_tokens[b.request_id] <= 4


def test_preemption_requeues_newest_and_it_completes():
    # 6 blocks of 4 tokens: two requests growing to 12 tokens each cannot both fit.
    sched = make_scheduler(num_blocks=6, block_size=4, max_model_len=24, prefix_caching=False)
    old = make_request(4, max_tokens=12)
    new = make_request(4, max_tokens=12)
    sched.add_request(old)
    sched.add_request(new)
    preempted_seen = False
    for _ in range(100):
        if not sched.has_unfinished():
            break
        run_step(sched)
        preempted_seen |= new.num_preemptions > 0
        sched.kv.check_integrity()
    assert preempted_seen and old.num_preemptions == 0
    assert old.is_finished and new.is_finished
    assert new.num_output_tokens == 12
    assert sched.kv.usage == 0.0


def test_priority_orders_admission_and_victims():
    sched = make_scheduler(max_num_seqs=1)
    low = make_request(3, priority=5)
    high = make_request(3, priority=-1)
    sched.add_request(low)
    sched.add_request(high)
    out, _ = run_step(sched)
    assert list(out.num_scheduled_tokens) == [high.request_id]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    num_blocks=st.integers(4, 24),
    budget=st.integers(1, 24),
    lens=st.lists(st.tuples(st.integers(1, 14), st.integers(1, 6)), min_size=1, max_size=10),
)
def test_random_workloads_keep_kv_invariants_and_never_starve(seed, num_blocks, budget, lens):
    rng = random.Random(seed)
    block_size = 2
    max_len = num_blocks * block_size
    sched = make_scheduler(
        num_blocks=num_blocks, block_size=block_size, max_num_batched_tokens=budget,
        max_num_seqs=rng.randint(1, 6), max_model_len=max_len,
    )
    pending = []
    for plen, mtok in lens:
        plen = min(plen, max_len - 1)
        mtok = min(mtok, max_len - plen)
        prompt = [rng.randint(2, 5) for _ in range(plen)]  # tiny vocab: prefixes repeat
        pending.append(make_request(prompt=prompt, max_tokens=mtok))
    added = []
    steps = 0
    while pending or sched.has_unfinished():
        if pending and rng.random() < 0.6:
            req = pending.pop(0)
            sched.add_request(req)
            added.append(req)
        if added and rng.random() < 0.05:
            victim = rng.choice(added)
            sched.finish_requests([victim.request_id], RequestStatus.FINISHED_ABORTED)
        run_step(sched, rng)
        sched.kv.check_integrity()
        steps += 1
        assert steps < 2000, "a request starved"
    assert all(r.is_finished for r in added)
    for r in added:
        assert r.num_output_tokens <= r.sampling_params.max_tokens
    assert sched.kv.usage == 0.0
    assert sched.kv.num_free_blocks == num_blocks


def test_async_apply_after_preemption_of_the_capped_request():
    from kestrel.outputs import ModelOutput

    sched = make_scheduler(num_blocks=4, block_size=4, max_model_len=16, prefix_caching=False)
    capped = make_request(4, max_tokens=1, priority=1)  # lowest priority: the victim
    other = make_request(12, max_tokens=3)
    sched.add_request(other)
    sched.add_request(capped)
    out1 = sched.schedule()
    assert set(out1.num_scheduled_tokens) == {other.request_id, capped.request_id}
    sched.advance(out1)
    assert capped.length_capped and capped.num_pending == 1
    # other needs a fourth block for its sampled token: the pool (4 blocks) is full, so the
    # lowest-priority running request, capped, is preempted with its token in flight.
    sched.schedule()
    assert capped.status == RequestStatus.PREEMPTED
    result = ModelOutput(req_ids=[other.request_id, capped.request_id],
                         sampled_token_ids=[[5], [6]], logprobs=[None, None])
    produced = sched.apply_output(result)
    assert capped.status == RequestStatus.FINISHED_LENGTH and capped.output_token_ids == [6]
    assert capped.request_id not in sched.waiting
    assert [r.request_id for r, _ in produced] == [other.request_id, capped.request_id]
    sched.kv.check_integrity()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    num_blocks=st.integers(4, 20),
    budget=st.integers(1, 20),
    lens=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 6)), min_size=1, max_size=8),
)
def test_async_lagged_results_keep_invariants(seed, num_blocks, budget, lens):
    """The async engine loop: each step is scheduled and advanced before the previous step's
    tokens are applied; random aborts in between."""
    from kestrel.request import PLACEHOLDER
    from tests.conftest import fake_model_output

    rng = random.Random(seed)
    block_size = 2
    max_len = num_blocks * block_size
    sched = make_scheduler(
        num_blocks=num_blocks, block_size=block_size, max_num_batched_tokens=budget,
        max_num_seqs=rng.randint(1, 5), max_model_len=max_len,
    )
    reqs = []
    for plen, mtok in lens:
        plen = min(plen, max_len - 1)
        prompt = [rng.randint(2, 5) for _ in range(plen)]
        reqs.append(make_request(prompt=prompt, max_tokens=min(mtok, max_len - plen)))
    for r in reqs:
        sched.add_request(r)
    pending = None
    for _ in range(3000):
        if not sched.has_unfinished() and pending is None:
            break
        out = sched.schedule()
        result = fake_model_output(sched, out, rng)
        sched.advance(out)
        if pending is not None:
            sched.apply_output(pending)
        pending = result if out.total_num_scheduled_tokens else None
        if rng.random() < 0.03:
            victim = rng.choice(reqs)
            sched.finish_requests([victim.request_id], RequestStatus.FINISHED_ABORTED)
        sched.kv.check_integrity()
    else:
        raise AssertionError("a request starved")
    assert all(r.is_finished for r in reqs)
    for r in reqs:
        assert PLACEHOLDER not in r.output_token_ids and r.num_pending == 0
        assert r.num_output_tokens <= r.sampling_params.max_tokens
        if r.status == RequestStatus.FINISHED_LENGTH:
            assert r.num_output_tokens == r.sampling_params.max_tokens or (
                r.num_tokens >= max_len)
    assert sched.kv.usage == 0.0 and sched.kv.num_free_blocks == num_blocks


def _drain(sched, max_steps: int = 2000) -> int:
    steps = 0
    while sched.has_unfinished() and steps < max_steps:
        run_step(sched)
        steps += 1
    assert not sched.has_unfinished()
    return steps


def test_kv_reservation_avoids_preemption_that_greedy_admission_causes():
    """Eight requests that each grow from 8 to 40 tokens into a cache of 40 blocks of 4
    (160 slots, four full-length sequences). Admitting while blocks are free packs them all
    in and preempts as they grow; reserving for their outputs admits fewer and never does."""
    def run(ratio):
        sched = make_scheduler(num_blocks=40, block_size=4, max_num_batched_tokens=64,
                               max_model_len=64, new_token_ratio=ratio)
        for _ in range(8):
            sched.add_request(make_request(8, max_tokens=32))
        first = sched.schedule()
        sched.update_from_output(first, fake_model_output(sched, first))
        _drain(sched)
        return sched, len(first.scheduled_new_reqs)

    greedy, admitted_greedy = run(0.0)
    reserved, admitted_reserved = run(1.0)
    assert admitted_greedy == 8 and greedy.num_preemptions > 0
    assert admitted_reserved == 4 and reserved.num_preemptions == 0
    assert greedy.kv.usage == reserved.kv.usage == 0.0


def test_kv_reservation_ratio_rises_after_preemption_and_decays():
    sched = make_scheduler(num_blocks=40, block_size=4, max_num_batched_tokens=64,
                           max_model_len=64, new_token_ratio=0.2)
    for _ in range(8):
        sched.add_request(make_request(8, max_tokens=32))
    ratios = []
    while sched.has_unfinished():
        run_step(sched)
        ratios.append(sched.new_token_ratio)
    assert sched.num_preemptions > 0
    assert max(ratios) > 0.2  # preemptions raised it
    assert all(r >= 0.02 - 1e-9 for r in ratios)  # never below a tenth of the start
    assert ratios[-1] < max(ratios)  # and it decays again once preemptions stop


def test_reservation_never_blocks_an_idle_engine():
    """A request whose future tokens exceed the free KV is still admitted when nothing runs."""
    sched = make_scheduler(num_blocks=8, block_size=4, max_model_len=32, new_token_ratio=1.0)
    req = make_request(4, max_tokens=28)  # 32 tokens = exactly the cache
    sched.add_request(req)
    out = sched.schedule()
    assert req.request_id in out.num_scheduled_tokens
    _drain(sched)
