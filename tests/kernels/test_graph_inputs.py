from __future__ import annotations

import pytest
import torch

from kestrel.kernels.graph_inputs import fill_decode_inputs


def _buffers(rows: int, width: int, device) -> tuple[torch.Tensor, ...]:
    """Static buffers poisoned with values no step writes."""
    i64, i32 = torch.int64, torch.int32
    return (torch.full((rows,), -7, dtype=i64, device=device),
            torch.full((rows,), -7, dtype=i64, device=device),
            torch.full((rows,), -7, dtype=i64, device=device),
            torch.full((rows,), -7, dtype=i32, device=device),
            torch.full((rows, width), -7, dtype=i32, device=device))


@pytest.mark.parametrize("n,bs,width", [(1, 1, 3), (3, 8, 5), (16, 16, 40), (5, 32, 600)])
def test_fill_copies_rows_and_pads_the_bucket(n, bs, width, device):
    gen = torch.Generator().manual_seed(n * 100 + bs)
    big = 2**40  # int64 values that do not fit 32 bits
    step = torch.randint(0, 2**31 - 1, (4 * n + n * width + 8,), generator=gen)
    # Sources are views at odd offsets of one step buffer, as the staging arena hands out.
    ids = (step[1 : n + 1] + big).to(device)
    pos = step[n + 1 : 2 * n + 1].to(device)
    slots = (step[2 * n + 1 : 3 * n + 1] + big).to(device)
    lens = step[3 * n + 1 : 4 * n + 1].to(torch.int32).to(device)
    table = step[4 * n + 1 : 4 * n + 1 + n * width].to(torch.int32).view(n, width).to(device)
    dst = _buffers(40, width + 7, device)
    fill_decode_inputs((ids, pos, slots, lens, table), dst, bs)
    d_ids, d_pos, d_slots, d_lens, d_table = (t.cpu() for t in dst)
    assert torch.equal(d_ids[:n], ids.cpu()) and torch.equal(d_pos[:n], pos.cpu())
    assert torch.equal(d_slots[:n], slots.cpu()) and torch.equal(d_lens[:n], lens.cpu())
    assert torch.equal(d_table[:n, :width], table.cpu())
    assert (d_table[:n, width:] == -7).all()  # columns past the step's width: untouched
    # Padding rows: store nothing, attend to one slot of block 0.
    assert (d_slots[n:bs] == -1).all() and (d_lens[n:bs] == 1).all()
    assert (d_table[n:bs, 0] == 0).all()
    # Past the bucket nothing is written.
    for t in (d_ids, d_pos, d_slots, d_lens):
        assert (t[bs:] == -7).all()
    assert (d_table[bs:] == -7).all()


def test_fill_rejects_mismatched_buffers(device):
    dst = _buffers(8, 4, device)
    src = tuple(t[:2].clone() for t in dst)
    with pytest.raises(AssertionError, match="bucket"):
        fill_decode_inputs(src, dst, 1)
    bad = (src[0].to(torch.int32),) + src[1:]
    with pytest.raises(AssertionError, match="input_ids"):
        fill_decode_inputs(bad, dst, 2)


@pytest.mark.parametrize("row0,src0,count", [(0, 0, 4), (2, 3, 3), (1, 0, 0)])
def test_fill_takes_new_ids_from_the_device(row0, src0, count, device):
    """Placeholder rows read the previous step's sampled ids; the other rows keep theirs."""
    n, width = 5, 3
    ids = torch.arange(100, 100 + n, device=device)
    rest = (torch.arange(n, device=device), torch.arange(n, device=device),
            torch.ones(n, dtype=torch.int32, device=device),
            torch.zeros(n, width, dtype=torch.int32, device=device))
    sampled = torch.arange(900, 908, device=device)
    dst = _buffers(8, width, device)
    fill_decode_inputs((ids, *rest), dst, 8, (sampled, row0, src0, count))
    want = ids.cpu().clone()
    want[row0 : row0 + count] = sampled.cpu()[src0 : src0 + count]
    assert torch.equal(dst[0].cpu()[:n], want)
    with pytest.raises(AssertionError, match="new ids"):
        fill_decode_inputs((ids, *rest), dst, 8, (sampled, 3, 0, 3))  # rows past n
