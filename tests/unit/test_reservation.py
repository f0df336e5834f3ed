"""KV projection: its peak bounds the blocks requests really hold, and admission uses it."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kestrel.request import RequestStatus
from kestrel.scheduler.reservation import KVProjection
from tests.conftest import fake_model_output, make_request, make_scheduler


def _held(tokens_now: list[int], steps: list[int], block_size: int) -> int:
    """Most slots ever held when each request gains a token a step and frees at its end."""
    best = 0
    for s in range(max(steps) + 1):
        slots = sum(-(-(n + s) // block_size) * block_size
                    for n, left in zip(tokens_now, steps) if s <= left)
        best = max(best, slots)
    return best


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 60), st.integers(0, 40)), min_size=1, max_size=12),
       st.sampled_from([1, 4, 16]))
def test_peak_bounds_the_slots_really_held(reqs, block_size):
    proj = KVProjection(capacity=10**9, slack=block_size - 1)
    for n, left in reqs:
        proj.add(n + (-(n + left) % block_size), left)  # padded as the scheduler does
    held = _held([n for n, _ in reqs], [left for _, left in reqs], block_size)
    assert held <= proj.peak() <= held + len(reqs) * 2 * (block_size - 1)


def test_peak_is_exact_for_whole_blocks_and_staggered_ends():
    proj = KVProjection(capacity=100)
    proj.add(10, 5)  # 15 at its end
    proj.add(4, 20)  # 24 at its end
    # at s=5 both are alive: 15 + 9 = 24; at s=20 only the second: 24
    assert proj.peak() == 24
    # a newcomer ending at once counts only against the 14 held now
    assert not proj.try_add(87, 0) and proj.peak() == 24  # refused leaves it unchanged
    assert proj.try_add(86, 0) and proj.peak() == 100


def test_known_lengths_admit_past_the_sum_of_final_lengths_without_preemption():
    """Requests that can only end by length, started at different times, never hold their
    final lengths all at once: the projection admits a newcomer the sum of finals refuses,
    and no request is ever preempted."""
    sched = make_scheduler(num_blocks=24, block_size=4, max_num_batched_tokens=64,
                           max_model_len=64, new_token_ratio=0.7)
    first = make_request(8, max_tokens=32, ignore_eos=True)  # 40 tokens at its end
    sched.add_request(first)
    for _ in range(28):  # first is now at 36 tokens, 4 to go
        out = sched.schedule()
        sched.update_from_output(out, fake_model_output(sched, out))
    late = [make_request(8, max_tokens=40, ignore_eos=True) for _ in range(2)]  # 48 each
    for r in late:
        sched.add_request(r)
    out = sched.schedule()
    # finals sum to 40 + 96 = 136 > 96 slots, but first ends before the others have grown
    assert {r.request_id for r in late} <= set(out.num_scheduled_tokens)
    sched.update_from_output(out, fake_model_output(sched, out))
    while sched.has_unfinished():
        out = sched.schedule()
        sched.update_from_output(out, fake_model_output(sched, out))
    assert sched.num_preemptions == 0
    assert all(r.status == RequestStatus.FINISHED_LENGTH for r in [first, *late])


def test_requests_that_may_stop_early_reserve_a_share_of_their_outputs():
    """With stop tokens possible only new_token_ratio of the remaining outputs is reserved,
    so more requests are admitted than their full lengths allow."""
    def admitted(ignore_eos):
        sched = make_scheduler(num_blocks=40, block_size=4, max_num_batched_tokens=128,
                               max_model_len=64, new_token_ratio=0.5)
        for _ in range(8):
            sched.add_request(make_request(8, max_tokens=32, ignore_eos=ignore_eos))
        return len(sched.schedule().scheduled_new_reqs)

    assert admitted(ignore_eos=True) == 4  # 40 tokens each, 160 slots
    assert admitted(ignore_eos=False) == 6  # 8 + 16 = 24 each


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40), st.integers(0, 30)),
                min_size=1, max_size=14),
       st.sampled_from([1, 4, 8]), st.integers(16, 48))
def test_requests_that_end_by_length_are_never_preempted(reqs, block_size, budget):
    """(prompt, max_tokens, arrival step) triples into a cache of 160 slots: with every
    length known the projection is exact, so no admission ever forces a preemption."""
    sched = make_scheduler(num_blocks=160 // block_size, block_size=block_size,
                           max_num_batched_tokens=budget, max_num_seqs=16, max_model_len=80,
                           new_token_ratio=0.7)
    pending = sorted(reqs, key=lambda r: r[2])
    made = []
    step = 0
    while pending or sched.has_unfinished():
        while pending and pending[0][2] <= step:
            prompt, max_tokens, _ = pending.pop(0)
            made.append(make_request(prompt, max_tokens=max_tokens, ignore_eos=True))
            sched.add_request(made[-1])
        out = sched.schedule()
        sched.update_from_output(out, fake_model_output(sched, out))
        step += 1
        assert step < 2000
    assert sched.num_preemptions == 0
    assert all(r.num_output_tokens == r.sampling_params.max_tokens for r in made)
