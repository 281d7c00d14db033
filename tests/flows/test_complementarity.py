"""The complementarity problem of Σ, on synthetic problems with known answers."""

import math

import numpy as np
import pytest
import torch

from lightning_eos.flows import ComplementarityError, solve_sdcp
from lightning_eos.flows.complementarity import _basis, smat, solve_svec, svec


def random_operator(k: int, rng: np.random.Generator, rank: int | None = None):
    """A positive semidefinite β on symmetric k × k matrices, as a (k,k,k,k) tensor."""
    n = k * (k + 1) // 2
    factor = rng.standard_normal((n, 2 * n if rank is None else rank))
    q = factor @ factor.T / factor.shape[1]
    basis = _basis(k)
    return np.einsum("pab,pq,qij->abij", basis, q, basis)


def known_problem(k: int, active: int, degenerate: int = 0, seed: int = 0):
    """α = Z − β[S] for S ⪰ 0 of rank `active` and Z ⪰ 0 on its complement.

    `degenerate` directions of the complement get Z = 0 as well: they sit on the
    verge of entering (zero weight and zero slack).
    """
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((k, k)))
    weights = rng.uniform(0.5, 2.0, active)
    slacks = rng.uniform(0.5, 2.0, k - active)
    slacks[:degenerate] = 0.0
    sigma = basis[:, :active] @ np.diag(weights) @ basis[:, :active].T
    slack = basis[:, active:] @ np.diag(slacks) @ basis[:, active:].T
    beta = random_operator(k, rng)
    alpha = slack - np.einsum("abij,ij->ab", beta, sigma)
    return torch.tensor(alpha), torch.tensor(beta), sigma, slack


CASES = [
    # (k, rank of Σ, directions with zero weight and zero slack)
    (1, 1, 0),
    (1, 0, 0),
    (2, 1, 0),
    (3, 3, 0),
    (4, 2, 1),
    (8, 8, 0),
    (8, 5, 0),
    (8, 1, 2),
    (10, 6, 1),
    (12, 7, 0),
]


@pytest.mark.parametrize(
    ("k", "active", "degenerate"),
    CASES,
    ids=[f"k{k}-rank{r}-degenerate{d}" for k, r, d in CASES],
)
def test_recovers_the_known_solution(k, active, degenerate):
    alpha, beta, sigma, slack = known_problem(k, active, degenerate, seed=k + active)
    solution = solve_sdcp(alpha, beta)

    np.testing.assert_allclose(solution.sigma.numpy(), sigma, atol=1e-9)
    np.testing.assert_allclose(solution.slack.numpy(), slack, atol=1e-9)
    assert solution.rank == active
    assert solution.residual < 1e-10
    # Σ has exactly zero weight off its support: its eigenvalues there are 0.
    values = np.linalg.eigvalsh(solution.sigma.numpy())
    assert np.all(values[: k - active] > -1e-12)
    assert np.all(np.abs(values[: k - active]) < 1e-9)


def test_one_direction_is_the_closed_form():
    # With one direction β[S] = ½‖∇S‖² s and α = ⟨∇L, ∇S⟩: σ² = max(0, −2α/‖∇S‖²).
    grad_s = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    for grad_l in ([1.0, 2.0, 0.5], [-1.0, -2.0, 3.0]):
        grad_l = torch.tensor(grad_l, dtype=torch.float64)
        alpha = (grad_l @ grad_s).reshape(1, 1)
        beta = (0.5 * grad_s @ grad_s).reshape(1, 1, 1, 1)
        expected = max(0.0, -2 * float(grad_l @ grad_s) / float(grad_s @ grad_s))
        assert solve_sdcp(alpha, beta).sigma.item() == pytest.approx(
            expected, rel=1e-12
        )


def test_diagonal_problem_gives_zero_weight_to_stable_directions():
    # Decoupled directions: σ_i = max(0, −α_i/β_i) each.
    alpha = torch.diag(torch.tensor([-2.0, 1.0, -0.5, 0.0, 3.0], dtype=torch.float64))
    beta = torch.zeros(5, 5, 5, 5, dtype=torch.float64)
    for i, b in enumerate([1.0, 2.0, 0.25, 1.0, 1.0]):
        beta[i, i, i, i] = b
    solution = solve_sdcp(alpha, beta)
    expected = torch.diag(torch.tensor([2.0, 0.0, 2.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(solution.sigma, expected, atol=1e-12, rtol=0)
    assert solution.rank == 2


def test_stable_alpha_gives_zero_without_iterating():
    alpha = torch.eye(3, dtype=torch.float64)
    beta = torch.tensor(random_operator(3, np.random.default_rng(1)))
    solution = solve_sdcp(alpha, beta)
    assert solution.method == "zero"
    assert torch.count_nonzero(solution.sigma) == 0


def test_rank_deficient_operator():
    # Fewer third-order vectors than unknowns (a two-parameter model with k = 2):
    # β has rank 2 of 3, and the solution is still found.
    k = 2
    rng = np.random.default_rng(3)
    beta = random_operator(k, rng, rank=2)
    sigma = np.array([[1.0, 0.2], [0.2, 0.5]])
    alpha = -np.einsum("abij,ij->ab", beta, sigma)
    solution = solve_sdcp(torch.tensor(alpha), torch.tensor(beta))
    assert solution.residual < 1e-10
    # Any solution makes the slack vanish (β[S] = −α on its range).
    np.testing.assert_allclose(solution.slack.numpy(), 0.0, atol=1e-9)


def test_unbounded_problem_is_reported():
    # β = 0 and a negative direction: no Σ can stabilize it.
    alpha = -torch.eye(2, dtype=torch.float64)
    with pytest.raises(ComplementarityError, match="no solution"):
        solve_sdcp(alpha, torch.zeros(2, 2, 2, 2, dtype=torch.float64))
    # β ≠ 0 but blind to one negative direction.
    beta = torch.zeros(2, 2, 2, 2, dtype=torch.float64)
    beta[0, 0, 0, 0] = 1.0
    with pytest.raises(ComplementarityError, match="no solution"):
        solve_sdcp(torch.diag(torch.tensor([-1.0, -1.0])).double(), beta)


def test_warm_start_reaches_the_same_solution():
    alpha, beta, sigma, _ = known_problem(6, 3, seed=11)
    basis = _basis(6)
    c = svec(alpha.numpy())
    q = np.einsum("pab,abij,qij->pq", basis, beta.numpy(), basis)
    warm = svec(sigma) * 1.1 + 0.01
    x, method = solve_svec(c, q, 6, warm=warm)
    assert method in ("newton", "interior")
    np.testing.assert_allclose(smat(x, 6), sigma, atol=1e-9)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="must be"):
        solve_sdcp(torch.zeros(2, 2), torch.zeros(3, 3, 3, 3))


def test_scale_invariance():
    # Scaling α by a and β by b scales Σ by a/b.
    alpha, beta, sigma, _ = known_problem(4, 2, seed=5)
    solution = solve_sdcp(alpha * 1e-6, beta * 1e4)
    np.testing.assert_allclose(solution.sigma.numpy(), sigma * 1e-10, atol=1e-18)
    assert math.isclose(float(solution.sigma.trace()), float(np.trace(sigma)) * 1e-10)


def test_directions_enter_and_leave_along_a_path():
    # Along α(s), eigen-direction i of a fixed basis has r_i(s): weight max(r, 0) and
    # slack max(−r, 0). Directions enter (r rises through 0) and leave (r falls
    # through 0); each problem is solved warm-started from the previous solution.
    k = 8
    rng = np.random.default_rng(21)
    basis, _ = np.linalg.qr(rng.standard_normal((k, k)))
    beta = random_operator(k, rng)
    offsets = np.linspace(-1.0, 1.0, k)
    slopes = np.where(np.arange(k) % 2 == 0, 1.0, -1.0)
    quadratic = np.einsum("pab,abij,qij->pq", _basis(k), beta, _basis(k))
    warm = None
    for s in np.linspace(-1.0, 1.0, 41):
        r = offsets * slopes + 0.6 * s * slopes
        sigma = basis @ np.diag(np.maximum(r, 0)) @ basis.T
        slack = basis @ np.diag(np.maximum(-r, 0)) @ basis.T
        alpha = slack - np.einsum("abij,ij->ab", beta, sigma)
        x, _ = solve_svec(svec(alpha), quadratic, k, warm=warm)
        np.testing.assert_allclose(smat(x, k), sigma, atol=1e-9)
        warm = x
    # Along the path directions entered (even i) and left (odd i).
    first = offsets * slopes - 0.6 * slopes > 0
    last = offsets * slopes + 0.6 * slopes > 0
    assert np.any(~first & last) and np.any(first & ~last)
