r"""Derivatives of the loss restricted to a few directions, one per block.

For parameters :math:`\theta` and directions :math:`d_1, \dots, d_K` (typically
one per group of parameter tensors, each zero outside its group), this module
computes the derivatives at :math:`t = 0` of

.. math::
    \varphi(t) = L\Bigl(\theta + \sum_{i=1}^K t_i d_i\Bigr), \qquad t \in \mathbb{R}^K:

the gradient :math:`\partial_i\varphi = \langle\nabla L, d_i\rangle`, the
:math:`K \times K` Hessian :math:`\partial_{ij}\varphi = d_i^\top \nabla^2 L\, d_j`
and the diagonal of the :math:`K\times K\times K` third-derivative tensor,
:math:`\partial_{iii}\varphi = \nabla^3 L[d_i, d_i, d_i]`. These are the reduced
quantities of Wolinski (2025) for training with one learning rate per group.

This is the one implementation of these derivatives in the package: the probes'
:func:`~lightning_eos.curvature.block_derivatives` and
:func:`~lightning_eos.curvature.directional_derivatives` call it on each chunk of
a probe set, and :class:`~lightning_eos.optim.GroupedNewton` calls it on the
gradient graph of its closure.

Cost: :math:`K` Hessian-vector products (double backward) and, for the third
order, one more backward pass per entry :math:`\partial_{ij}\varphi` needed
(:math:`K` for the diagonal, :math:`K(K+1)/2` for the full tensor), all from the
graph of one gradient. Only the blocks where a direction is non-zero enter each
product.

PyTorch's native BatchNorm (train mode), LayerNorm and InstanceNorm give wrong
third derivatives while their Hessian-vector products are right (see
:mod:`lightning_eos.curvature.normalization`); the third order needs models written
in plain tensor operations there.

References:
    Wolinski (2025). Gathering and exploiting higher-order information when
    training large structured models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = ["ReducedDerivatives", "reduced_derivatives"]

ThirdOrder = Literal["none", "diagonal", "full"]


@dataclass(frozen=True)
class ReducedDerivatives:
    r"""Derivatives at :math:`t = 0` of :math:`t \mapsto L(\theta + \sum_i t_i d_i)`.

    Attributes:
        gradient: Shape ``(K,)``, :math:`\langle \nabla L, d_i\rangle`.
        hessian: Shape ``(K, K)``, :math:`d_i^\top \nabla^2 L\, d_j` (symmetrized).
        third_order: With ``third_order="diagonal"``, shape ``(K,)``,
            :math:`\nabla^3 L[d_i, d_i, d_i]`; with ``"full"``, shape ``(K, K, K)``,
            :math:`\nabla^3 L[d_i, d_j, d_k]` (symmetric); ``None`` with ``"none"``.
        num_hvps: Hessian-vector products computed (``K``).
        num_third_order: Backward passes spent on the third order.
    """

    gradient: Tensor
    hessian: Tensor
    third_order: Tensor | None
    num_hvps: int
    num_third_order: int


def reduced_derivatives(
    params: Sequence[Tensor],
    directions: Sequence[Sequence[Tensor | None]],
    *,
    loss: Tensor | None = None,
    gradient: Sequence[Tensor | None] | None = None,
    third_order: ThirdOrder = "diagonal",
) -> ReducedDerivatives:
    r"""Reduced gradient, Hessian and third-derivative diagonal along directions.

    Args:
        params: The tensors :math:`\theta` (leaves with ``requires_grad=True``).
        directions: ``K`` directions; ``directions[i][j]`` is the block of
            :math:`d_i` on ``params[j]`` (``None`` for zero). They are constants.
        loss: The scalar loss, with its graph to ``params``. Give this or
            ``gradient``.
        gradient: :math:`\nabla L` with its graph, as produced by
            ``torch.autograd.grad(loss, params, create_graph=True)`` or by
            ``loss.backward(create_graph=True)`` (the ``.grad`` fields). Entries
            without graph are taken as constant in :math:`\theta`.
        third_order: ``"diagonal"``, ``"full"`` or ``"none"`` (see
            :class:`ReducedDerivatives`).

    Returns:
        The :class:`ReducedDerivatives`, in the type of the first parameter.

    Raises:
        ValueError: If both or neither of ``loss`` and ``gradient`` are given, if
            ``third_order`` is unknown, or if a direction does not have one block
            per parameter of the right shape.

    Example:
        >>> import torch
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> loss = (w**3).sum()  # ∇³ = 6 on the diagonal
        >>> result = reduced_derivatives(
        ...     [w], [[torch.tensor([1.0, 0.0])], [torch.tensor([0.0, 1.0])]], loss=loss
        ... )
        >>> result.gradient.tolist(), result.third_order.tolist()
        ([3.0, 12.0], [6.0, 6.0])
    """
    params = list(params)
    if (loss is None) == (gradient is None):
        raise ValueError("Give exactly one of `loss` and `gradient`.")
    if third_order not in ("none", "diagonal", "full"):
        raise ValueError(
            f"`third_order` must be 'none', 'diagonal' or 'full', got {third_order!r}."
        )
    for i, direction in enumerate(directions):
        if len(direction) != len(params):
            raise ValueError(
                f"`directions[{i}]` has {len(direction)} blocks; expected one per "
                f"parameter ({len(params)})."
            )
        for j, block in enumerate(direction):
            if block is not None and block.shape != params[j].shape:
                raise ValueError(
                    f"`directions[{i}][{j}]` has shape {tuple(block.shape)}; expected "
                    f"{tuple(params[j].shape)}."
                )
    dtype, device = params[0].dtype, params[0].device
    count = len(directions)

    need_third = third_order != "none"
    third_passes = 0
    with torch.enable_grad():
        if gradient is None:
            assert loss is not None
            gradient = torch.autograd.grad(
                loss, params, create_graph=True, allow_unused=True
            )
        gradient = list(gradient)
        reduced_gradient = torch.zeros(count, dtype=dtype, device=device)
        hessian = torch.zeros(count, count, dtype=dtype, device=device)
        third = torch.zeros(count, count, count, dtype=dtype, device=device)
        for i, direction in enumerate(directions):
            slope = _inner(gradient, direction)
            reduced_gradient[i] = slope.detach()
            if not slope.requires_grad:
                continue  # the loss is at most linear along d_i
            products = torch.autograd.grad(
                slope,
                params,
                create_graph=need_third,
                retain_graph=True,
                allow_unused=True,
            )
            for k, other in enumerate(directions):
                hessian[i, k] = _inner(products, other).detach()
            if not need_third:
                continue
            for j in [i] if third_order == "diagonal" else range(i, count):
                curvature = _inner(products, directions[j])
                if not curvature.requires_grad:
                    continue  # the curvature is constant: no third order
                derivative = torch.autograd.grad(
                    curvature, params, retain_graph=True, allow_unused=True
                )
                third_passes += 1
                targets = [i] if third_order == "diagonal" else range(count)
                for k in targets:
                    value = _inner(derivative, directions[k]).detach()
                    for a, b, c in {
                        (i, j, k),
                        (i, k, j),
                        (j, i, k),
                        (j, k, i),
                        (k, i, j),
                        (k, j, i),
                    }:
                        third[a, b, c] = value
    hessian = (hessian + hessian.T) / 2
    if third_order == "diagonal":
        result = torch.diagonal(torch.diagonal(third)).clone()
    else:
        result = third if third_order == "full" else None
    return ReducedDerivatives(
        gradient=reduced_gradient,
        hessian=hessian,
        third_order=result,
        num_hvps=count,
        num_third_order=third_passes,
    )


def _inner(
    tensors: Sequence[Tensor | None], direction: Sequence[Tensor | None]
) -> Tensor:
    """Σ_j ⟨tensors[j], direction[j]⟩ over the blocks where both are present."""
    total = None
    for tensor, block in zip(tensors, direction, strict=True):
        if tensor is None or block is None:
            continue
        term = (tensor * block).sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total
