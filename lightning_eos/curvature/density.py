r"""The spectral density of a symmetric operator by stochastic Lanczos quadrature.

The spectral density of :math:`H \in \mathbb{R}^{p \times p}` with eigenvalues
:math:`\lambda_1 \ge \dots \ge \lambda_p` is :math:`\phi(t) = \frac1p\sum_i
\delta(t - \lambda_i)`. For a unit vector :math:`v` with random direction,
:math:`\mathbb{E}[v^\top f(H) v] = \frac1p \operatorname{tr} f(H) = \int f\,
d\phi`. Lanczos started from :math:`v` for :math:`m` steps gives a tridiagonal
:math:`T_m` with eigenpairs :math:`(\theta_j, y_j)`, and the Gauss quadrature
:math:`v^\top f(H) v \approx \sum_j \tau_j f(\theta_j)`, :math:`\tau_j = (e_1^\top
y_j)^2`, exact for polynomials of degree up to :math:`2m - 1`. Averaging the
quadratures of :math:`n_v` independent vectors gives a discrete density with nodes
:math:`\theta_j` and weights :math:`\tau_j / n_v` that sum to one; convolving it
with a Gaussian of width :math:`\sigma` gives a smooth density (Ghorbani, Krishnan,
Xiao 2019; Lin, Saad, Yang 2016).

Every run is reorthogonalized fully against its own basis, so that converged
eigenvalues are not duplicated into ghost nodes; the runs are independent and their
products are computed together, one block per step.

References:
    Ghorbani, Krishnan, Xiao (2019). An investigation into neural net optimization
    via Hessian eigenvalue density. ICML.

    Lin, Saad, Yang (2016). Approximating spectral densities of large matrices.
    SIAM Review.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_eos._validation import check_int
from lightning_eos.curvature.lanczos import SymmetricOperator

__all__ = ["SpectralDensity", "spectral_density"]


@dataclass
class SpectralDensity:
    r"""Nodes and weights of a stochastic Lanczos quadrature.

    Attributes:
        nodes: Ritz values :math:`\theta_j` of each run, shape ``(n_v, m)``
            (float64); a run that found an invariant subspace after fewer steps
            pads its row with zero-weight nodes.
        weights: :math:`\tau_j / n_v`, the same shape; they sum to one.
        num_products: Operator-vector products spent.
        finite: ``False`` if a product held NaN or infinity; nodes and weights are
            then NaN.
    """

    nodes: Tensor
    weights: Tensor
    num_products: int
    finite: bool = True

    def density(self, grid: Tensor, sigma: float) -> Tensor:
        r"""The density convolved with a Gaussian of width ``sigma`` on ``grid``.

        :math:`\phi_\sigma(t) = \sum_j w_j \exp(-(t - \theta_j)^2 / 2\sigma^2) /
        \sqrt{2\pi}\sigma`, which integrates to one over the real line.
        """
        if not sigma > 0:
            raise ValueError(f"`sigma` must be positive, got {sigma!r}.")
        grid = grid.to(torch.float64)
        nodes, weights = self.nodes.reshape(-1), self.weights.reshape(-1)
        gap = (grid[:, None] - nodes[None, :]) / sigma
        kernel = torch.exp(-0.5 * gap**2) / (math.sqrt(2 * math.pi) * sigma)
        return kernel @ weights

    def histogram(self, edges: Tensor) -> Tensor:
        """The mass of the discrete density in each bin ``[edges[i], edges[i+1])``.

        The last bin includes its right edge; mass outside the edges is dropped.
        """
        edges = edges.to(torch.float64)
        nodes, weights = self.nodes.reshape(-1), self.weights.reshape(-1)
        index = torch.bucketize(nodes, edges, right=True) - 1
        index[nodes == edges[-1]] = edges.numel() - 2
        inside = (index >= 0) & (index < edges.numel() - 1)
        mass = torch.zeros(edges.numel() - 1, dtype=torch.float64)
        return mass.index_add_(0, index[inside], weights[inside])

    def mass_below(self, value: float) -> float:
        """The mass of the discrete density strictly below ``value``."""
        return float(self.weights[self.nodes < value].sum())


def spectral_density(
    operator: SymmetricOperator,
    num_probes: int = 4,
    num_steps: int = 64,
    *,
    generator: torch.Generator | None = None,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature of the spectral density (see the module).

    Args:
        operator: The symmetric operator.
        num_probes: Independent random start vectors :math:`n_v`, at least 1.
        num_steps: Lanczos steps per vector :math:`m`, at least 1; capped at the
            dimension. Cost: ``num_probes · num_steps`` products.
        generator: Source of the Gaussian start vectors; seeded with 0 by default.

    Returns:
        The :class:`SpectralDensity`.

    Raises:
        ValueError: If ``num_probes`` or ``num_steps`` is not a positive integer.
    """
    check_int("num_probes", num_probes)
    check_int("num_steps", num_steps)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    dim, dtype, device = operator.dim, operator.dtype, operator.device
    steps = min(num_steps, dim)
    start = torch.randn(num_probes, dim, generator=generator, dtype=torch.float64)
    current = (start / start.norm(dim=1, keepdim=True)).to(dtype=dtype, device=device)

    basis = torch.zeros(num_probes, steps, dim, dtype=dtype, device=device)
    alpha = torch.zeros(num_probes, steps, dtype=torch.float64)
    beta = torch.zeros(num_probes, steps, dtype=torch.float64)
    lengths = [steps] * num_probes
    active = list(range(num_probes))
    products = 0
    for step in range(steps):
        basis[active, step] = current[active]
        images = operator.matmat(current[active])
        products += len(active)
        if not bool(torch.isfinite(images).all()):
            nan = torch.full((num_probes, steps), math.nan, dtype=torch.float64)
            return SpectralDensity(nan, nan.clone(), products, finite=False)
        finished = []
        for row, run in enumerate(active):
            vector = images[row]
            alpha[run, step] = float(vector @ current[run])
            previous = basis[run, : step + 1]
            for _ in range(2):  # full reorthogonalization, twice (CGS2)
                vector = vector - (previous @ vector) @ previous
            norm = float(vector.norm())
            scale = max(abs(float(alpha[run, : step + 1].abs().max())), 1e-300)
            if step + 1 == steps or norm <= 100 * torch.finfo(dtype).eps * scale:
                lengths[run] = step + 1
                finished.append(run)
                continue
            beta[run, step] = norm
            current[run] = vector / norm
        active = [run for run in active if run not in finished]
        if not active:
            break

    nodes = torch.zeros(num_probes, steps, dtype=torch.float64)
    weights = torch.zeros(num_probes, steps, dtype=torch.float64)
    for run, length in enumerate(lengths):
        tridiagonal = torch.diag(alpha[run, :length])
        off = beta[run, : length - 1]
        tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
        values, vectors = torch.linalg.eigh(tridiagonal)
        nodes[run, :length] = values
        nodes[run, length:] = values[-1]  # zero-weight padding at a real node
        weights[run, :length] = vectors[0] ** 2 / num_probes
    return SpectralDensity(nodes=nodes, weights=weights, num_products=products)
