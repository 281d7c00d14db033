r"""A penalty as a differentiable function of the parameters, for loss-based optimizers.

:meth:`Penalty.evaluate <lightning_eos.penalties.Penalty.evaluate>` returns the
penalty's value and exact gradient as numbers, which is all a first-order optimizer
needs. An optimizer that also differentiates the gradient (Newton-CG, cubic
regularization) or compares loss values at trial points (line searches,
trust-region tests) needs the penalty as a term of its objective instead: a scalar
tensor of the parameters, with its graph, that it can differentiate twice and
evaluate anywhere. :class:`PenaltyTerm` is that term, frozen at one evaluation:

* :class:`GradientNormTerm`, :math:`s(\theta) = \sum_k a_k\|\nabla L_k(\theta)\|^2`,
  is the gradient-norm penalty itself: its value, gradient and Hessian are exact at
  every point;
* :class:`CurvatureTerm`, :math:`s(\theta) = \sum_i a_i\, v_i^\top \nabla^2
  L(\theta)\, v_i` with the vectors :math:`v_i` and weights :math:`a_i` of the
  evaluation held fixed, is the sharpness, trace and central-flow penalties. At the
  point of the evaluation its value and gradient are the penalty's; its Hessian
  leaves out what moving the vectors would add (for the sharpness
  :math:`\lambda_1`, the positive semidefinite term
  :math:`2\sum_{j>1} T[u_1, u_j]T[u_1, u_j]^\top/(\lambda_1 - \lambda_j)`), and
  away from the point its value is the Rayleigh quotient of the fixed vector, a
  lower bound on :math:`\lambda_1` that agrees with it to second order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_eos.curvature.objective import ProbeObjective


class PenaltyTerm:
    """A penalty as a differentiable scalar function of the module's parameters.

    Call it with the trainable parameters of the objective's module (in the order
    of ``objective.names``; by default the module's own tensors) to get the
    penalty's value as a scalar tensor whose graph reaches them: ``backward`` on
    ``loss + term()`` then adds the penalty's gradient, and a backward pass with
    ``create_graph=True`` its curvature. It is evaluated on the objective's data
    in one pass with graph, so its memory is that of all the data at once, not of
    one chunk. Normalization layers are evaluated in plain tensor operations
    (``ProbeObjective(normalization="plain")``), whose derivatives are exact to
    every order, and buffers (BatchNorm running statistics, used in eval mode)
    and frozen parameters are held as they were when the term was made.

    Args:
        objectives: The losses whose derivatives make the term (one per minibatch
            for the minibatch gradient norm, else one).
    """

    def __init__(self, objectives: Sequence[ProbeObjective]) -> None:
        # Differentiating the term twice takes third derivatives of L, which
        # PyTorch's fused normalization kernels get wrong: use the plain formulas.
        self.objectives = [o.with_normalization("plain") for o in objectives]
        # The buffers as they are now: later closure calls of the step run training
        # forward passes that move running statistics before the term is evaluated.
        frozen, buffers = self.objectives[0].constants()
        self.constants = (
            {k: v.clone() for k, v in frozen.items()},
            {k: v.clone() for k, v in buffers.items()},
        )

    def __call__(self, parameters: Sequence[Tensor] | None = None) -> Tensor:
        """The term at ``parameters`` (default: the module's current parameters)."""
        objective = self.objectives[0]
        if parameters is None:
            parameters = objective._variable_tensors()
        parameters = list(parameters)
        if len(parameters) != len(objective.names):
            raise ValueError(
                f"The term needs the {len(objective.names)} trainable parameter "
                f"tensors of the objective's module, got {len(parameters)}."
            )
        with torch.enable_grad():
            return self._value(parameters)

    def _value(self, parameters: list[Tensor]) -> Tensor:
        raise NotImplementedError


class GradientNormTerm(PenaltyTerm):
    r""":math:`s(\theta) = \sum_k a_k \|\nabla L_k(\theta)\|^2`, exact at every point.

    Args:
        objectives: The losses :math:`L_k`.
        weights: The weights :math:`a_k`, one per objective.
    """

    def __init__(
        self, objectives: Sequence[ProbeObjective], weights: Sequence[float]
    ) -> None:
        super().__init__(objectives)
        self.weights = [float(a) for a in weights]

    def _value(self, parameters: list[Tensor]) -> Tensor:
        total = None
        for objective, weight in zip(self.objectives, self.weights, strict=True):
            _, gradient = _gradient(objective, parameters, self.constants)
            squared = weight * sum(g.square().sum() for g in gradient)
            total = squared if total is None else total + squared
        assert total is not None
        return total


class CurvatureTerm(PenaltyTerm):
    r"""The curvature term :math:`\sum_i a_i\, v_i^\top \nabla^2 L(\theta)\, v_i`.

    Args:
        objective: The loss :math:`L`.
        vectors: The vectors :math:`v_i`, flat, one per row.
        weights: The weights :math:`a_i`, one per vector.
    """

    def __init__(
        self, objective: ProbeObjective, vectors: Tensor, weights: Sequence[float]
    ) -> None:
        super().__init__([objective])
        self.vectors = vectors.detach().reshape(-1, objective.dim)
        self.weights = [float(a) for a in weights]
        if len(self.weights) != len(self.vectors):
            raise ValueError(
                f"CurvatureTerm needs one weight per vector: got {len(self.weights)} "
                f"weights for {len(self.vectors)} vectors."
            )

    def _value(self, parameters: list[Tensor]) -> Tensor:
        objective = self.objectives[0]
        point, gradient = _gradient(objective, parameters, self.constants)
        flat = objective.flatten(gradient)
        vectors = self.vectors.to(dtype=flat.dtype, device=flat.device)
        total = None
        for vector, weight in zip(vectors, self.weights, strict=True):
            # vᵀHv = ⟨∇⟨∇L, v⟩, v⟩: a double backward pass, kept differentiable.
            pieces = torch.autograd.grad(
                flat @ vector, point, create_graph=True, allow_unused=True
            )
            curvature = objective.flatten(_zeros_for_none(pieces, point)) @ vector
            total = weight * curvature if total is None else total + weight * curvature
        assert total is not None
        return total


def _gradient(
    objective: ProbeObjective,
    parameters: list[Tensor],
    constants: tuple[dict[str, Tensor], dict[str, Tensor]],
) -> tuple[list[Tensor], list[Tensor]]:
    """∇L at ``parameters`` with its graph, and the cast parameters it is taken at."""
    point = [p.to(objective.dtype) for p in parameters]
    loss = sum(objective.chunk_losses(point, constants))
    assert isinstance(loss, Tensor)
    gradient = torch.autograd.grad(loss, point, create_graph=True, allow_unused=True)
    return point, _zeros_for_none(gradient, point)


def _zeros_for_none(
    tensors: Sequence[Tensor | None], like: Sequence[Tensor]
) -> list[Tensor]:
    return [
        t if t is not None else torch.zeros_like(p)
        for t, p in zip(tensors, like, strict=True)
    ]
