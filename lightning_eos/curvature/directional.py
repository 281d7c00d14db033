r"""Derivatives of the loss along a few directions: gradient, Hessian and third order.

For directions :math:`d_1, \dots, d_K` in parameter space, the restriction

.. math::
    \varphi(t) = L\Bigl(\theta + \sum_{i=1}^K t_i d_i\Bigr), \qquad t \in \mathbb{R}^K,

has the derivatives at :math:`t = 0`

.. math::
    \partial_i \varphi = \nabla L \cdot d_i, \qquad
    \partial_{ij} \varphi = d_i^\top H d_j, \qquad
    \partial_{ijk} \varphi = T[d_i, d_j, d_k],

with :math:`H = \nabla^2 L(\theta)` and :math:`T = \nabla^3 L(\theta)`. When each
:math:`d_i` is a direction :math:`d` restricted to the :math:`i`-th group of
parameter tensors (zero elsewhere), these are the block-structured derivatives of
Wolinski (2025): a :math:`K \times K` Hessian that couples the layers, and the
third-order terms :math:`\partial_{iii}\varphi` that say how fast the curvature of
each block changes along the step. A grouped Newton method solves
:math:`\nabla^2\varphi\, t = -\nabla\varphi` for one learning rate per group.

:func:`block_derivatives` builds the blocks from a direction and a grouping of the
parameters; :func:`directional_derivatives` takes arbitrary full directions (for
example the top eigenvectors, giving the :math:`k \times k \times k` tensor
:math:`T[u_a, u_b, u_c]`).

Cost. :math:`t` is a leaf of :math:`K` variables: one backward pass with graph
gives :math:`\nabla\varphi`, one double-backward pass per row gives the Hessian
(:math:`K` Hessian-vector products), and one further backward pass per entry
:math:`\partial_{ij}\varphi` with :math:`i \le j` needed gives the third-order
tensor: :math:`K` for the diagonal, :math:`K(K+1)/2` for the full tensor. Memory
is that of one chunk of the probe set and no :math:`K \times \dim` matrix is
formed for block directions.

References:
    Wolinski (2025). Gathering and exploiting higher-order information when training
    large structured models. arXiv:2312.03885.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_eos.curvature.blocks import reduced_derivatives
from lightning_eos.curvature.normalization import native_normalization_calls
from lightning_eos.curvature.objective import ProbeObjective

ThirdOrder = Literal["none", "diagonal", "full"]
Directions = Tensor | Sequence[Tensor] | Mapping[str, Tensor]
Groups = Sequence[Sequence[str]] | Mapping[str, Sequence[str]]

__all__ = ["BlockDerivatives", "block_derivatives", "directional_derivatives"]


@dataclass
class BlockDerivatives:
    r"""Derivatives of :math:`\varphi(t) = L(\theta + \sum_i t_i d_i)` at ``t = 0``.

    Attributes:
        names: The name of each direction (for blocks, the group's name).
        loss: :math:`\varphi(0) = L(\theta)`.
        gradient: :math:`\partial_i\varphi`, shape ``(K,)``.
        hessian: :math:`\partial_{ij}\varphi`, shape ``(K, K)``, symmetric.
        third_order: :math:`\partial_{iii}\varphi`, shape ``(K,)``, with
            ``third_order="diagonal"``; the symmetric tensor
            :math:`\partial_{ijk}\varphi`, shape ``(K, K, K)``, with ``"full"``;
            ``None`` with ``"none"``.
        num_backward: Backward passes through the network spent, per chunk.
    """

    names: list[str]
    loss: float
    gradient: Tensor
    hessian: Tensor
    third_order: Tensor | None
    num_backward: int


def directional_derivatives(
    objective: ProbeObjective,
    directions: Tensor,
    *,
    third_order: ThirdOrder = "diagonal",
    names: Sequence[str] | None = None,
    point: Tensor | None = None,
) -> BlockDerivatives:
    r"""Derivatives of :math:`t \mapsto L(\theta + \sum_i t_i d_i)` at 0, exactly.

    Args:
        objective: The loss :math:`L` on the probe set.
        directions: The rows :math:`d_i`, shape ``(K, dim)`` (or ``(dim,)``).
        third_order: ``"diagonal"``, ``"full"`` or ``"none"`` (see
            :class:`BlockDerivatives`).
        names: A name per direction; ``"d1"``, ``"d2"``, … by default.
        point: θ as a flat vector; the module's parameters by default.

    Returns:
        The :class:`BlockDerivatives` (float64, summed over processes).

    Raises:
        ValueError: For directions of the wrong shape, names of the wrong length,
            an unknown ``third_order``, or, with third order, an objective that
            calls a fused normalization with wrong third derivatives.
    """
    rows = directions.reshape(1, -1) if directions.dim() == 1 else directions
    if rows.dim() != 2 or rows.shape[1] != objective.dim or rows.shape[0] < 1:
        raise ValueError(
            f"`directions` must have shape (K, {objective.dim}) or "
            f"({objective.dim},), got {tuple(directions.shape)}."
        )
    count = rows.shape[0]
    labels = [f"d{i + 1}" for i in range(count)] if names is None else list(names)
    if len(labels) != count:
        raise ValueError(
            f"`names` must hold one name per direction ({count}), got {len(labels)}."
        )
    rows = rows.detach().to(dtype=objective.dtype, device=objective.device)
    directions = [objective.split(row) for row in rows]
    theta = _point(objective, point)
    return _derivatives(objective, theta, directions, labels, third_order)


def block_derivatives(
    objective: ProbeObjective,
    directions: Directions,
    groups: Groups | None = None,
    *,
    third_order: ThirdOrder = "diagonal",
    point: Tensor | None = None,
) -> BlockDerivatives:
    r"""Block-structured derivatives along a direction split by parameter groups.

    The direction :math:`d` is cut into :math:`d_i` = its restriction to the
    :math:`i`-th group of parameter tensors, and the derivatives of
    :math:`\varphi(t) = L(\theta + \sum_i t_i d_i)` at 0 are returned (see the
    module docstring). For :math:`d = -\nabla L`, :math:`\partial_i\varphi =
    -\lVert \nabla_{(i)} L \rVert^2`; for :math:`d` the last update, :math:`t =
    (1, \dots, 1)` is the step that was taken.

    Args:
        objective: The loss :math:`L` on the probe set.
        directions: :math:`d` as a flat vector of ``objective.dim`` entries, as one
            tensor per trainable parameter (in ``objective.names`` order, each of
            that parameter's shape), or as a mapping from parameter name to tensor
            covering every trainable parameter.
        groups: Lists of parameter names, each list one group, covering every
            trainable parameter exactly once, or a mapping from group name to such
            a list. ``None``: one group per parameter tensor.
        third_order: ``"diagonal"`` (:math:`\partial_{iii}\varphi`), ``"full"``
            (the :math:`K \times K \times K` tensor, for small :math:`K`) or
            ``"none"``.
        point: θ as a flat vector; the module's parameters by default.

    Returns:
        The :class:`BlockDerivatives`, one entry per group (float64, summed over
        processes).

    Raises:
        ValueError: If ``directions`` does not match the parameters, if ``groups``
            names an unknown parameter, repeats one, or leaves one out, or as in
            :func:`directional_derivatives`.

    Example:
        >>> import torch
        >>> from lightning_eos.curvature import ProbeObjective, block_derivatives
        >>> model = torch.nn.Linear(2, 1)
        >>> data = [(torch.randn(8, 2), torch.randn(8, 1))]
        >>> objective = ProbeObjective(
        ...     model, data, loss_fn=torch.nn.functional.mse_loss
        ... )
        >>> gradient = [p.detach() for p in model.parameters()]
        >>> result = block_derivatives(objective, gradient, third_order="none")
        >>> result.names, tuple(result.hessian.shape)
        (['weight', 'bias'], (2, 2))
    """
    pieces = _direction_pieces(objective, directions)
    labels, members = group_members(objective.names, groups)
    blocks = [
        [piece if index in indices else None for index, piece in enumerate(pieces)]
        for indices in members
    ]
    theta = _point(objective, point)
    return _derivatives(objective, theta, blocks, labels, third_order)


# -- the computation ------------------------------------------------------------------


def _derivatives(
    objective: ProbeObjective,
    theta: Tensor,
    directions: list[list[Tensor | None]],
    names: list[str],
    third_order: ThirdOrder,
) -> BlockDerivatives:
    """Sum :func:`reduced_derivatives` over the chunks, then over processes."""
    if third_order not in ("none", "diagonal", "full"):
        raise ValueError(
            f"`third_order` must be 'none', 'diagonal' or 'full', got {third_order!r}."
        )
    if third_order != "none":
        calls = native_normalization_calls(objective)
        if calls:
            raise ValueError(
                f"Third derivatives through {'; '.join(calls)} are wrong in PyTorch "
                "(see lightning_eos.curvature.normalization): build the "
                "ProbeObjective with normalization='plain'."
            )
    count, dtype, device = len(names), objective.dtype, objective.device
    loss = torch.zeros((), dtype=dtype, device=device)
    gradient = torch.zeros(count, dtype=dtype, device=device)
    hessian = torch.zeros(count, count, dtype=dtype, device=device)
    shape = (count,) * (3 if third_order == "full" else 1)
    third = torch.zeros(shape, dtype=dtype, device=device)
    passes = 0
    # Fresh leaves for every chunk: each chunk's graph is freed before the next.
    variables = [t.requires_grad_() for t in objective.split(theta.clone())]
    for chunk_loss in objective.chunk_losses(variables):
        reduced = reduced_derivatives(
            variables, directions, loss=chunk_loss, third_order=third_order
        )
        passes = 1 + reduced.num_hvps + reduced.num_third_order
        loss = loss + chunk_loss.detach()
        gradient += reduced.gradient
        hessian += reduced.hessian
        if reduced.third_order is not None:
            third += reduced.third_order
    packed = objective._reduce(
        torch.cat([loss.reshape(1), gradient, hessian.reshape(-1), third.reshape(-1)])
    ).double()
    gradient = packed[1 : 1 + count]
    hessian = packed[1 + count : 1 + count + count**2].reshape(count, count)
    result = None if third_order == "none" else packed[1 + count + count**2 :]
    if third_order == "full":
        result = symmetrize(result.reshape(count, count, count))
    return BlockDerivatives(
        names, float(packed[0]), gradient, hessian, result, num_backward=passes
    )


def symmetrize(tensor: Tensor) -> Tensor:
    """The average of a three-way tensor over the six permutations of its axes."""
    permutations = [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]
    return sum(tensor.permute(*p) for p in permutations) / 6


def _point(objective: ProbeObjective, point: Tensor | None) -> Tensor:
    if point is None:
        return objective.point()
    if point.shape != (objective.dim,):
        raise ValueError(
            f"`point` must be a flat vector of {objective.dim} entries, got shape "
            f"{tuple(point.shape)}."
        )
    return point.detach().to(dtype=objective.dtype, device=objective.device)


def _direction_pieces(
    objective: ProbeObjective, directions: Directions
) -> list[Tensor]:
    """The direction as one tensor per trainable parameter, checked and cast."""
    if isinstance(directions, Tensor):
        if directions.shape != (objective.dim,):
            raise ValueError(
                f"`directions` as a flat vector must have shape ({objective.dim},), "
                f"got {tuple(directions.shape)}."
            )
        pieces = objective.split(directions)
    elif isinstance(directions, Mapping):
        missing = [n for n in objective.names if n not in directions]
        unknown = [n for n in directions if n not in objective.names]
        if missing or unknown:
            raise ValueError(
                "`directions` must map every trainable parameter name to a tensor; "
                f"missing {missing}, unknown {unknown}."
            )
        pieces = [directions[name] for name in objective.names]
    else:
        pieces = list(directions)
        if len(pieces) != len(objective.names):
            raise ValueError(
                f"`directions` must hold one tensor per trainable parameter "
                f"({len(objective.names)}), got {len(pieces)}."
            )
    for name, piece, shape in zip(
        objective.names, pieces, objective.shapes, strict=True
    ):
        if tuple(piece.shape) != tuple(shape):
            raise ValueError(
                f"`directions` for parameter {name!r} must have shape "
                f"{tuple(shape)}, got {tuple(piece.shape)}."
            )
    return [
        p.detach().to(dtype=objective.dtype, device=objective.device) for p in pieces
    ]


def group_members(
    names: Sequence[str], groups: Groups | None
) -> tuple[list[str], list[list[int]]]:
    """Group names and the parameter indices of each group, checked to partition.

    Args:
        names: The trainable parameter names, in order.
        groups: As in :func:`block_derivatives`.

    Returns:
        The group names and, per group, the indices of its parameters in ``names``.

    Raises:
        ValueError: If ``groups`` names an unknown parameter, repeats one, leaves
            one out, or has an empty group.
    """
    names = list(names)
    if groups is None:
        return names, [[i] for i in range(len(names))]
    if isinstance(groups, Mapping):
        labels = [str(name) for name in groups]
        lists = [list(groups[name]) for name in groups]
    else:
        lists = [list(group) for group in groups]
        labels = [
            group[0] if len(group) == 1 else f"group{i + 1}"
            for i, group in enumerate(lists)
        ]
    position = {name: i for i, name in enumerate(names)}
    seen: dict[str, int] = {}
    members: list[list[int]] = []
    for number, group in enumerate(lists):
        if not group:
            raise ValueError(f"`groups` entry {labels[number]!r} is empty.")
        indices = []
        for name in group:
            if name not in position:
                raise ValueError(
                    f"`groups` names {name!r}, which is not a trainable parameter; "
                    f"the trainable parameters are {names}."
                )
            if name in seen:
                raise ValueError(
                    f"`groups` puts parameter {name!r} in two groups "
                    f"({labels[seen[name]]!r} and {labels[number]!r})."
                )
            seen[name] = number
            indices.append(position[name])
        members.append(indices)
    left_out = [name for name in names if name not in seen]
    if left_out:
        raise ValueError(
            f"`groups` must cover every trainable parameter; {left_out} are in no "
            "group."
        )
    return labels, members
