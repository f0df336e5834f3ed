"""Fill a CUDA graph's static decode inputs from one step's inputs, in one launch.

Owns the copy of token ids, positions, slots, context lengths and block-table rows of n
requests into fixed buffers sized for a graph bucket of bs >= n rows, and the padding of rows
n..bs-1 (slot -1: nothing is stored; context 1 at block 0: attention reads one valid slot).
Must not know graphs or requests: it is a copy between tensors.

Five copies and three fills launched from torch cost a kernel each before every replay
(~2 us apiece on an H100, in series on the compute stream); this is one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# NOTE: the row count and widths change per step; sources may be views at any offset of a
# step buffer. Nothing here is specialized on them, so every step runs one compiled variant.
_DYNAMIC = ["n", "width", "stride_src_bt", "stride_dst_bt", "new_row0", "new_src0", "new_count"]
_VIEWS = ["ids_src", "pos_src", "slot_src", "lens_src", "bt_src", "new_ids"]


@triton.jit(do_not_specialize=_DYNAMIC, do_not_specialize_on_alignment=_VIEWS)
def _fill_kernel(
    ids_src, pos_src, slot_src, lens_src, bt_src,
    ids_dst, pos_dst, slot_dst, lens_dst, bt_dst,
    n, width, stride_src_bt, stride_dst_bt,
    new_ids, new_row0, new_src0, new_count,
    BLOCK_W: tl.constexpr,
):
    r = tl.program_id(0)
    if r < n:
        j = r - new_row0
        if (j >= 0) & (j < new_count):
            tok = tl.load(new_ids + new_src0 + j)
        else:
            tok = tl.load(ids_src + r)
        tl.store(ids_dst + r, tok)
        tl.store(pos_dst + r, tl.load(pos_src + r))
        tl.store(slot_dst + r, tl.load(slot_src + r))
        tl.store(lens_dst + r, tl.load(lens_src + r))
        src = bt_src + r.to(tl.int64) * stride_src_bt
        dst = bt_dst + r.to(tl.int64) * stride_dst_bt
        for w0 in range(0, width, BLOCK_W):
            offs = w0 + tl.arange(0, BLOCK_W)
            mask = offs < width
            tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)
    else:
        tl.store(slot_dst + r, -1)
        tl.store(lens_dst + r, 1)
        tl.store(bt_dst + r.to(tl.int64) * stride_dst_bt, 0)


def fill_decode_inputs(
    src: tuple[torch.Tensor, ...],  # ids [n], positions [n], slots [n], lens [n], blocks [n, w]
    dst: tuple[torch.Tensor, ...],  # the same five, rows >= bs, blocks [rows, >= w]
    bs: int,
    new_ids: tuple[torch.Tensor, int, int, int] | None = None,
) -> None:
    """dst[:n] = src and rows n..bs-1 padded; block-table columns >= w are left as they are
    (the context lengths bound every read of a row).

    new_ids (tokens, row0, src0, count): token ids rows row0 .. row0 + count - 1 take from
    tokens[src0:] instead of src[0] (the previous step's sampled ids, still on the device)."""
    names = ("input_ids", "positions", "slot_mapping", "seq_lens", "block_table")
    n = src[0].shape[0]
    width = src[4].shape[1]
    assert n <= bs <= dst[0].shape[0], f"{n} rows into a bucket of {bs} (buffers {dst[0].shape})"
    assert dst[4].shape[1] >= width, f"block table {tuple(src[4].shape)} into {tuple(dst[4].shape)}"
    for name, s, d in zip(names, src, dst):
        assert s.dtype == d.dtype and s.device == d.device, f"{name}: {s.dtype} -> {d.dtype}"
        assert s.shape[0] == n and s.stride(-1) == 1 and d.stride(-1) == 1, name
    if bs == 0:
        return
    tokens, row0, src0, count = new_ids if new_ids is not None else (src[0], 0, 0, 0)
    assert tokens.dtype == src[0].dtype and 0 <= src0 and src0 + count <= tokens.shape[0], (
        f"new ids {tokens.dtype} [{src0}, {src0 + count}) of {tuple(tokens.shape)}")
    assert 0 <= row0 and row0 + count <= n, f"new ids for rows [{row0}, {row0 + count}) of {n}"
    block_w = min(512, triton.next_power_of_2(max(width, 1)))
    _fill_kernel[(bs,)](
        *src, *dst, n, width, src[4].stride(0), dst[4].stride(0), tokens, row0, src0, count,
        BLOCK_W=block_w, num_warps=1,
    )
