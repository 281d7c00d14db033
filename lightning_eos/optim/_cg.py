"""Conjugate-gradient solvers for Newton systems, from Hessian-vector products only."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]


@dataclass
class CGResult:
    r"""The outcome of a conjugate-gradient solve.

    Attributes:
        direction: The solution estimate, or a direction of weak or negative
            curvature.
        kind: ``"solution"`` (residual tolerance met), ``"negative_curvature"``
            or ``"max_iter"`` (the iteration cap, with the latest iterate).
        curvature: :math:`d^\top H d/\|d\|^2` with the *undamped* matrix.
        iterations: CG iterations (one product each).
        products: Matrix-vector products spent.
        relative_residual: :math:`\|\bar H y + g\|/\|g\|` of the last iterate.
        model: :math:`\tfrac12 d^\top \bar H d + g^\top d` for the damped matrix.
    """

    direction: Tensor
    kind: Literal["solution", "negative_curvature", "max_iter"]
    curvature: float
    iterations: int
    products: int
    relative_residual: float
    model: float = math.nan


def _weak(curvature: float, squared_norm: float, eps: float) -> bool:
    """Royer et al.'s weak-curvature test, pᵀH̄p < ε‖p‖² (pᵀH̄p ≤ 0 when ε = 0)."""
    return curvature < eps * squared_norm if eps > 0 else curvature <= 0


def capped_cg(
    hvp: MatVec,
    g: Tensor,
    *,
    damping: float,
    tol: float,
    max_iter: int,
) -> CGResult:
    r"""Capped conjugate gradient on :math:`(H + \lambda I) y = -g` (Royer et al.).

    Conjugate gradient on the damped system that watches for curvature below
    :math:`\epsilon = \lambda/2` (:math:`\lambda = 2\epsilon_H` in the paper):

    * if a search direction :math:`p_j` or an iterate :math:`y_j` has
      :math:`v^\top \bar H v < \epsilon\|v\|^2` (that is :math:`v^\top H v <
      -\epsilon\|v\|^2`), it is returned as a negative-curvature direction;
    * if the residual shrinks more slowly than CG's rate on a matrix of condition
      :math:`\kappa = (M + \lambda)/\epsilon` allows,
      :math:`\|r_j\| > \sqrt{T}\tau^{j/2}\|r_0\|` with
      :math:`\tau = \sqrt\kappa/(\sqrt\kappa + 1)` and
      :math:`T = 4\kappa^4/(1 - \sqrt\tau)^2`, a pair of iterates with
      :math:`(y_{j+1} - y_i)^\top \bar H (y_{j+1} - y_i) < \epsilon\|y_{j+1} -
      y_i\|^2` exists and is returned (found from the stored iterates and
      residuals, since :math:`\bar H y_i = r_i - g`, without new products);
      :math:`M` is the running estimate of :math:`\|H\|` from the products seen;
    * otherwise it stops when :math:`\|r_j\| \le \mathrm{tol}\,\|g\|` or after
      ``max_iter`` iterations.

    With ``damping=0`` it is conjugate gradient on :math:`Hy = -g` that stops at
    the first direction of non-positive curvature, without the residual test.
    The paper's complexity bound uses ``tol`` :math:`= \zeta/(3\kappa)` and a cap
    that grows with :math:`\sqrt\kappa`; here both are the caller's choice. The
    iterates are stored for the residual test when ``damping > 0`` (memory:
    ``2 · max_iter`` vectors).

    References:
        Royer, O'Neill, Wright (2020). A Newton-CG algorithm with complexity
        guarantees for smooth unconstrained optimization. Mathematical
        Programming 180, Algorithm 1.
    """
    damp = float(damping)
    eps = damp / 2
    g_norm = float(g.norm())
    zero = torch.zeros_like(g)
    if g_norm == 0:
        return CGResult(zero, "solution", math.nan, 0, 0, 0.0, 0.0)

    y, r, p = zero, g.clone(), -g
    hp = hvp(p)
    products = 1
    p_sq = float(p @ p)
    p_curv = float(p @ hp) + damp * p_sq
    if _weak(p_curv, p_sq, eps):
        return CGResult(p, "negative_curvature", float(p @ hp) / p_sq, 0, 1, 1.0)
    M = float(hp.norm()) / math.sqrt(p_sq)
    history: list[tuple[Tensor, Tensor]] = [(y, r)] if damp > 0 else []

    for j in range(1, max_iter + 1):
        r_sq = float(r @ r)
        alpha = r_sq / p_curv
        y = y + alpha * p
        r_next = r + alpha * (hp + damp * p)
        beta = float(r_next @ r_next) / r_sq
        r_norm = float(r_next.norm())

        # Tests on the iterate: H̄y = r − g needs no product.
        hbar_y = r_next - g
        y_sq = float(y @ y)
        y_curv = float(y @ hbar_y)
        if _weak(y_curv, y_sq, eps):
            curvature = (y_curv - damp * y_sq) / y_sq
            return CGResult(
                y, "negative_curvature", curvature, j, products, r_norm / g_norm
            )
        if r_norm <= tol * g_norm:
            hy = hbar_y - damp * y
            return CGResult(
                y,
                "solution",
                float(y @ hy) / y_sq,
                j,
                products,
                r_norm / g_norm,
                model=0.5 * float(y @ hbar_y) + float(g @ y),
            )
        if j == max_iter:
            break

        p_next = -r_next + beta * p
        hp_next = hvp(p_next)
        products += 1
        hr = -hp_next + beta * hp  # r = −p_next + β p, so Hr comes free
        for vector, image in ((p_next, hp_next), (y, hbar_y - damp * y), (r_next, hr)):
            norm = float(vector.norm())
            if norm > 0:
                M = max(M, float(image.norm()) / norm)
        p_sq = float(p_next @ p_next)
        p_curv = float(p_next @ hp_next) + damp * p_sq
        if _weak(p_curv, p_sq, eps):
            return CGResult(
                p_next,
                "negative_curvature",
                float(p_next @ hp_next) / p_sq,
                j,
                products,
                r_norm / g_norm,
            )
        if damp > 0:
            kappa = (M + damp) / eps
            tau = math.sqrt(kappa) / (math.sqrt(kappa) + 1)
            bound = 2 * kappa**2 / (1 - math.sqrt(tau)) * tau ** (j / 2)
            if r_norm > bound * g_norm:
                found = _weak_pair(history, y, r_next, p_next, hp_next, p_curv, damp)
                if found is not None:
                    direction, curvature = found
                    return CGResult(
                        direction,
                        "negative_curvature",
                        curvature,
                        j,
                        products,
                        r_norm / g_norm,
                    )
            history.append((y, r_next))
        r, p, hp = r_next, p_next, hp_next

    hbar_y = r_next - g
    return CGResult(
        y,
        "max_iter",
        float(y @ (hbar_y - damp * y)) / max(float(y @ y), 1e-300),
        max_iter,
        products,
        float(r_next.norm()) / g_norm,
        model=0.5 * float(y @ hbar_y) + float(g @ y),
    )


def _weak_pair(
    history: list[tuple[Tensor, Tensor]],
    y: Tensor,
    r: Tensor,
    p: Tensor,
    hp: Tensor,
    p_curv: float,
    damp: float,
) -> tuple[Tensor, float] | None:
    """A difference of iterates with weak damped curvature, if one exists."""
    eps = damp / 2
    alpha = float(r @ r) / p_curv
    y_next = y + alpha * p
    r_next = r + alpha * (hp + damp * p)
    for y_i, r_i in history:
        d = y_next - y_i
        d_sq = float(d @ d)
        if d_sq == 0:
            continue
        curvature = float(d @ (r_next - r_i))
        if curvature < eps * d_sq:
            return d, (curvature - damp * d_sq) / d_sq
    return None


def truncated_cg(
    matvec: MatVec,
    g: Tensor,
    *,
    damping: float,
    x0: Tensor | None,
    max_iter: int,
    progress_tol: float = 5e-4,
    residual_tol: float = 1e-10,
) -> CGResult:
    r"""Conjugate gradient on :math:`(B + \lambda I)x = -g` with Martens' stopping rule.

    Minimizes :math:`\phi(x) = \tfrac12 x^\top(B + \lambda I)x + g^\top x` from the
    warm start ``x0`` (dropped when :math:`\phi(x_0) \ge 0`) and stops at iteration
    :math:`i` when :math:`i > k`, :math:`\phi_i < 0` and :math:`(\phi_i -
    \phi_{i-k})/\phi_i < k\,\mathrm{progress\_tol}` with :math:`k = \max(10,
    \lceil i/10 \rceil)`, when the residual falls below ``residual_tol``·‖g‖,
    after ``max_iter`` iterations, or at a direction of non-positive damped
    curvature (which an indefinite Hessian can produce). In that last case the
    current iterate is returned, or :math:`-g` if there is none yet.

    References:
        Martens (2010). Deep learning via Hessian-free optimization. ICML,
        Section 4.4 and 4.5.
    """
    damp = float(damping)
    g_norm = float(g.norm())
    products = 0
    x = torch.zeros_like(g)
    r = g.clone()
    if x0 is not None and float(x0.norm()) > 0:
        bx0 = matvec(x0) + damp * x0
        products += 1
        phi0 = 0.5 * float(x0 @ bx0) + float(g @ x0)
        if phi0 < 0:
            x, r = x0.clone(), bx0 + g
    if g_norm == 0:
        return CGResult(x, "solution", math.nan, 0, products, 0.0, 0.0)
    p = -r
    values = [0.5 * float(x @ (r - g)) + float(g @ x)]
    kind: Literal["solution", "negative_curvature", "max_iter"] = "max_iter"
    iterations = 0
    for i in range(1, max_iter + 1):
        bp = matvec(p) + damp * p
        products += 1
        curvature = float(p @ bp)
        if curvature <= 0:
            kind = "negative_curvature"
            if float(x.norm()) == 0:
                x, r = p.clone(), bp + g
            break
        r_sq = float(r @ r)
        alpha = r_sq / curvature
        x = x + alpha * p
        r = r + alpha * bp
        iterations = i
        values.append(0.5 * float(x @ (r - g)) + float(g @ x))
        if float(r.norm()) <= residual_tol * g_norm:
            kind = "solution"
            break
        k = max(10, math.ceil(i / 10))
        phi = values[-1]
        if i > k and phi < 0 and (phi - values[-1 - k]) / phi < k * progress_tol:
            kind = "solution"
            break
        p = -r + (float(r @ r) / r_sq) * p
    x_sq = float(x @ x)
    bx_minus_g = r - g  # (B + λ)x
    return CGResult(
        x,
        kind,
        (float(x @ bx_minus_g) - damp * x_sq) / x_sq if x_sq > 0 else math.nan,
        iterations,
        products,
        float(r.norm()) / g_norm,
        model=0.5 * float(x @ bx_minus_g) + float(g @ x),
    )
