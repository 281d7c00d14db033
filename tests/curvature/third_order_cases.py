"""Tiny models with dense third-derivative tensors, for the third-order tests.

Each case has at most 30 parameters, so that the dense tensor ∇³L (built by nested
torch.autograd.functional calls in float64, or written in closed form for the
analytic functions) is cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_eos.curvature import ProbeObjective, plain_normalization
from lightning_eos.nn import LayerNorm as PlainLayerNorm

DTYPE = torch.float64


def half_squared_error(outputs: Tensor, targets: Tensor) -> Tensor:
    return 0.5 * ((outputs - targets) ** 2).sum(dim=1).mean()


class Analytic(nn.Module):
    """A loss that is a function of the parameters alone (the batch is ignored)."""

    def __init__(self, name: str, values: Tensor) -> None:
        super().__init__()
        self.name = name
        self.w = nn.Parameter(values.clone())
        generator = torch.Generator().manual_seed(5)
        cubic = torch.randn(3, 3, 3, generator=generator, dtype=DTYPE)
        self.register_buffer("cubic", sum(cubic.permute(*p) for p in _PERMUTATIONS))
        self.register_buffer("quadratic", torch.eye(3, dtype=DTYPE))

    def forward(self, batch) -> Tensor:
        w = self.w
        if self.name == "product":  # ½(ab − y)², y = 0.7
            return 0.5 * (w[0] * w[1] - 0.7) ** 2
        if self.name == "cubic":  # C[w, w, w]/6 + ½‖w‖²
            cubic = torch.einsum("ijk,i,j,k->", self.cubic, w, w, w) / 6
            return cubic + 0.5 * w @ self.quadratic @ w
        if self.name == "rosenbrock":  # (1 − x)² + 100(y − x²)²
            return (1 - w[0]) ** 2 + 100 * (w[1] - w[0] ** 2) ** 2
        raise KeyError(self.name)


_PERMUTATIONS = [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]


def analytic_third(model: Analytic) -> Tensor:
    """∇³L in closed form."""
    a, b = (float(v) for v in model.w.detach()[:2])
    if model.name == "product":
        # L_aab = 2b, L_abb = 2a, L_aaa = L_bbb = 0.
        t = torch.zeros(2, 2, 2, dtype=DTYPE)
        t[0, 0, 1] = t[0, 1, 0] = t[1, 0, 0] = 2 * b
        t[0, 1, 1] = t[1, 0, 1] = t[1, 1, 0] = 2 * a
        return t
    if model.name == "cubic":
        return model.cubic.clone()
    # Rosenbrock: L_xxx = 2400x, L_xxy = −400, the rest zero.
    t = torch.zeros(2, 2, 2, dtype=DTYPE)
    t[0, 0, 0] = 2400 * a
    t[0, 0, 1] = t[0, 1, 0] = t[1, 0, 0] = -400.0
    return t


@dataclass
class ThirdOrderCase:
    name: str
    model: nn.Module
    chunks: list
    loss_fn: Callable | None
    normalization: str = "native"

    def objective(self, **kwargs) -> ProbeObjective:
        options = {"normalization": self.normalization, **kwargs}
        if self.loss_fn is None:
            return ProbeObjective(
                self.model,
                self.chunks,
                batch_loss=lambda module, batch: module(batch),
                **options,
            )
        return ProbeObjective(self.model, self.chunks, loss_fn=self.loss_fn, **options)

    def loss_of(self, theta: Tensor) -> Tensor:
        """θ ↦ L(θ) written independently of the package (plain normalization)."""
        names = [n for n, _ in self.model.named_parameters()]
        shapes = [p.shape for p in self.model.parameters()]
        sizes = [p.numel() for p in self.model.parameters()]
        params = {
            n: t.reshape(s)
            for n, t, s in zip(names, torch.split(theta, sizes), shapes, strict=True)
        }
        total = sum(chunk[0].shape[0] for chunk in self.chunks)
        value = theta.new_zeros(())
        with plain_normalization():
            for inputs, targets in self.chunks:
                if self.loss_fn is None:
                    return functional_call(self.model, params, (None,))
                outputs = functional_call(self.model, params, (inputs,))
                weight = inputs.shape[0] / total
                value = value + weight * self.loss_fn(outputs, targets)
        return value

    def point(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])

    def dense_third(self) -> Tensor:
        if isinstance(self.model, Analytic):
            return analytic_third(self.model)

        def hessian(theta: Tensor) -> Tensor:
            return torch.autograd.functional.hessian(
                self.loss_of, theta, create_graph=True, vectorize=True
            )

        return torch.autograd.functional.jacobian(hessian, self.point(), vectorize=True)

    def dense_third_vectors(self, left: Tensor, right: Tensor) -> Tensor:
        """T[left_b, right_b] per row: the dense Hessian with graph, then one grad."""
        if isinstance(self.model, Analytic):
            return torch.einsum(
                "ijk,bj,bk->bi", analytic_third(self.model), left, right
            )
        theta = self.point().requires_grad_()
        hessian = torch.autograd.functional.hessian(
            self.loss_of, theta, create_graph=True, vectorize=True
        )
        rows = [
            torch.autograd.grad(a @ hessian @ b, theta, retain_graph=True)[0]
            for a, b in zip(left, right, strict=True)
        ]
        return torch.stack(rows)

    def dense_hessian(self, theta: Tensor | None = None) -> Tensor:
        point = self.point() if theta is None else theta
        return torch.autograd.functional.hessian(self.loss_of, point)


def _data(generator, n, shape, outputs):
    inputs = torch.randn(n, *shape, generator=generator, dtype=DTYPE)
    targets = torch.randn(n, outputs, generator=generator, dtype=DTYPE)
    return inputs, targets


def _chunked(inputs, targets, size):
    return [
        (inputs[i : i + size], targets[i : i + size])
        for i in range(0, inputs.shape[0], size)
    ]


def make_third_order_case(name: str, chunk_size: int = 4) -> ThirdOrderCase:
    torch.manual_seed(7)
    generator = torch.Generator().manual_seed(11)
    if name in ("product", "cubic", "rosenbrock"):
        start = {
            "product": torch.tensor([0.9, -1.3], dtype=DTYPE),
            "cubic": torch.tensor([0.3, -0.8, 1.1], dtype=DTYPE),
            "rosenbrock": torch.tensor([-0.7, 1.4], dtype=DTYPE),
        }[name]
        dummy = (torch.zeros(1, 1, dtype=DTYPE), torch.zeros(1, 1, dtype=DTYPE))
        return ThirdOrderCase(name, Analytic(name, start), [dummy], None)
    if name == "mlp":  # 22 parameters
        model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        inputs, targets = _data(generator, 10, (2,), 2)
    elif name == "cnn":  # 19 parameters
        model = nn.Sequential(
            nn.Conv2d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(8, 1)
        ).double()
        inputs, targets = _data(generator, 10, (1, 3, 3), 1)
    elif name in ("layernorm-native", "layernorm-plain"):  # 19 parameters
        norm = nn.LayerNorm(3) if name == "layernorm-native" else PlainLayerNorm(3)
        with torch.no_grad():  # away from the initial affine map, to test it too
            norm.weight.uniform_(0.5, 1.5, generator=generator)
            norm.bias.uniform_(-0.5, 0.5, generator=generator)
        model = nn.Sequential(
            nn.Linear(2, 3), norm, nn.Tanh(), nn.Linear(3, 1)
        ).double()
        inputs, targets = _data(generator, 10, (2,), 1)
    else:
        raise KeyError(name)
    normalization = "plain" if name == "layernorm-native" else "native"
    return ThirdOrderCase(
        name,
        model,
        _chunked(inputs, targets, chunk_size),
        half_squared_error,
        normalization,
    )


THIRD_ORDER_CASES = [
    "product",
    "cubic",
    "rosenbrock",
    "mlp",
    "cnn",
    "layernorm-native",
    "layernorm-plain",
]


def finite_difference_third(
    objective: ProbeObjective, u: Tensor, v: Tensor, eps: float = 1e-4
) -> Tensor:
    """T[u, v] by central differences of exact Hessian-vector products along u."""
    from lightning_eos.curvature import HessianOperator

    theta = objective.point()
    plus = HessianOperator(objective, theta + eps * u).matvec(v)
    minus = HessianOperator(objective, theta - eps * u).matvec(v)
    return (plus - minus) / (2 * eps)
