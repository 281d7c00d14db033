r"""The gradient of the sharpness and third derivatives on the top eigenspace.

For a simple top eigenvalue :math:`S(\theta) = \lambda_1(\nabla^2 L(\theta))` with
unit eigenvector :math:`u_1`, the gradient of the sharpness is the third-order
vector

.. math::
    \nabla S = T[u_1, u_1] = \nabla_\theta\bigl(u_1^\top H(\theta) u_1\bigr),

the quantity that drives self-stabilization at the edge of stability (Damian,
Nichani, Lee 2023) and the sharpness term of the central flow (Cohen et al. 2025).
Where it points matters: along the top eigenvectors :math:`U = (u_1, \dots,
u_k)` it couples the oscillation to the sharpness (:math:`T[u_1, u_1, u_1]`),
along the gradient it is progressive sharpening, and in the orthogonal complement
of the top eigenspace it is the direction that gradient descent's oscillation
moves the parameters to reduce the sharpness. :func:`sharpness_gradient` returns
those projections and, optionally, the whole symmetric :math:`k \times k \times k`
tensor :math:`T[u_a, u_b, u_c]`.

References:
    Damian, Nichani, Lee (2023). Self-stabilization: the implicit bias of gradient
    descent at the edge of stability. ICLR.

    Cohen, Damian, Talwalkar, Kolter, Lee (2025). Understanding optimization in deep
    learning with central flows. ICLR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_eos.curvature.directional import symmetrize
from lightning_eos.curvature.hessian import HessianOperator

__all__ = ["SharpnessGradient", "sharpness_gradient"]


@dataclass
class SharpnessGradient:
    r"""The gradient of the sharpness and its projections (float64 scalars).

    Attributes:
        vector: :math:`\nabla S = T[u_1, u_1]`, flat.
        norm: :math:`\lVert\nabla S\rVert`.
        eigen_coefficients: :math:`u_a \cdot \nabla S = T[u_1, u_1, u_a]`,
            :math:`a = 1 \dots k`; the first is :math:`T[u_1, u_1, u_1]`.
        gradient_coefficient: :math:`\nabla S \cdot \nabla L / \lVert\nabla L\rVert`.
        cosine: :math:`\cos(\nabla S, \nabla L)`; NaN where either vanishes.
        complement_norm: :math:`\lVert(I - UU^\top)\nabla S\rVert`, the part outside
            the top-``k`` eigenspace.
        tensor: :math:`T[u_a, u_b, u_c]`, shape ``(k, k, k)``, or ``None``.
        num_third_order: Third-order vectors spent.
    """

    vector: Tensor
    norm: float
    eigen_coefficients: Tensor
    gradient_coefficient: float
    cosine: float
    complement_norm: float
    tensor: Tensor | None
    num_third_order: int


def sharpness_gradient(
    operator: HessianOperator, eigenvectors: Tensor, *, tensor: bool = False
) -> SharpnessGradient:
    r"""The gradient of the sharpness :math:`\nabla S = T[u_1, u_1]` and projections.

    Args:
        operator: The Hessian at the point (its gradient :math:`\nabla L` is used).
        eigenvectors: Orthonormal top eigenvectors :math:`u_1, \dots, u_k`, one per
            row (or a single ``(dim,)`` vector), :math:`u_1` first.
        tensor: Also compute the :math:`k \times k \times k` tensor. Cost: ``k``
            Hessian-vector products with graph and ``k(k+1)/2`` further backward
            passes, against one of each for :math:`\nabla S` alone.

    Returns:
        The :class:`SharpnessGradient`.

    Raises:
        ValueError: If the eigenvectors do not have ``operator.dim`` columns, or if
            there are more of them than the dimension.
    """
    rows = eigenvectors.reshape(1, -1) if eigenvectors.dim() == 1 else eigenvectors
    if rows.dim() != 2 or rows.shape[1] != operator.dim:
        raise ValueError(
            f"`eigenvectors` must have shape (k, {operator.dim}) or "
            f"({operator.dim},), got {tuple(eigenvectors.shape)}."
        )
    k = rows.shape[0]
    if not 1 <= k <= operator.dim:
        raise ValueError(
            f"`eigenvectors` must hold between 1 and {operator.dim} vectors (the "
            f"dimension), got {k}."
        )
    rows = rows.to(dtype=operator.dtype, device=operator.device)

    before = operator.num_third_order
    full = None
    if tensor and k > 1:
        # Pairs (a, b) with a ≤ b, grouped by b: one product H u_b with graph each.
        pairs = [(a, b) for b in range(k) for a in range(b + 1)]
        left = torch.stack([rows[a] for a, _ in pairs])
        right = torch.stack([rows[b] for _, b in pairs])
        vectors = operator.third_order(left, right).double()
        full = torch.zeros(k, k, k, dtype=torch.float64)
        contracted = (vectors @ rows.double().T).cpu()
        for (a, b), values in zip(pairs, contracted, strict=True):
            full[a, b] = values
            full[b, a] = values
        full = symmetrize(full)
        gradient_s = vectors[pairs.index((0, 0))]
    else:
        gradient_s = operator.third_order(rows[0], rows[0]).double()

    basis = rows.double()
    coefficients = basis @ gradient_s
    complement = gradient_s - coefficients @ basis
    loss_gradient = operator.gradient().double()
    norm_s, norm_l = float(gradient_s.norm()), float(loss_gradient.norm())
    inner = float(gradient_s @ loss_gradient)
    if tensor and full is None:
        full = coefficients[:1].reshape(1, 1, 1).cpu().clone()
    return SharpnessGradient(
        vector=gradient_s,
        norm=norm_s,
        eigen_coefficients=coefficients.cpu(),
        gradient_coefficient=inner / norm_l if norm_l > 0 else math.nan,
        cosine=inner / (norm_s * norm_l) if norm_s > 0 and norm_l > 0 else math.nan,
        complement_norm=float(complement.norm()),
        tensor=full,
        num_third_order=operator.num_third_order - before,
    )
