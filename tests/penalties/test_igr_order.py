"""Backward error analysis on ½λw²: one GD step follows the flow of L + (η/4)‖∇L‖²."""

import math

import pytest
import torch
from torch import nn

from lightning_eos.curvature import HessianOperator, ProbeObjective
from lightning_eos.penalties import GradientNormPenalty

LAMBDA = 2.0


class Scalar(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([value], dtype=torch.float64))


def quadratic(module: nn.Module, batch) -> torch.Tensor:
    return 0.5 * LAMBDA * module.w.square().sum()


def objective_at(w: torch.Tensor) -> ProbeObjective:
    return ProbeObjective(Scalar(float(w)), [torch.zeros(1, 1)], batch_loss=quadratic)


def gradient_descent_step(eta: float, w0: float) -> float:
    module = Scalar(w0)
    optimizer = torch.optim.SGD(module.parameters(), lr=eta)
    quadratic(module, None).backward()
    optimizer.step()
    return module.w.item()


def flow(eta: float, w0: float, penalized: bool, substeps: int = 40) -> float:
    """RK4 on dw/dt = −∇(L + P)(w) over time η, with ∇L and ∇P from the package."""

    def velocity(w: torch.Tensor) -> torch.Tensor:
        objective = objective_at(w)
        field = HessianOperator(objective).gradient()
        if penalized:
            field = field + GradientNormPenalty(eta).evaluate(objective).gradient
        return -field

    w, h = torch.tensor([w0], dtype=torch.float64), eta / substeps
    for _ in range(substeps):
        k1 = velocity(w)
        k2 = velocity(w + h / 2 * k1)
        k3 = velocity(w + h / 2 * k2)
        k4 = velocity(w + h * k3)
        w = w + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return w.item()


@pytest.mark.parametrize("w0", [1.0, -0.3])
def test_one_step_matches_the_modified_flow_to_third_order(w0):
    errors = {"plain": [], "modified": []}
    etas = (0.02, 0.01)  # ηλ = 0.04 and 0.02
    for eta in etas:
        step = gradient_descent_step(eta, w0)
        errors["plain"].append(abs(step - flow(eta, w0, penalized=False)))
        errors["modified"].append(abs(step - flow(eta, w0, penalized=True)))

    plain_order = math.log2(errors["plain"][0] / errors["plain"][1])
    modified_order = math.log2(errors["modified"][0] / errors["modified"][1])
    assert plain_order == pytest.approx(2, abs=0.05)
    assert modified_order == pytest.approx(3, abs=0.1)
    # Leading terms: (1 − x) − e^{−x} = −x²/2 + …, (1 − x) − e^{−x − x²/2} = x³/3 + …
    for eta, plain, modified in zip(
        etas, errors["plain"], errors["modified"], strict=True
    ):
        x = eta * LAMBDA
        assert plain == pytest.approx(x**2 / 2 * abs(w0), rel=0.05)
        assert modified == pytest.approx(x**3 / 3 * abs(w0), rel=0.1)
