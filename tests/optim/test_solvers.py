"""The inner solvers: capped and truncated CG, cubic subproblems, the small cubic."""

import pytest
import torch

from lightning_eos.optim._cg import capped_cg, truncated_cg
from lightning_eos.optim._cubic_model import (
    gradient_descent_cubic,
    krylov_cubic,
    minimize_small_cubic,
)
from lightning_eos.optim.grouped_newton import minimize_anisotropic_cubic
from tests.optim.problems import spd_matrix


def symmetric(eigenvalues, seed=0):
    n = len(eigenvalues)
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def vector(n, seed=1):
    return torch.randn(
        n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


def test_capped_cg_solves_a_positive_definite_system():
    H, g = spd_matrix(10, 0.5, 20.0), vector(10)
    result = capped_cg(lambda v: H @ v, g, damping=0.1, tol=1e-10, max_iter=30)

    assert result.kind == "solution"
    residual = (H + 0.1 * torch.eye(10, dtype=torch.float64)) @ result.direction + g
    assert float(residual.norm()) <= 1e-10 * float(g.norm())
    assert result.products == result.iterations


@pytest.mark.parametrize("damping", [0.0, 0.4], ids=["undamped", "damped"])
def test_capped_cg_returns_curvature_below_minus_half_the_damping(damping):
    H, g = symmetric([-3.0, 1.0, 2.0, 5.0, 8.0]), vector(5)
    result = capped_cg(lambda v: H @ v, g, damping=damping, tol=1e-12, max_iter=20)

    assert result.kind == "negative_curvature"
    d = result.direction
    rayleigh = float(d @ H @ d / (d @ d))
    assert result.curvature == pytest.approx(rayleigh, rel=1e-10)
    assert rayleigh < -damping / 2


def test_truncated_cg_model_value_and_warm_start():
    H, g = spd_matrix(12, 1.0, 30.0), vector(12)
    cold = truncated_cg(
        lambda v: H @ v, g, damping=0.5, x0=None, max_iter=12, progress_tol=1e-14
    )
    solution = torch.linalg.solve(H + 0.5 * torch.eye(12, dtype=torch.float64), -g)
    torch.testing.assert_close(cold.direction, solution, rtol=1e-8, atol=1e-10)
    x = cold.direction
    assert cold.model == pytest.approx(
        float(0.5 * x @ (H @ x + 0.5 * x) + g @ x), rel=1e-10
    )

    warm = truncated_cg(
        lambda v: H @ v, g, damping=0.5, x0=solution, max_iter=12, progress_tol=1e-14
    )
    assert warm.iterations <= 1  # started at the answer


def optimality(T, b, sigma, y):
    mu = sigma * float(y.norm())
    stationary = (T + mu * torch.eye(len(b), dtype=torch.float64)) @ y + b
    lowest = float(torch.linalg.eigvalsh(T)[0])
    return float(stationary.norm()), mu + lowest


SMALL_CUBIC = {
    "indefinite": ([-2.0, 0.5, 3.0, 7.0], 1),
    "positive-definite": ([0.5, 1.0, 3.0, 7.0], 2),
    "hard-case": ([-2.0, 0.5, 3.0, 7.0], None),
}


@pytest.mark.parametrize(("eigenvalues", "seed"), SMALL_CUBIC.values(), ids=SMALL_CUBIC)
def test_small_cubic_satisfies_the_global_optimality_conditions(eigenvalues, seed):
    sigma = 0.7
    T = torch.diag(torch.tensor(eigenvalues, dtype=torch.float64))
    b = (
        vector(4, seed)
        if seed is not None
        else torch.tensor([0.0, 0.1, 0.2, 0.1], dtype=torch.float64)
    )
    y, mu = minimize_small_cubic(T, b, sigma)

    stationarity, slack = optimality(T, b, sigma, y)
    assert stationarity <= 1e-12
    assert slack >= -1e-12  # T + μI ⪰ 0: the global minimizer
    assert mu == pytest.approx(sigma * float(y.norm()), rel=1e-12)


SUBPROBLEM = {"krylov": "krylov", "gradient-descent": "gradient_descent"}


@pytest.mark.parametrize("solver", SUBPROBLEM.values(), ids=SUBPROBLEM)
def test_subproblem_solvers_reach_the_global_minimizer(solver):
    sigma = 2.0
    H, g = symmetric([-1.5, -0.2, 0.3, 1.0, 2.0, 4.0], seed=3), vector(6, seed=4)
    exact, _ = minimize_small_cubic(H, g, sigma)
    generator = torch.Generator().manual_seed(0)
    if solver == "krylov":
        result = krylov_cubic(
            lambda v: H @ v, g, sigma, tol=1e-12, max_iter=6, generator=generator
        )
        tolerance = 1e-10
    else:
        result = gradient_descent_cubic(
            lambda v: H @ v,
            g,
            sigma,
            tol=1e-9,
            max_iter=20000,
            perturbation=1e-9,
            generator=generator,
        )
        tolerance = 1e-6

    torch.testing.assert_close(result.step, exact, rtol=tolerance, atol=tolerance)
    s = result.step
    model = float(g @ s + 0.5 * s @ H @ s + sigma / 3 * s.norm() ** 3)
    assert result.model_decrease == pytest.approx(-model, rel=1e-9)


def test_krylov_cubic_finds_negative_curvature_outside_an_invariant_subspace():
    # g is an eigenvector: its Krylov space is one-dimensional and positively curved.
    H = torch.diag(torch.tensor([2.0, -2.0], dtype=torch.float64))
    g = torch.tensor([2.0, 0.0], dtype=torch.float64)
    result = krylov_cubic(
        lambda v: H @ v,
        g,
        1.0,
        tol=1e-12,
        max_iter=10,
        generator=torch.Generator().manual_seed(0),
    )
    exact, _ = minimize_small_cubic(H, g, 1.0)
    assert abs(float(result.step[1])) == pytest.approx(abs(float(exact[1])), rel=1e-12)
    assert abs(float(result.step[1])) > 1.0


def test_anisotropic_cubic_is_stationary_and_detects_unbounded_models():
    H = symmetric([-1.0, 0.5, 2.0], seed=5)
    g, w = vector(3, seed=6), torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64)
    t, decrease, solved = minimize_anisotropic_cubic(g, H, w)
    assert solved
    gradient = torch.autograd.functional.jacobian(
        lambda x: g @ x + 0.5 * x @ H @ x + (w * x).norm() ** 3 / 6, t
    )
    assert float(gradient.norm()) <= 1e-10 * float(g.norm())
    assert decrease == pytest.approx(
        -float(g @ t + 0.5 * t @ H @ t + (w * t).norm() ** 3 / 6)
    )
    # The minimizer is global: no other stationary point of this model is lower.
    for seed in range(20):
        other = t + torch.randn(
            3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
        )
        assert (
            float(g @ other + 0.5 * other @ H @ other + (w * other).norm() ** 3 / 6)
            >= -decrease - 1e-12
        )

    _, _, solved = minimize_anisotropic_cubic(g, H, torch.zeros(3, dtype=torch.float64))
    assert not solved
