"""What the archive benchmarks share: the models and data they measure (from sgdwalk's zoo) and table output."""
from __future__ import annotations

import torch

from trajectory.zoo.data import mnist1d, synthetic
from trajectory.zoo.models import cnn, mlp


def make_mlp() -> torch.nn.Module:
    """The MNIST-1D MLP 40-100-100-10 (15,210 parameters)."""
    return mlp(in_features=40, num_classes=10, hidden=(100, 100))


def make_cnn() -> torch.nn.Module:
    """The width-128 CNN on 3x32x32 inputs (1,484,042 parameters: the issue's ">= 1M" model)."""
    return cnn(in_channels=3, num_classes=10, input_dim=2, width=128)


def mnist1d_train() -> tuple[torch.Tensor, torch.Tensor]:
    return mnist1d(split="train").tensors


def cifar_shaped(n: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated CIFAR-shaped class clusters (no files needed)."""
    return synthetic(split="train", num_samples=n, input_shape=(3, 32, 32), seed=0).tensors


def fmt_row(cols, widths) -> str:
    return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cols, widths)))


def print_table(title: str, header, rows) -> None:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print(fmt_row(header, widths))
    print(fmt_row(["-" * w for w in widths], widths))
    for r in rows:
        print(fmt_row(r, widths))
