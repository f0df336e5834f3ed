"""StepArena: several host arrays in one copy, views valid for the step, slot reuse."""

import numpy as np
import pytest
import torch

from kestrel.runner.staging import StepArena


def _arena(nbytes: int = 4096) -> StepArena:
    return StepArena(torch.device("cpu"), nbytes=nbytes, slots=3, staged=True)


def test_many_arrays_round_trip_with_shapes_and_dtypes():
    arena = _arena()
    arena.begin_step()
    table = np.arange(12, dtype=np.int32).reshape(3, 4)
    a, b, c, d = arena.to_device_many([
        ([5, -7, 2**40], torch.int64), (table, torch.int32), ([0.25, 3.0], torch.float32),
        ([True, False, True], torch.bool),
    ])
    assert a.dtype == torch.int64 and a.tolist() == [5, -7, 2**40]
    assert b.shape == (3, 4) and b.dtype == torch.int32 and (b.numpy() == table).all()
    assert c.tolist() == [0.25, 3.0] and d.tolist() == [True, False, True]
    for t in (a, b, c, d):  # 64-byte aligned views, so any dtype can be read in place
        assert t.data_ptr() % 64 == 0


def test_later_arrays_do_not_overwrite_earlier_ones_in_a_step():
    arena = _arena()
    arena.begin_step()
    first = arena.to_device([1, 2, 3], torch.int64)
    host = arena.host(4, torch.int64)
    host.fill_(-1)
    second, third = arena.to_device_many([([9] * 5, torch.int64), ([7], torch.int32)])
    assert first.tolist() == [1, 2, 3] and second.tolist() == [9] * 5 and third.tolist() == [7]


def test_slots_rotate_so_two_steps_in_flight_keep_their_data():
    arena = _arena()
    arena.begin_step()
    step1 = arena.to_device([11, 12], torch.int64)
    arena.begin_step()
    step2 = arena.to_device([21, 22], torch.int64)
    assert step1.tolist() == [11, 12] and step2.tolist() == [21, 22]
    assert step1.data_ptr() != step2.data_ptr()
    arena.begin_step()
    arena.begin_step()  # the fourth step reuses the first step's slot
    assert arena.to_device([41, 42], torch.int64).data_ptr() == step1.data_ptr()


@pytest.mark.parametrize("staged", [True, False])
def test_larger_than_the_arena_falls_back_to_a_one_off_copy(staged):
    arena = StepArena(torch.device("cpu"), nbytes=256, staged=staged)
    arena.begin_step()
    big = list(range(100))  # 800 bytes
    small, large = arena.to_device_many([([1], torch.int64), (big, torch.int64)])
    assert small.tolist() == [1] and large.tolist() == big


def test_unstaged_arena_builds_tensors_directly():
    arena = StepArena(torch.device("cpu"))
    assert not arena.enabled
    arena.begin_step()
    (t,) = arena.to_device_many([([3, 4], torch.int32)])
    assert t.dtype == torch.int32 and t.tolist() == [3, 4]
