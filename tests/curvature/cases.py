"""Small models with dense float64 references, shared by the curvature tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call


def half_squared_error(outputs: Tensor, targets: Tensor) -> Tensor:
    return 0.5 * ((outputs - targets) ** 2).sum(dim=1).mean()


class Quadratic(nn.Module):
    """L(w) = ½ wᵀAw − bᵀw, whatever the batch: the Hessian is A."""

    def __init__(self, matrix: Tensor, linear: Tensor) -> None:
        super().__init__()
        self.register_buffer("matrix", matrix)
        self.register_buffer("linear", linear)
        self.w = nn.Parameter(torch.randn(matrix.shape[0], dtype=matrix.dtype))

    def forward(self, inputs: Tensor) -> Tensor:
        return self.w.expand(inputs.shape[0], -1)


def quadratic_loss(outputs: Tensor, targets: Tensor, model: Quadratic) -> Tensor:
    w = outputs[0]
    return 0.5 * w @ model.matrix @ w - model.linear @ w


@dataclass
class Case:
    """A model, its data and a loss of (outputs, targets)."""

    name: str
    model: nn.Module
    inputs: Tensor
    targets: Tensor
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    chunk_size: int
    train_mode: bool = True


def quadratic_spectrum() -> Tensor:
    """Large negative, repeated top, zero, and a spread bulk."""
    return torch.tensor(
        [-30.0, 9.0, 9.0, 9.0, 4.0, 2.5, 1.0, 0.0, 0.0, 0.5], dtype=torch.float64
    )


def make_case(name: str) -> Case:
    generator = torch.manual_seed(1234)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
        inputs = torch.randn(24, 5, dtype=torch.float64, generator=generator)
        targets = torch.randn(24, 3, dtype=torch.float64, generator=generator)
        return Case(name, model, inputs, targets, half_squared_error, chunk_size=10)
    if name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(1, 3, 3),
            nn.Tanh(),
            nn.Conv2d(3, 2, 2),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(2 * 3 * 3, 2),
        ).double()
        inputs = torch.randn(12, 1, 6, 6, dtype=torch.float64, generator=generator)
        labels = torch.randint(0, 2, (12,), generator=generator)
        return Case(name, model, inputs, labels, nn.CrossEntropyLoss(), chunk_size=5)
    if name == "batchnorm":
        model = nn.Sequential(
            nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2)
        ).double()
        inputs = torch.randn(16, 4, dtype=torch.float64, generator=generator)
        targets = torch.randn(16, 2, dtype=torch.float64, generator=generator)
        return Case(name, model, inputs, targets, half_squared_error, chunk_size=8)
    if name == "quadratic":
        spectrum = quadratic_spectrum()
        basis, _ = torch.linalg.qr(
            torch.randn(10, 10, dtype=torch.float64, generator=generator)
        )
        matrix = basis @ torch.diag(spectrum) @ basis.T
        matrix = (matrix + matrix.T) / 2
        linear = torch.randn(10, dtype=torch.float64, generator=generator)
        model = Quadratic(matrix, linear)
        inputs = torch.zeros(4, 1, dtype=torch.float64)
        return Case(
            name,
            model,
            inputs,
            inputs,
            lambda outputs, targets: quadratic_loss(outputs, targets, model),
            chunk_size=2,
        )
    raise KeyError(name)


CASES = ["mlp", "cnn", "batchnorm", "quadratic"]


def chunks(case: Case, chunk_size: int | None = None) -> list[tuple[Tensor, Tensor]]:
    size = chunk_size or case.chunk_size
    return [
        (case.inputs[i : i + size], case.targets[i : i + size])
        for i in range(0, case.inputs.shape[0], size)
    ]


def dense_loss_function(case: Case, chunk_size: int | None = None):
    """θ ↦ L(θ) built independently: mean over chunks weighted by their sizes."""
    names = [n for n, p in case.model.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in case.model.named_parameters() if p.requires_grad]
    sizes = [s.numel() for s in shapes]
    buffers = {n: b.clone() for n, b in case.model.named_buffers()}
    data = chunks(case, chunk_size)
    total = case.inputs.shape[0]

    def loss(theta: Tensor) -> Tensor:
        pieces = torch.split(theta, sizes)
        params = {
            n: p.reshape(s) for n, p, s in zip(names, pieces, shapes, strict=True)
        }
        value = theta.new_zeros(())
        case.model.train(case.train_mode)
        for inputs, targets in data:
            state = {**params, **{n: b.clone() for n, b in buffers.items()}}
            outputs = functional_call(case.model, state, (inputs,))
            value = value + inputs.shape[0] / total * case.loss_fn(outputs, targets)
        return value

    theta0 = torch.cat(
        [p.detach().reshape(-1) for p in case.model.parameters() if p.requires_grad]
    )
    return loss, theta0


def dense_hessian(case: Case, chunk_size: int | None = None) -> Tensor:
    loss, theta0 = dense_loss_function(case, chunk_size)
    return torch.autograd.functional.hessian(loss, theta0)
