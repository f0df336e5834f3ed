from __future__ import annotations

import pytest
import torch

from kestrel.kernels.gemm import MAX_ROWS, GemmConfig, gemm, gemm_config
from tests.kernels.paged_refs import rel_err

# (m, n, k, config): ragged m and n, K not a multiple of the tile, split-K with a short last
# split, one row, and the heuristic's own choice.
CASES = [
    (1, 64, 128, None),
    (5, 96, 256, None),
    (37, 130, 320, GemmConfig(16, 64, 64, 2, 4, 2)),
    (20, 200, 512, GemmConfig(32, 64, 64, 4, 4, 2)),
    (3, 64, 100, GemmConfig(16, 64, 64, 2, 4, 2)),
    (17, 64, 448, GemmConfig(16, 64, 64, 3, 4, 2)),
    (70, 96, 256, GemmConfig(64, 64, 64, 2, 4, 2)),
]


def check_against_float64(fn, m, n, k, cfg, bias, device):
    """fn(x, w, b, config=cfg) against float64, and bit-identical on a second launch."""
    gen = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=gen).to(device)
    w = torch.randn(n, k, generator=gen).to(device)
    b = torch.randn(n, generator=gen).to(device) if bias else None
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    out = fn(x, w, b, config=cfg)
    assert out.shape == (m, n) and out.dtype == x.dtype
    assert rel_err(out, ref) < 1e-5
    # Split-K adds partials in split order and resets its counters: a second launch (as a
    # graph replay would) gives the same bits.
    assert torch.equal(fn(x, w, b, config=cfg), out)


@pytest.mark.parametrize("m, n, k, cfg", CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_gemm_matches_float64(m, n, k, cfg, bias, device):
    check_against_float64(gemm, m, n, k, cfg, bias, device)


def test_gemm_strided_rows(device):
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(6, 300, generator=gen).to(device)
    x = base[:, :256]  # row stride 300, last dim contiguous
    w = torch.randn(64, 256, generator=gen).to(device)
    assert rel_err(gemm(x, w), x.double() @ w.double().T) < 1e-5


def test_gemm_config_splits_k_for_few_tiles():
    cpu = torch.device("cpu")  # nominal 132 SMs
    few = gemm_config(256, 1024, 3072, cpu)  # 16 x 2 tiles
    assert few.split_k > 1 and 3072 // few.split_k >= 4 * few.block_k
    assert gemm_config(256, 151936, 1024, cpu).split_k == 1
    assert gemm_config(8, 64, 128, cpu).split_k == 1  # K too short to split


def test_gemm_rejects_wide_batches(device):
    with pytest.raises(AssertionError, match="rows"):
        gemm(torch.zeros(MAX_ROWS + 1, 8, device=device), torch.zeros(4, 8, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [2, 7, 32, 64, 129, 256])
@pytest.mark.parametrize("n, k", [(4096, 1024), (1024, 3072), (6144, 4096), (151936, 1024)])
def test_gemm_bf16_real_shapes(m, n, k):
    gen = torch.Generator().manual_seed(m + n)
    x = torch.randn(m, k, generator=gen).to("cuda", torch.bfloat16)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to("cuda", torch.bfloat16)
    out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    out.copy_(gemm(x, w))
    assert rel_err(out, x.double() @ w.double().T) < 1e-2
    assert torch.equal(gemm(x, w), out)


def test_linear_sends_only_small_cuda_batches_to_gemm(device):
    from kestrel.layers.linear import GEMM_MAX_ROWS, takes_gemm

    dtype = torch.bfloat16
    small_w = torch.zeros(4096, 1024, dtype=dtype, device=device)
    x = torch.zeros(8, 1024, dtype=dtype, device=device)
    from kestrel.kernels.utils import pdl_options

    # Only where the GEMM can join the programmatic-dependent-launch chain (Hopper+).
    assert takes_gemm(x, small_w) == bool(pdl_options(device))
    assert not takes_gemm(x[:1], small_w)  # one row: the GEMV
    wide = torch.zeros(GEMM_MAX_ROWS + 1, 1024, dtype=dtype, device=device)
    assert not takes_gemm(wide, small_w)
    big_w = torch.zeros(14336, 4096, dtype=dtype, device=device)  # Llama-3-8B sizes: cuBLAS
    assert not takes_gemm(torch.zeros(8, 4096, dtype=dtype, device=device), big_w)
    assert not takes_gemm(x.float(), small_w.float())


@pytest.mark.gpu
def test_linear_gemm_path_matches_cublas():
    from kestrel.layers.linear import linear

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(12, 1024, generator=gen).to("cuda", torch.bfloat16)
    w = (torch.randn(3072, 1024, generator=gen) / 32).to("cuda", torch.bfloat16)
    b = torch.randn(3072, generator=gen).to("cuda", torch.bfloat16)
    ref = torch.nn.functional.linear(x.float(), w.float(), b.float())
    assert rel_err(linear(x, w, b), ref.double()) < 1e-2
