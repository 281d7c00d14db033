"""Shared set-up of the benchmarks: the digits data, the reference models, timing."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from lightning_eos.data import DigitsDataModule
from lightning_eos.losses import half_squared_error
from lightning_eos.models import MLP, SmallCNN


def digits(flatten: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole standardized digits set with one-hot targets."""
    data = DigitsDataModule(flatten=flatten)
    data.setup("fit")
    return data.train_dataset.tensors


def trained_model(name: str, steps: int, lr: float = 0.2, seed: int = 0):
    """The MLP or SmallCNN after ``steps`` full-batch GD steps (0: initialization)."""
    torch.manual_seed(seed)
    model = MLP() if name == "mlp" else SmallCNN(channels=(16, 32), activation="tanh")
    inputs, targets = digits(flatten=name == "mlp")
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        half_squared_error(model(inputs), targets).backward()
        optimizer.step()
    return model, inputs, targets


def seconds(fn: Callable[[], object], repeat: int = 20, warmup: int = 2) -> float:
    """Median wall time of ``fn`` over ``repeat`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]
