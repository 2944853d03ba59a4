"""Small trained tanh classifiers on scikit-learn's digits, shared by the figure and widget tests."""

from __future__ import annotations

import torch
from torch import nn

from kfac_lens.data import load_digits
from kfac_lens.zoo import classifier


def digits(n: int = 400):
    ds = load_digits()
    return ds.X[:n].float(), ds.y[:n].long()


def tanh_net(sizes, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    return classifier(sizes)


def trained_net(steps=150, hidden=8, n=400, seed=0):
    """64-8-8-8-8-10 tanh on ``n`` digits after ``steps`` full-batch Adam steps (1 thread: tiny matrices)."""
    X, y = digits(n)
    model = tanh_net([64] + [hidden] * 4 + [10], seed)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X), y).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model, X, y
