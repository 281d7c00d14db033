"""Analytic test problems with known derivatives, and closures for them."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lightning_eos.optim import closure_backward


def rosenbrock(x: Tensor) -> Tensor:
    return 100 * (x[1] - x[0] ** 2) ** 2 + (1 - x[0]) ** 2


def saddle(x: Tensor) -> Tensor:
    return x[0] ** 2 - x[1] ** 2


def spd_matrix(n: int, low: float, high: float, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    eigenvalues = torch.linspace(low, high, n, dtype=torch.float64)
    return q @ torch.diag(eigenvalues) @ q.T


def closure_for(
    optimizer: torch.optim.Optimizer, params: list[Tensor], f: Callable[..., Tensor]
) -> Callable[[], Tensor]:
    """The usual closure, with the backward pass second-order optimizers ask for."""

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = f(*params)
        closure_backward(loss)
        return loss

    return closure


def parameter(*values: float) -> nn.Parameter:
    return nn.Parameter(torch.tensor(values, dtype=torch.float64))
