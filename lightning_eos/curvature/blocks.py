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

Cost: :math:`K` Hessian-vector products (double backward) and, for the third
order, :math:`K` more backward passes through them, all from the graph of one
gradient. Only the blocks where a direction is non-zero enter each product.

PyTorch's native BatchNorm (train mode) and LayerNorm have been found to give
wrong third derivatives while their Hessian-vector products are right; use the
third order only with models written in plain tensor operations, or in eval mode.

References:
    Wolinski (2025). Gathering and exploiting higher-order information when
    training large structured models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BlockDerivatives", "block_derivatives"]


@dataclass(frozen=True)
class BlockDerivatives:
    r"""Derivatives at :math:`t = 0` of :math:`t \mapsto L(\theta + \sum_i t_i d_i)`.

    Attributes:
        gradient: Shape ``(K,)``, :math:`\langle \nabla L, d_i\rangle`.
        hessian: Shape ``(K, K)``, :math:`d_i^\top \nabla^2 L\, d_j` (symmetrized).
        third_diagonal: Shape ``(K,)``, :math:`\nabla^3 L[d_i, d_i, d_i]`, or
            ``None`` when not asked for.
        num_hvps: Hessian-vector products computed (``K``).
        num_third_order: Third-order products computed (``K`` or 0).
    """

    gradient: Tensor
    hessian: Tensor
    third_diagonal: Tensor | None
    num_hvps: int
    num_third_order: int


def block_derivatives(
    params: Sequence[Tensor],
    directions: Sequence[Sequence[Tensor | None]],
    *,
    loss: Tensor | None = None,
    gradient: Sequence[Tensor | None] | None = None,
    third_order: bool = True,
) -> BlockDerivatives:
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
        third_order: Also compute the diagonal of the third derivative.

    Returns:
        The :class:`BlockDerivatives`, in the type of the first parameter.

    Raises:
        ValueError: If both or neither of ``loss`` and ``gradient`` are given, or a
            direction does not have one block per parameter of the right shape.

    Example:
        >>> import torch
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> loss = (w**3).sum()  # ∇³ = 6 on the diagonal
        >>> result = block_derivatives(
        ...     [w], [[torch.tensor([1.0, 0.0])], [torch.tensor([0.0, 1.0])]], loss=loss
        ... )
        >>> result.gradient.tolist(), result.third_diagonal.tolist()
        ([3.0, 12.0], [6.0, 6.0])
    """
    params = list(params)
    if (loss is None) == (gradient is None):
        raise ValueError("Give exactly one of `loss` and `gradient`.")
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

    with torch.enable_grad():
        if gradient is None:
            assert loss is not None
            gradient = torch.autograd.grad(
                loss, params, create_graph=True, allow_unused=True
            )
        gradient = list(gradient)
        reduced_gradient = torch.zeros(count, dtype=dtype, device=device)
        hessian = torch.zeros(count, count, dtype=dtype, device=device)
        third = torch.zeros(count, dtype=dtype, device=device) if third_order else None
        for i, direction in enumerate(directions):
            pairs = [
                (g, block)
                for g, block in zip(gradient, direction, strict=True)
                if g is not None and block is not None
            ]
            slope = sum((g * block).sum() for g, block in pairs)
            if not isinstance(slope, Tensor):
                continue  # the direction is zero: all its derivatives vanish
            reduced_gradient[i] = slope.detach()
            if not slope.requires_grad:
                continue  # the loss is linear along d_i
            products = torch.autograd.grad(
                slope,
                params,
                create_graph=third_order,
                retain_graph=True,
                allow_unused=True,
            )
            for k, other in enumerate(directions):
                hessian[i, k] = _inner(products, other).detach()
            if third is None:
                continue
            curvature = _inner(products, direction)
            if isinstance(curvature, Tensor) and curvature.requires_grad:
                derivative = torch.autograd.grad(
                    curvature, params, retain_graph=True, allow_unused=True
                )
                third[i] = _inner(derivative, direction).detach()
    hessian = (hessian + hessian.T) / 2
    return BlockDerivatives(
        gradient=reduced_gradient,
        hessian=hessian,
        third_diagonal=third,
        num_hvps=count,
        num_third_order=count if third_order else 0,
    )


def _inner(
    tensors: Sequence[Tensor | None], direction: Sequence[Tensor | None]
) -> Tensor:
    total = None
    for tensor, block in zip(tensors, direction, strict=True):
        if tensor is None or block is None:
            continue
        term = (tensor * block).sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total
