"""Shared fixtures: tiny models and hand-written SGD loops, so archive tests need no dataset package."""
from __future__ import annotations

import os

# The suite runs tiny models, many processes (DDP/torchrun tests, SIGKILL tests) and CI machines with
# 2 cores: OpenMP's spinning threads make 2-thread torch up to 100x slower when another process holds
# the other core. One thread per process keeps the suite fast and its timings stable; subprocesses
# inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Every module starts on one intra-op thread, whatever an earlier module's trainer (Lightning, HF) set."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_mlp(batchnorm: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = [torch.nn.Linear(8, 16)]
    if batchnorm:
        layers.append(torch.nn.BatchNorm1d(16))
    layers += [torch.nn.ReLU(), torch.nn.Linear(16, 3)]
    return torch.nn.Sequential(*layers).to(dtype)


def toy_data(n: int = 128, seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def sgd_run(rec, model, steps: int, lr: float = 0.1, batch: int = 16, seed: int = 0, snapshots: list | None = None):
    """Train with plain SGD, call rec.record() after each step; optionally keep every state dict."""
    x, y = toy_data(seed=seed, dtype=next(model.parameters()).dtype)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed + 1)
    if snapshots is not None:
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    for _ in range(steps):
        idx = torch.randperm(len(x), generator=g)[:batch]
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.record(batch_indices=idx, loss=loss)
        if snapshots is not None:
            snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return opt


@pytest.fixture
def archive_path(tmp_path):
    return tmp_path / "run.h5"
