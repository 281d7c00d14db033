r"""The semidefinite complementarity problem that gives the central flow its Σ.

Given a symmetric :math:`k \times k` matrix :math:`\alpha` and a linear map
:math:`\beta` on symmetric matrices that is positive semidefinite
(:math:`\langle S, \beta[S]\rangle \ge 0`), find :math:`S` with

.. math::
    S \succeq 0, \qquad Z = \alpha + \beta[S] \succeq 0, \qquad \langle S, Z\rangle = 0.

These are exactly the optimality conditions of the convex quadratic program

.. math::
    \min_{S \succeq 0}\; \langle \alpha, S\rangle + \tfrac12 \langle S, \beta[S]\rangle,

which is how it is solved here, on the :math:`k(k+1)/2` coordinates of :math:`S`
in an orthonormal basis of the symmetric matrices. Two cases are answered at once:
:math:`\alpha \succeq 0` (then :math:`S = 0`), and a positive definite solution of
:math:`\beta[S] = -\alpha` (then :math:`Z = 0`). Otherwise semismooth Newton
iterations on the natural map :math:`S = \Pi_+(S - Z(S))` (:math:`\Pi_+` the
projection onto the positive semidefinite cone) converge quadratically from a warm
start or from :math:`\Pi_+(-\alpha)`, and reach the solution to round-off, with
exact zeros on the directions of zero weight. When they fail, a log-barrier
interior-point method (Newton steps with backtracking on the central path) supplies
a start close to the solution.

Eigenvalues of :math:`S` below ``rank_tol`` times its largest one are counted as
zero in :attr:`ComplementaritySolution.rank`: those are directions given zero weight.

References:
    Cohen, Damian, Talwalkar, Kolter, Lee (2025). Understanding optimization in deep
    learning with central flows. ICLR. (The problem, Section 3 and Appendix.)
    Sun, Sun (2002). Semismooth homeomorphisms and strong stability of semidefinite
    and Lorentz complementarity problems. Mathematics of Operations Research.
    Boyd, Vandenberghe (2004). Convex Optimization, §11.3 (the barrier method).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

_SQRT2 = math.sqrt(2.0)


class ComplementarityError(RuntimeError):
    """The complementarity problem has no solution (its program is unbounded)."""


@dataclass
class ComplementaritySolution:
    r"""Result of :func:`solve_sdcp`.

    Attributes:
        sigma: The solution :math:`S` (float64, ``k × k``).
        slack: :math:`Z = \\alpha + \\beta[S]`.
        rank: Number of eigenvalues of :math:`S` above ``rank_tol`` times the largest.
        residual: The largest violation of the conditions, relative to the scale of
            the problem: of :math:`S \\succeq 0`, :math:`Z \\succeq 0` and
            :math:`\\langle S, Z\\rangle = 0`.
        method: ``"zero"``, ``"interior"`` (full rank, closed form), or ``"barrier"``.
    """

    sigma: Tensor
    slack: Tensor
    rank: int
    residual: float
    method: str


# -- symmetric-matrix coordinates ----------------------------------------------------


@lru_cache(maxsize=64)
def _basis(k: int) -> np.ndarray:
    """Orthonormal basis ``E_p`` of symmetric ``k × k`` matrices, in ``triu`` order."""
    rows, cols = np.triu_indices(k)
    basis = np.zeros((len(rows), k, k))
    for p, (i, j) in enumerate(zip(rows, cols, strict=True)):
        if i == j:
            basis[p, i, i] = 1.0
        else:
            basis[p, i, j] = basis[p, j, i] = 1.0 / _SQRT2
    return basis


def svec_scale(k: int) -> np.ndarray:
    r"""Factors ``1`` (diagonal) and ``√2`` (off-diagonal) of the ``triu`` pairs.

    With them, :math:`\\mathrm{svec}(S)_p = s_p S_{ij}` and
    :math:`\\langle S, T\\rangle = \\mathrm{svec}(S) \\cdot \\mathrm{svec}(T)`.
    """
    rows, cols = np.triu_indices(k)
    return np.where(rows == cols, 1.0, _SQRT2)


def svec(matrix: np.ndarray) -> np.ndarray:
    """Coordinates of a symmetric matrix in the orthonormal basis of :func:`_basis`."""
    k = matrix.shape[-1]
    rows, cols = np.triu_indices(k)
    return matrix[..., rows, cols] * svec_scale(k)


def smat(vector: np.ndarray, k: int) -> np.ndarray:
    """The symmetric matrix with coordinates ``vector`` (inverse of :func:`svec`)."""
    return np.tensordot(vector, _basis(k), axes=(-1, 0))


# -- the solver ---------------------------------------------------------------------


def solve_sdcp(
    alpha: Tensor,
    beta: Tensor,
    *,
    tol: float = 1e-12,
    rank_tol: float = 1e-7,
) -> ComplementaritySolution:
    r"""Find :math:`S \succeq 0` with :math:`Z = \alpha + \beta[S] \succeq 0`, SZ = 0.

    Args:
        alpha: Symmetric ``(k, k)``.
        beta: ``(k, k, k, k)`` with :math:`\beta[S]_{ab} = \sum_{ij}
            \beta_{abij} S_{ij}`, symmetric in ``(a, b)``, in ``(i, j)`` and between
            the pairs, and positive semidefinite on symmetric matrices.
        tol: Residual of the natural map at which Newton's method stops, relative
            to the scale of the problem.
        rank_tol: Relative size below which an eigenvalue of :math:`S` counts as 0.

    Returns:
        The :class:`ComplementaritySolution`.

    Raises:
        ValueError: If the shapes do not match.
        ComplementarityError: If there is no solution: some :math:`D \succeq 0` has
            :math:`\beta[D] = 0` and :math:`\langle\alpha, D\rangle < 0`.

    Example:
        >>> import torch
        >>> alpha = torch.tensor([[-1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> beta = torch.zeros(2, 2, 2, 2, dtype=torch.float64)
        >>> beta[0, 0, 0, 0] = beta[1, 1, 1, 1] = 0.5
        >>> solution = solve_sdcp(alpha, beta)  # σ₁ = −α₁/β₁ = 2; e₂ is stable
        >>> [round(v, 12) for v in solution.sigma.diag().tolist()], solution.rank
        ([2.0, 0.0], 1)
    """
    k = alpha.shape[0]
    if alpha.shape != (k, k) or beta.shape != (k, k, k, k):
        raise ValueError(
            "`alpha` must be (k, k) and `beta` (k, k, k, k); got "
            f"{tuple(alpha.shape)} and {tuple(beta.shape)}."
        )
    a = alpha.detach().double().cpu().numpy()
    b = beta.detach().double().cpu().numpy()
    c = svec((a + a.T) / 2)
    basis = _basis(k)
    # Q_pq = ⟨E_p, β[E_q]⟩, symmetrized against round-off.
    images = np.einsum("abij,qij->qab", b, basis)
    quadratic = np.einsum("pab,qab->pq", basis, images)
    quadratic = (quadratic + quadratic.T) / 2
    x, method = solve_svec(c, quadratic, k, tol=tol)
    return _solution(x, c, quadratic, k, method, rank_tol)


def solve_svec(
    c: np.ndarray,
    quadratic: np.ndarray,
    k: int,
    *,
    tol: float = 1e-12,
    warm: np.ndarray | None = None,
) -> tuple[np.ndarray, str]:
    r"""Minimize :math:`c \cdot x + \frac12 x^\top Q x` subject to :math:`S \succeq 0`.

    The coordinate form of :func:`solve_sdcp` (``x = svec(S)``, ``c = svec(α)``,
    :math:`Q_{pq} = \langle E_p, \beta[E_q]\rangle`), for callers that build
    :math:`Q` directly.

    Args:
        c: Coordinates of α.
        quadratic: Q, symmetric positive semidefinite.
        k: The size of the matrices.
        tol: Residual of the natural-map equation at which Newton's method stops,
            relative to the scale of the problem.
        warm: A previous solution to start Newton's method from (for example the
            one of the previous substep of a flow); the barrier is only run when
            Newton's method from there fails.

    Returns:
        The minimizer and the method that found it: ``"zero"``, ``"interior"``,
        ``"newton"`` (from ``warm`` or from the projection of :math:`-\\alpha`) or
        ``"barrier"`` (Newton's method from a point of the central path).

    Raises:
        ComplementarityError: If the program is unbounded below.
    """
    n = c.shape[0]
    if n == 0:
        return np.zeros(0), "zero"
    c_norm = float(np.linalg.norm(c))
    if c_norm == 0.0 or np.linalg.eigvalsh(smat(c, k))[0] >= 0.0:
        return np.zeros(n), "zero"
    q_scale = float(np.trace(quadratic)) / n
    if not q_scale > 0.0:
        raise ComplementarityError(
            "The complementarity problem has no solution: β = 0 while α has a "
            "negative eigenvalue (the curvature cannot be reduced along it)."
        )
    # Normalized problem: ĉ = c/‖c‖, Q̂ = Q/q, x = x̂ ‖c‖/q.
    c_hat, q_hat = c / c_norm, quadratic / q_scale
    unit = c_norm / q_scale

    interior = _full_rank(c_hat, q_hat, k)
    if interior is not None:
        return interior * unit, "interior"
    starts = [svec(_project(smat(-c_hat, k))[0])]
    if warm is not None and warm.shape == c.shape:
        starts.insert(0, warm / unit)
    for start in starts:
        solution = _newton(start, c_hat, q_hat, k, tol)
        if solution is not None:
            return solution * unit, "newton"
    # Newton's method may cycle far from the solution: start it on the central path.
    start = _barrier(c_hat, q_hat, k, 1e-4)
    solution = _newton(start, c_hat, q_hat, k, tol)
    if solution is None:
        solution = _barrier(c_hat, q_hat, k, tol)
    return solution * unit, "barrier"


def _full_rank(c: np.ndarray, q: np.ndarray, k: int) -> np.ndarray | None:
    """The solution with Z = 0, if it exists and is positive definite."""
    try:
        factor = np.linalg.cholesky(q)
    except np.linalg.LinAlgError:
        return None
    x = -np.linalg.solve(factor.T, np.linalg.solve(factor, c))
    if np.linalg.eigvalsh(smat(x, k))[0] > 1e-9 * max(1.0, np.abs(x).max()):
        return x
    return None


def _project(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Projection onto the PSD cone, with the eigenpairs it came from."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.maximum(values, 0.0)) @ vectors.T, values, vectors


def _natural_map(x: np.ndarray, c: np.ndarray, q: np.ndarray, k: int):
    """``F(x) = x − svec(Π₊(smat(x − (c + Qx))))``: zero exactly at a solution."""
    projected, values, vectors = _project(smat(x - c - q @ x, k))
    return x - svec(projected), values, vectors


def _newton(
    x: np.ndarray, c: np.ndarray, q: np.ndarray, k: int, tol: float
) -> np.ndarray | None:
    """Semismooth Newton on the natural map, with a backtracking line search.

    The derivative of the projection at ``X = V diag(λ) Vᵀ`` is
    ``H ↦ V (Ω ∘ VᵀHV) Vᵀ`` with the divided differences
    ``Ω_ij = (λ_i⁺ − λ_j⁺)/(λ_i − λ_j)`` (Sun and Sun 2002). Returns ``None`` when
    it does not converge, so that the caller can start it elsewhere.
    """
    basis = _basis(k)
    identity = np.eye(len(x))
    residual, values, vectors = _natural_map(x, c, q, k)
    norm = float(np.linalg.norm(residual))
    for _ in range(30):
        if norm <= tol * (1.0 + float(np.abs(x).max())):
            projected = _project(smat(x, k))[0]
            return svec(projected)
        positive = np.maximum(values, 0.0)
        gap = values[:, None] - values[None, :]
        same = np.abs(gap) <= 1e-14 * (1.0 + np.abs(values).max())
        omega = np.where(
            same,
            (values[:, None] > 0).astype(float),
            (positive[:, None] - positive[None, :]) / np.where(same, 1.0, gap),
        )
        rotated = np.einsum("ai,pab,bj->pij", vectors, basis, vectors)
        derivative = svec(
            np.einsum("ai,pij,bj->pab", vectors, omega * rotated, vectors)
        )
        jacobian = identity - derivative.T @ (identity - q)
        try:
            step = np.linalg.solve(jacobian, -residual)
        except np.linalg.LinAlgError:
            step = np.linalg.lstsq(jacobian, -residual, rcond=None)[0]
        size = 1.0
        while size > 1e-4:
            trial = x + size * step
            trial_residual, trial_values, trial_vectors = _natural_map(trial, c, q, k)
            trial_norm = float(np.linalg.norm(trial_residual))
            if trial_norm <= (1.0 - 1e-4 * size) * norm:
                break
            size *= 0.5
        else:
            return None
        x, residual, values, vectors, norm = (
            trial,
            trial_residual,
            trial_values,
            trial_vectors,
            trial_norm,
        )
    return None


def _barrier(c: np.ndarray, q: np.ndarray, k: int, tol: float) -> np.ndarray:
    """Central path of ``t (c·x + ½xᵀQx) − log det smat(x)`` up to ``k/t ≤ tol``."""
    basis = _basis(k)
    x = svec(np.eye(k))
    t = 1.0
    while True:
        for _ in range(50):
            inverse = np.linalg.inv(smat(x, k))
            gradient = t * (c + q @ x) - svec(inverse)
            left = basis @ inverse  # E_p S⁻¹
            hessian = t * q + np.einsum("pab,qba->pq", left, left)
            step = -np.linalg.solve(hessian, gradient)
            decrement = -float(gradient @ step)
            if decrement / 2 <= 1e-9:
                break
            value = _barrier_value(x, c, q, k, t)
            size = 1.0
            while _barrier_value(x + size * step, c, q, k, t) > (
                value - 0.25 * size * decrement
            ):
                size *= 0.5
                if size < 1e-6:  # round-off of t·f: the point is as centred as can be
                    break
            if size < 1e-6:
                break
            x = x + size * step
            if not np.all(np.isfinite(x)) or np.abs(x).max() > 1e12:
                raise ComplementarityError(
                    "The complementarity problem has no solution: some S ⪰ 0 with "
                    "β[S] = 0 has ⟨α, S⟩ < 0 (the curvature cannot be reduced along "
                    "it)."
                )
        if k / t <= tol:
            return x
        t *= 20.0


def _barrier_value(x: np.ndarray, c: np.ndarray, q: np.ndarray, k: int, t: float):
    try:
        factor = np.linalg.cholesky(smat(x, k))
    except np.linalg.LinAlgError:
        return math.inf
    log_det = 2.0 * float(np.log(np.diag(factor)).sum())
    return t * float(c @ x + 0.5 * x @ q @ x) - log_det


def _kkt_residual(x: np.ndarray, c: np.ndarray, q: np.ndarray, k: int) -> float:
    """max(−λ_min(S), −λ_min(Z), ‖SZ‖_F), relative to the scale of S."""
    s = smat(x, k)
    z = smat(c + q @ x, k)
    scale = max(1.0, float(np.abs(x).max()))
    return max(
        -float(np.linalg.eigvalsh(s)[0]) / scale,
        -float(np.linalg.eigvalsh(z)[0]),
        float(np.linalg.norm(s @ z)) / scale,
        0.0,
    )


def _solution(
    x: np.ndarray,
    c: np.ndarray,
    q: np.ndarray,
    k: int,
    method: str,
    rank_tol: float,
) -> ComplementaritySolution:
    sigma = smat(x, k)
    slack = smat(c + q @ x, k)
    values = np.linalg.eigvalsh(sigma) if k else np.zeros(0)
    largest = float(values.max()) if k else 0.0
    rank = int((values > rank_tol * largest).sum()) if largest > 0 else 0
    c_norm = float(np.linalg.norm(c)) or 1.0
    q_scale = float(np.trace(q)) / max(len(c), 1) or 1.0
    residual = (
        _kkt_residual(x * q_scale / c_norm, c / c_norm, q / q_scale, k) if k else 0.0
    )
    return ComplementaritySolution(
        sigma=torch.from_numpy(sigma),
        slack=torch.from_numpy(slack),
        rank=rank,
        residual=residual,
        method=method,
    )
