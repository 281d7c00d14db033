"""Second-order optimizers on problems with known answers, in float64."""

import math

import pytest
import torch

from lightning_eos.optim import CubicNewton, HessianFree, NewtonCG
from tests.optim.problems import closure_for, parameter, rosenbrock, saddle, spd_matrix

MATRIX = spd_matrix(8, 1.0, 50.0)
LINEAR = torch.linspace(-1.0, 1.0, 8, dtype=torch.float64)
MINIMIZER = torch.linalg.solve(MATRIX, LINEAR)
START = MINIMIZER + torch.linspace(0.5, -0.5, 8, dtype=torch.float64)


def quadratic(x):
    return 0.5 * x @ MATRIX @ x - LINEAR @ x


def one_step(optimizer_class, **options):
    x = torch.nn.Parameter(START.clone())
    optimizer = optimizer_class([x], **options)
    optimizer.step(closure_for(optimizer, [x], quadratic))
    return x.detach(), optimizer


def test_undamped_newton_cg_step_solves_the_quadratic_to_cg_tolerance():
    tol = 1e-10
    x, optimizer = one_step(NewtonCG, damping=0.0, cg_tol=tol, max_cg_iter=50)

    initial_residual = (MATRIX @ START - LINEAR).norm()
    assert (MATRIX @ x - LINEAR).norm() <= tol * initial_residual * (1 + 1e-6)
    assert optimizer.last_stats["step_length"] == 1.0
    assert optimizer.last_stats["cg_iterations"] <= 8


DAMPING = {
    "newton-cg": (NewtonCG, {"cg_tol": 1e-12}),
    "hessian-free": (
        HessianFree,
        {"adapt_damping": False, "max_cg_iter": 8, "progress_tol": 1e-14},
    ),
}


@pytest.mark.parametrize(("optimizer_class", "options"), DAMPING.values(), ids=DAMPING)
def test_damped_step_leaves_exactly_the_error_the_damping_predicts(
    optimizer_class, options
):
    damping = 3.0
    x, _ = one_step(optimizer_class, damping=damping, **options)

    # (A + λI)(x₁ − x*) = λ(x₀ − x*): the damping keeps λ(A + λI)⁻¹ of the error.
    predicted = damping * torch.linalg.solve(
        MATRIX + damping * torch.eye(8, dtype=torch.float64), START - MINIMIZER
    )
    torch.testing.assert_close(x - MINIMIZER, predicted, rtol=1e-9, atol=1e-12)


def test_hessian_free_reduction_ratio_is_one_on_a_quadratic():
    _, optimizer = one_step(HessianFree, damping=1e-3, max_cg_iter=20)
    assert optimizer.last_stats["reduction_ratio"] == pytest.approx(1.0, abs=1e-8)
    assert optimizer.damping == pytest.approx(1e-3 / 1.5)


def plain_newton(x):
    gradient = torch.autograd.functional.jacobian(saddle, x)
    hessian = torch.autograd.functional.hessian(saddle, x)
    return x - torch.linalg.solve(hessian, gradient)


SADDLE_STARTS = {"on-the-stable-manifold": (1.0, 0.0), "generic": (1.0, 0.3)}
SADDLE_OPTIMIZERS = {
    "newton-cg": (NewtonCG, {"grad_tol": 1e-10}),
    "cubic": (CubicNewton, {}),
}


@pytest.mark.parametrize("start", SADDLE_STARTS.values(), ids=SADDLE_STARTS)
@pytest.mark.parametrize(
    ("optimizer_class", "options"), SADDLE_OPTIMIZERS.values(), ids=SADDLE_OPTIMIZERS
)
def test_escapes_the_saddle_where_newton_does_not(start, optimizer_class, options):
    newton = torch.tensor(start, dtype=torch.float64)
    for _ in range(3):
        newton = plain_newton(newton)
    assert float(newton.norm()) < 1e-12  # Newton's method stops at the saddle

    x = parameter(*start)
    optimizer = optimizer_class([x], **options)
    closure = closure_for(optimizer, [x], saddle)
    for _ in range(3):
        optimizer.step(closure)
    assert float(saddle(x.detach())) < -1.0
    assert abs(float(x.detach()[1])) > 1.0


#: Iterations to ‖∇f‖ ≤ 1e-8 from (−1.2, 1): measured 21 and 31.
ROSENBROCK = {
    "newton-cg": (NewtonCG, {"grad_tol": 1e-12, "cg_tol": 1e-10}, 25),
    "cubic": (CubicNewton, {"subproblem_tol": 1e-3}, 35),
}


@pytest.mark.parametrize(
    ("optimizer_class", "options", "budget"), ROSENBROCK.values(), ids=ROSENBROCK
)
def test_rosenbrock_from_the_classical_start(optimizer_class, options, budget):
    x = parameter(-1.2, 1.0)
    optimizer = optimizer_class([x], **options)
    closure = closure_for(optimizer, [x], rosenbrock)
    norms = []
    for _ in range(budget):
        optimizer.step(closure)
        point = x.detach().requires_grad_()
        norms.append(float(torch.autograd.grad(rosenbrock(point), point)[0].norm()))
        if norms[-1] <= 1e-8:
            break

    assert norms[-1] <= 1e-8, norms
    torch.testing.assert_close(x.detach(), torch.ones(2, dtype=torch.float64))


CUBIC_1D = {
    "convex": (1.0, 2.0, 1.0),
    "negative-curvature": (-3.0, -1.0, 0.5),
    "flat": (2.0, 0.0, 3.0),
    "strong-regularization": (1e-3, 5.0, 1e3),
}


@pytest.mark.parametrize(("g", "h", "sigma"), CUBIC_1D.values(), ids=CUBIC_1D)
def test_exact_one_dimensional_cubic_step(g, h, sigma):
    x = parameter(0.0)
    optimizer = CubicNewton([x], sigma=sigma)
    optimizer.step(
        closure_for(optimizer, [x], lambda x: g * x[0] + 0.5 * h * x[0] ** 2)
    )

    expected = (
        -math.copysign(1.0, g)
        * 2
        * abs(g)
        / (h + math.sqrt(h * h + 4 * sigma * abs(g)))
    )
    assert float(x.detach()[0]) == pytest.approx(expected, rel=1e-14)
    assert optimizer.last_stats["accepted"] == 1.0


def test_rejected_cubic_step_keeps_the_parameters_and_raises_sigma():
    # Negative curvature and a tiny σ: the model's step runs into the quartic wall.
    x = parameter(0.1)
    optimizer = CubicNewton([x], sigma=1e-6, sigma_increase=4.0)
    optimizer.step(closure_for(optimizer, [x], lambda x: -(x[0] ** 2) + x[0] ** 4))

    assert optimizer.last_stats["accepted"] == 0.0
    assert optimizer.last_stats["ratio"] < 0.1
    assert float(x.detach()[0]) == 0.1
    assert optimizer.sigma == pytest.approx(4e-6)


def test_cubic_step_scaled_by_lr():
    g, h, sigma, lr = 1.0, 2.0, 1.0, 0.5
    x = parameter(0.0)
    optimizer = CubicNewton([x], sigma=sigma, lr=lr)
    optimizer.step(
        closure_for(optimizer, [x], lambda x: g * x[0] + 0.5 * h * x[0] ** 2)
    )

    s = -2 * g / (h + math.sqrt(h * h + 4 * sigma * g))
    assert float(x.detach()[0]) == pytest.approx(lr * s, rel=1e-14)
    model = lr * g * s + 0.5 * lr**2 * h * s**2 + sigma / 3 * abs(lr * s) ** 3
    assert optimizer.last_stats["model_decrease"] == pytest.approx(-model, rel=1e-12)
