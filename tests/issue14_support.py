"""Helpers of the issue-14 tests (no tests here): a linear regression archive with known noise, float64 loops."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from trajectory import Recorder


def linear_data(n: int, d: int, sigma: float, seed: int, w_star: torch.Tensor | None = None):
    """x ~ N(0, I_d), y = x·w* + σ·ε (ε ~ N(0, 1)), y of shape (n, 1); w* drawn from ``seed`` unless given."""
    g = torch.Generator().manual_seed(seed)
    if w_star is None:
        w_star = torch.randn(d, generator=g) + 1.0
    x = torch.randn(n, d, generator=g)
    y = (x @ w_star + sigma * torch.randn(n, generator=g)).unsqueeze(1)
    return x, y, w_star


def record_linear(path, x: torch.Tensor, y: torch.Tensor, *, steps: int = 4, lr: float = 0.05, batch: int = 16,
                  seed: int = 0) -> str:
    """Plain SGD on mse for a bias-free nn.Linear(d, 1) started at zero, every step recorded with its indices."""
    torch.manual_seed(seed)
    model = linear_model(x.shape[1])
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    with Recorder(path, model, optimizer=opt, flush_interval=0.1) as rec:
        for _ in range(steps):
            idx = torch.randint(0, len(x), (batch,), generator=g)
            loss = ((model(x[idx]) - y[idx]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.record(batch_indices=idx, loss=loss.detach())
    return str(path)


def linear_model(d: int) -> nn.Module:
    m = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        m.weight.zero_()
    return m


def splits(x, y, xt, yt) -> dict:
    return {"train": TensorDataset(x, y), "test": TensorDataset(xt, yt)}


def flat_grad(model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    gs = torch.autograd.grad(loss, [p for p in model.parameters()])
    return torch.cat([g.reshape(-1) for g in gs]).double()


def ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x.double()), y)


def load(model: nn.Module, sd: dict) -> nn.Module:
    model.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in sd.items()})
    return model
