r"""Minimizers of the cubic model from Hessian-vector products only.

The model is :math:`m(s) = g^\top s + \frac12 s^\top H s + \frac\sigma3\|s\|^3`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]


@dataclass
class CubicStep:
    r"""An approximate minimizer of the cubic model.

    Attributes:
        step: The step :math:`s`.
        model_decrease: :math:`-m(s) = m(0) - m(s)`.
        curvature: :math:`s^\top H s`.
        products: Hessian-vector products spent.
        model_gradient: :math:`\|\nabla m(s)\|` (exact within the Krylov space's
            recurrence, or computed directly by gradient descent).
    """

    step: Tensor
    model_decrease: float
    curvature: float
    products: int
    model_gradient: float


def minimize_small_cubic(
    matrix: Tensor, b: Tensor, sigma: float
) -> tuple[Tensor, float]:
    r"""The global minimizer of a small cubic model, in float64.

    The model is :math:`b^\top y + \frac12 y^\top T y + \frac\sigma3 \|y\|^3`
    with a small symmetric :math:`T`.

    The minimizer satisfies :math:`(T + \mu I)y = -b`, :math:`\mu = \sigma\|y\|`,
    :math:`T + \mu I \succeq 0` (Nesterov and Polyak 2006; Cartis, Gould and Toint
    2011, Theorem 3.1). With :math:`T = V\Lambda V^\top` and :math:`c = V^\top b`,
    :math:`\|(\Lambda + \mu)^{-1}c\| - \mu/\sigma` decreases in
    :math:`\mu > \max(0, -\lambda_{\min})`; its root is found by bisection to
    machine precision. In the hard case (:math:`c` orthogonal to the lowest
    eigenvectors and the root below :math:`-\lambda_{\min}`),
    :math:`\mu = -\lambda_{\min}` and a lowest eigenvector is added to reach
    :math:`\|y\| = \mu/\sigma`.

    Returns:
        :math:`y` and :math:`\mu`.
    """
    eigenvalues, vectors = torch.linalg.eigh(matrix)
    c = vectors.T @ b
    lowest = float(eigenvalues[0])
    c_norm = float(c.norm())
    scale = max(float(eigenvalues.abs().max()), c_norm, 1e-300)
    floor = max(0.0, -lowest)

    bottom = eigenvalues <= lowest + 1e-12 * scale
    if floor > 0 and float(c[bottom].norm()) <= 1e-12 * max(c_norm, 1e-300) * 10:
        shifted = (eigenvalues + floor).masked_fill(bottom, 1.0)
        y_coords = (-c / shifted).masked_fill(bottom, 0.0)
        radius = floor / sigma
        y_norm = float(y_coords.norm())
        if y_norm <= radius:
            first = int(torch.nonzero(bottom)[0])
            y_coords[first] = math.sqrt(max(radius**2 - y_norm**2, 0.0))
            return vectors @ y_coords, floor
    if c_norm == 0:
        return torch.zeros_like(b), 0.0

    def excess(mu: float) -> float:
        return float((c / (eigenvalues + mu)).norm()) - mu / sigma

    low = floor
    high = (-lowest + math.sqrt(lowest**2 + 4 * sigma * c_norm)) / 2
    high = max(high, low)
    for _ in range(200):
        middle = 0.5 * (low + high)
        if middle in (low, high):
            break
        if middle <= floor or excess(middle) > 0:
            low = middle
        else:
            high = middle
    mu = high
    y = vectors @ (-c / (eigenvalues + mu))
    return y, mu


def krylov_cubic(
    hvp: MatVec,
    g: Tensor,
    sigma: float,
    *,
    tol: float,
    max_iter: int,
    generator: torch.Generator,
) -> CubicStep:
    r"""The cubic model minimized over a Krylov space built by Lanczos.

    Lanczos from :math:`g` (full reorthogonalization) builds :math:`Q_k` and the
    tridiagonal :math:`T_k = Q_k^\top H Q_k`; the model restricted to
    :math:`s = Q_k y` is minimized exactly (:func:`minimize_small_cubic`). The
    model's gradient at that point has norm :math:`\beta_k |y_k|` (no extra
    product); the solve stops when it is at most
    :math:`\mathrm{tol}\,\min(1, \|s\|)\,\|g\|` (the ARC rule TC.s), or after
    ``max_iter`` products. When the Krylov space becomes invariant (:math:`g` lies
    in an invariant subspace of :math:`H`, as at points on a saddle's attracting
    manifold) it continues once from a random vector orthogonal to it, so that
    negative curvature elsewhere is found (Cartis, Gould and Toint 2011, §6).
    """
    dim = g.numel()
    g_norm = float(g.norm())
    start = g
    if g_norm == 0:
        start = torch.randn(dim, generator=generator, dtype=torch.float64).to(g)
    basis = [start / start.norm()]
    diagonal: list[float] = []
    off: list[float] = []
    b_coords: list[float] = [g_norm]
    restarts = 1
    products = 0
    y = torch.zeros(1, dtype=torch.float64)
    residual = math.inf
    while products < max_iter:
        q = basis[-1]
        w = hvp(q)
        products += 1
        diagonal.append(float(q @ w))
        stacked = torch.stack(basis)
        for _ in range(2):
            w = w - stacked.T @ (stacked @ w)
        beta = float(w.norm())
        size = len(diagonal)
        matrix = torch.diag(torch.tensor(diagonal, dtype=torch.float64))
        for i, value in enumerate(off):
            matrix[i, i + 1] = matrix[i + 1, i] = value
        b = torch.tensor(b_coords + [0.0] * (size - len(b_coords)), dtype=torch.float64)
        y, _ = minimize_small_cubic(matrix, b, sigma)
        y_norm = float(y.norm())
        residual = beta * abs(float(y[-1]))
        scale = max(abs(v) for v in diagonal) if diagonal else 1.0
        invariant = beta <= 1e-10 * max(scale, 1e-300)
        if size >= dim:
            break
        if invariant:
            if restarts == 0:
                break
            restarts -= 1
            fresh = torch.randn(dim, generator=generator, dtype=torch.float64).to(g)
            for _ in range(2):
                fresh = fresh - stacked.T @ (stacked @ fresh)
            basis.append(fresh / fresh.norm())
            off.append(0.0)
            continue
        if residual <= tol * min(1.0, y_norm) * g_norm:
            break
        basis.append(w / beta)
        off.append(beta)
    stacked = torch.stack(basis[: y.numel()])
    y_cast = y.to(g)
    step = stacked.T @ y_cast
    matrix = torch.diag(torch.tensor(diagonal, dtype=torch.float64))
    for i, value in enumerate(off[: len(diagonal) - 1]):
        matrix[i, i + 1] = matrix[i + 1, i] = value
    curvature = float(y @ matrix @ y)
    y_norm = float(y.norm())
    model = g_norm * float(y[0]) + 0.5 * curvature + sigma / 3 * y_norm**3
    if g_norm == 0:
        model = 0.5 * curvature + sigma / 3 * y_norm**3
    return CubicStep(step, -model, curvature, products, residual)


def gradient_descent_cubic(
    hvp: MatVec,
    g: Tensor,
    sigma: float,
    *,
    tol: float,
    max_iter: int,
    perturbation: float,
    generator: torch.Generator,
    power_iterations: int = 5,
) -> CubicStep:
    r"""Gradient descent on the cubic model (Carmon and Duchi 2019).

    Starts from the Cauchy point :math:`s_0 = -R_c\, g/\|g\|` with
    :math:`R_c = -\frac{\beta}{\sigma} + \sqrt{\frac{\beta^2}{\sigma^2} +
    \frac{2\|g\|}{\sigma}}`, :math:`\beta = g^\top H g/\|g\|^2`, and runs
    :math:`s \leftarrow s - \eta(\tilde g + Hs + \sigma\|s\|s)` with
    :math:`\tilde g = g + \varepsilon q` (:math:`q` uniform on the sphere,
    :math:`\varepsilon` = ``perturbation`` · ‖g‖), which avoids the hard case
    with probability one, and :math:`\eta = 1/(4(L + \sigma R))` with
    :math:`L` twice a power-iteration estimate of :math:`\|H\|` and :math:`R`
    the bound on :math:`\|s^\ast\|` of the paper. One product per iteration.
    It stops when :math:`\|\nabla m(s)\| \le \mathrm{tol}\min(1, \|s\|)\|g\|`.

    References:
        Carmon, Duchi (2019). Gradient descent finds the cubic-regularized
        nonconvex Newton step. SIAM Journal on Optimization 29(3).
    """
    g_norm = float(g.norm())
    products = 0
    vector = torch.randn(g.numel(), generator=generator, dtype=torch.float64).to(g)
    direction = vector / vector.norm()
    lipschitz = 0.0
    for _ in range(power_iterations):
        image = hvp(direction)
        products += 1
        lipschitz = float(image.norm())
        if lipschitz == 0:
            break
        direction = image / lipschitz
    lipschitz = 2 * max(lipschitz, 1e-12)

    noise = torch.randn(g.numel(), generator=generator, dtype=torch.float64).to(g)
    g_tilde = g + perturbation * max(g_norm, 1e-12) * noise / noise.norm()
    if g_norm > 0:
        hg = hvp(g)
        products += 1
        beta = float(g @ hg) / g_norm**2
        radius = -beta / sigma + math.sqrt((beta / sigma) ** 2 + 2 * g_norm / sigma)
        s = -radius * g / g_norm
    else:
        s = torch.zeros_like(g)
    bound = lipschitz / (2 * sigma) + math.sqrt(
        (lipschitz / (2 * sigma)) ** 2 + max(g_norm, 1e-300) / sigma
    )
    eta = 1.0 / (4 * (lipschitz + sigma * bound))

    hs = hvp(s)
    products += 1
    gradient = g + hs + sigma * float(s.norm()) * s
    while products < max_iter:
        if float(gradient.norm()) <= tol * min(1.0, float(s.norm())) * g_norm:
            break
        s = s - eta * (gradient + (g_tilde - g))
        hs = hvp(s)
        products += 1
        gradient = g + hs + sigma * float(s.norm()) * s
    curvature = float(s @ hs)
    s_norm = float(s.norm())
    model = float(g @ s) + 0.5 * curvature + sigma / 3 * s_norm**3
    return CubicStep(s, -model, curvature, products, float(gradient.norm()))
