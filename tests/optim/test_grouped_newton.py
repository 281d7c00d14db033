import pytest
import torch
from torch import nn

from lightning_eos.optim import GroupedNewton
from lightning_eos.optim.grouped_newton import minimize_anisotropic_cubic
from tests.optim.problems import closure_for, spd_matrix

MATRIX = spd_matrix(5, 0.5, 10.0, seed=3)
LINEAR = torch.linspace(-1.0, 2.0, 5, dtype=torch.float64)


def test_one_group_on_a_quadratic_takes_the_exact_newton_step_along_the_gradient():
    x = nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 0.3, 1.5], dtype=torch.float64))
    start = x.detach().clone()
    optimizer = GroupedNewton([x], grouping="single")
    optimizer.step(
        closure_for(optimizer, [x], lambda x: 0.5 * x @ MATRIX @ x - LINEAR @ x)
    )

    g = MATRIX @ start - LINEAR
    t = float(g @ g / (g @ MATRIX @ g))  # argmin_t L(x − t g)
    torch.testing.assert_close(x.detach(), start - t * g, rtol=1e-13, atol=1e-14)
    assert optimizer.last_stats["lr_0"] == pytest.approx(t, rel=1e-13)


C = torch.tensor([0.5, -1.0, 0.8, 0.3, -0.2], dtype=torch.float64)


def polynomial(a, b):
    x = torch.cat([a, b])
    return (C * x**3).sum() + 0.5 * x @ MATRIX @ x + (x**4).sum() / 4


def test_learning_rates_solve_the_model_built_from_dense_derivatives():
    a = nn.Parameter(torch.tensor([0.4, -0.6], dtype=torch.float64))
    b = nn.Parameter(torch.tensor([0.2, 0.9, -0.3], dtype=torch.float64))
    start = torch.cat([a, b]).detach()
    lam = 0.5
    optimizer = GroupedNewton([a, b], regularization=lam, adaptive=False)
    optimizer.step(closure_for(optimizer, [a, b], polynomial))

    g = torch.autograd.functional.jacobian(lambda x: polynomial(x[:2], x[2:]), start)
    d = torch.stack(
        [
            torch.cat([-g[:2], torch.zeros(3, dtype=torch.float64)]),
            torch.cat([torch.zeros(2, dtype=torch.float64), -g[2:]]),
        ],
        dim=1,
    )

    def phi(t):
        x = start + d @ t
        return polynomial(x[:2], x[2:])

    t0 = torch.zeros(2, dtype=torch.float64)
    reduced_g = torch.autograd.functional.jacobian(phi, t0)
    reduced_h = torch.autograd.functional.hessian(phi, t0)
    third = torch.autograd.functional.jacobian(
        lambda t: torch.autograd.functional.hessian(phi, t, create_graph=True), t0
    )
    diagonal = torch.stack([third[0, 0, 0], third[1, 1, 1]])
    t, _, solved = minimize_anisotropic_cubic(
        reduced_g, reduced_h, (lam * diagonal.abs()) ** (1 / 3)
    )
    # The paper's fixed point: t = -(H + ½λ‖Dt‖D²)⁻¹ g, D = diag(|D̄|^{1/3}).
    D2 = torch.diag(diagonal.abs() ** (2 / 3))
    radius = float((diagonal.abs() ** (1 / 3) * t).norm())
    fixed_point = -torch.linalg.solve(reduced_h + 0.5 * lam * radius * D2, reduced_g)
    torch.testing.assert_close(t, fixed_point, rtol=1e-9, atol=1e-12)

    assert solved
    stats = optimizer.last_stats
    rates = torch.tensor([stats["lr_0"], stats["lr_1"]], dtype=torch.float64)
    torch.testing.assert_close(rates, t, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        torch.cat([a, b]).detach(), start + d @ t, rtol=1e-12, atol=1e-13
    )
    assert optimizer.counters["hvps"] == 2 and optimizer.counters["third_order"] == 2


def test_safeguard_refuses_a_step_the_model_overestimates():
    # Negative curvature and a tiny λ_int: the reduced step runs into the quartic.
    x = nn.Parameter(torch.tensor([0.1], dtype=torch.float64))
    optimizer = GroupedNewton([x], regularization=1e-6)
    optimizer.step(closure_for(optimizer, [x], lambda x: (-(x**2) + x**4).sum()))

    assert optimizer.last_stats["accepted"] == 0.0
    assert float(x.detach()[0]) == 0.1
    assert optimizer.regularization == pytest.approx(4e-6)


REFUSED = {
    "batchnorm": nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)),
    "layernorm": nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3)),
}


@pytest.mark.parametrize("module", REFUSED.values(), ids=REFUSED)
def test_layers_with_wrong_third_derivatives_are_refused(module):
    with pytest.raises(ValueError, match="third"):
        GroupedNewton(module.parameters()).attach(module)
