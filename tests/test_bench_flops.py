"""The flop counts behind `kfac-lens bench optimizer`'s bound, against counts written from the shapes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac_lens.bench.flops import count_flops
from kfac_lens.optim import KFAC, SGDNesterov

SIZES = [12, 9, 7, 12]


def _net(seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(SIZES) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def _gemm_pass(m):
    """One forward and backward pass's matrix-product flops: forward and weight gradient for every layer,
    the input gradient for all but the first (whose input needs none)."""
    shapes = list(zip(SIZES[:-1], SIZES[1:]))
    return 2 * m * (3 * sum(a * b for a, b in shapes) - shapes[0][0] * shapes[0][1])


@pytest.mark.parametrize("n", [5, 17])
def test_factorisations_are_counted_by_their_textbook_formulas(n):
    A = torch.randn(n, n, dtype=torch.float64)
    A = A @ A.T + n * torch.eye(n, dtype=torch.float64)
    L = torch.linalg.cholesky(A)
    B = torch.randn(n, 3, dtype=torch.float64)
    assert count_flops(lambda: torch.linalg.cholesky(A))[0] == n ** 3 // 3
    assert count_flops(lambda: torch.cholesky_inverse(L))[0] == 2 * n ** 3 // 3
    assert count_flops(lambda: torch.linalg.solve_triangular(L, B, upper=False))[0] == n * n * 3
    assert count_flops(lambda: torch.linalg.solve_triangular(L, B.T, upper=False, left=False))[0] == n * n * 3
    assert count_flops(lambda: torch.linalg.eigh(A))[0] == 9 * n ** 3
    assert count_flops(lambda: A @ B)[0] == 2 * n * n * 3


def test_an_sgd_step_costs_one_forward_and_backward_pass():
    m = 40
    x = torch.rand(m, SIZES[0])
    opt = SGDNesterov(_net(), "bernoulli", lr=0.01)
    flops, _ = count_flops(lambda: opt.step(x, (x > 0.5).float()))
    assert flops == _gemm_pass(m)


def test_a_kfac_step_costs_at_least_the_pass_and_the_inverse_apply():
    """Past its first iterations (no refresh, no λ rule: k = 6), a block-diagonal K-FAC step does the
    gradient pass and applies G⁻¹ V Ā⁻¹ for every layer (2·d·(d + D)·D flops), and more besides (the
    factor statistics on S₁, the J-products on S₂)."""
    m = 40
    x = torch.rand(m, SIZES[0])
    y = (x > 0.5).float()
    opt = KFAC(_net(), "bernoulli", "blockdiag", T1=5, T2=20, T3=20)
    for _ in range(5):
        opt.step(x, y)
    flops, _ = count_flops(lambda: opt.step(x, y))
    apply = sum(2 * b * (a + 1) * (a + 1 + b) for a, b in zip(SIZES[:-1], SIZES[1:]))
    assert flops > _gemm_pass(m) + apply
