from __future__ import annotations

import pytest
import torch

from kestrel.kernels.gemm_tma import TmaGemmConfig, candidate_configs, gemm_tma, tma_config
from tests.kernels.paged_refs import rel_err
from tests.kernels.test_gemm import check_against_float64

# (m, n, k, config): both orientations, ragged m and n (rows past the end read as zero), K not a
# multiple of the tile, split-K with a short last split, and the heuristic's own choice.
CASES = [
    (1, 64, 128, None),
    (5, 96, 256, None),
    (37, 130, 320, TmaGemmConfig(True, 64, 64, 64, 2, 4, 2)),
    (20, 200, 512, TmaGemmConfig(True, 32, 64, 64, 4, 4, 2)),
    (3, 64, 100, TmaGemmConfig(True, 16, 64, 64, 2, 4, 2)),
    (70, 96, 448, TmaGemmConfig(False, 64, 64, 64, 3, 4, 2)),
    (33, 72, 192, TmaGemmConfig(False, 64, 64, 64, 1, 4, 2)),
]


@pytest.mark.parametrize("m, n, k, cfg", CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_gemm_tma_matches_float64(m, n, k, cfg, bias, device):
    check_against_float64(gemm_tma, m, n, k, cfg, bias, device)


def test_gemm_tma_config_fills_the_gpu():
    cpu = torch.device("cpu")  # nominal 132 SMs
    few = tma_config(256, 1024, 3072, cpu)  # 8 weight tiles x 1 token tile
    assert few.swap and few.block_m == 256 and few.split_k > 1
    assert 3072 // few.split_k >= 4 * few.block_k
    assert tma_config(214, 28672, 4096, cpu).split_k == 1  # 224 tiles already
    assert all(c.block_m * c.block_n <= 256 * 128 for c in candidate_configs(256, 4096, 4096))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [33, 64, 129, 214, 256])
@pytest.mark.parametrize("n, k", [(4096, 1024), (1024, 3072), (6144, 4096), (4096, 14336)])
def test_gemm_tma_bf16_real_shapes(m, n, k):
    gen = torch.Generator().manual_seed(m + n)
    x = torch.randn(m, k, generator=gen).to("cuda", torch.bfloat16)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to("cuda", torch.bfloat16)
    out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    out.copy_(gemm_tma(x, w))
    assert rel_err(out, x.double() @ w.double().T) < 1e-2
    assert torch.equal(gemm_tma(x, w), out)
