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
    ``create_graph=True`` its curvature. A call holds the graph of all the
    objective's chunks at once, which a second derivative of the term needs;
    :meth:`value` and :meth:`value_and_gradient` give the value and the gradient
    without a graph, one chunk at a time, so that their memory is that of one
    chunk. Normalization layers are evaluated in plain tensor operations
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
        parameters = self._parameters(parameters)
        needing = sum(p.requires_grad for p in parameters)
        if needing < len(parameters):
            raise ValueError(
                "A PenaltyTerm called with tensors is differentiated with respect to "
                f"them, but {len(parameters) - needing} of the {len(parameters)} "
                "tensors passed do not require grad: pass the module's trainable "
                "parameters, or use `term.value(tensors)` for the value alone."
            )
        with torch.enable_grad():
            value = self._value(parameters)
        if not value.requires_grad:
            # A term constant in the parameters (the curvature of a loss quadratic
            # in them) still gets the graph promised: an exact zero that reaches them.
            zero = sum(p.reshape(-1)[:0].sum() for p in parameters)
            value = value + zero
        return value

    def value(self, parameters: Sequence[Tensor] | None = None) -> float:
        """The term's value, one chunk at a time (memory of one chunk)."""
        value, _ = self._chunked(self._point(parameters), gradient=False)
        return value

    def value_and_gradient(
        self, parameters: Sequence[Tensor] | None = None
    ) -> tuple[float, list[Tensor]]:
        """The term's value and gradient, one chunk at a time, without a graph.

        The gradient pieces have the shapes and types of ``parameters``. The
        result equals ``term(parameters)`` and its gradient to rounding; its
        memory is that of one chunk of the objective's data, not of all of it.
        """
        tensors = self._parameters(parameters)
        point = self._point(tensors)
        if len(self.objectives) == 1 and len(self.objectives[0].chunks) == 1:
            # One chunk: the term's whole graph is that of one chunk.
            with torch.enable_grad():
                whole = self._value(point)
            value = float(whole.detach())
            gradient = _zeros_for_none(
                torch.autograd.grad(whole, point, allow_unused=True)
                if whole.requires_grad
                else [None] * len(point),
                point,
            )
        else:
            value, chunked = self._chunked(point, gradient=True)
            assert chunked is not None
            gradient = chunked
        return value, [
            g.to(dtype=t.dtype, device=t.device)
            for g, t in zip(gradient, tensors, strict=True)
        ]

    def _parameters(self, parameters: Sequence[Tensor] | None) -> list[Tensor]:
        objective = self.objectives[0]
        if parameters is None:
            parameters = objective._variable_tensors()
        parameters = list(parameters)
        if len(parameters) != len(objective.names):
            raise ValueError(
                f"The term needs the {len(objective.names)} trainable parameter "
                f"tensors of the objective's module, got {len(parameters)}."
            )
        for index, (tensor, name, shape) in enumerate(
            zip(parameters, objective.names, objective.shapes, strict=True)
        ):
            if tuple(tensor.shape) != tuple(shape):
                raise ValueError(
                    f"Tensor {index} passed to the term stands for the parameter "
                    f"{name!r} of shape {tuple(shape)}, got shape "
                    f"{tuple(tensor.shape)}."
                )
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "A PenaltyTerm differentiates the loss even for its value, which "
                "torch.inference_mode() forbids: call it outside inference mode "
                "(torch.no_grad() is fine for term.value)."
            )
        return parameters

    def _point(self, parameters: Sequence[Tensor] | None) -> list[Tensor]:
        """Detached leaf copies of the parameters in the objective's type."""
        dtype = self.objectives[0].dtype
        return [
            p.detach().to(dtype).requires_grad_(True)
            for p in self._parameters(parameters)
        ]

    def _value(self, parameters: list[Tensor]) -> Tensor:
        raise NotImplementedError

    def _chunked(
        self, point: list[Tensor], gradient: bool
    ) -> tuple[float, list[Tensor] | None]:
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

    def _chunked(
        self, point: list[Tensor], gradient: bool
    ) -> tuple[float, list[Tensor] | None]:
        # s = Σ_k a_k‖g_k‖² with g_k = Σ_c ∇ℓ_c; ∇s = Σ_k 2a_k Σ_c H_c g_k: one pass
        # for each g_k, then one Hessian-vector product per chunk.
        value = 0.0
        total = [torch.zeros_like(p) for p in point] if gradient else None
        with torch.enable_grad():
            for objective, weight in zip(self.objectives, self.weights, strict=True):
                if total is not None and len(objective.chunks) == 1:
                    # One chunk (a minibatch): its graph is all there is; keep it.
                    (loss,) = objective.chunk_losses(point, self.constants)
                    pieces = torch.autograd.grad(
                        loss, point, create_graph=True, allow_unused=True
                    )
                    squared = sum(g.square().sum() for g in pieces if g is not None)
                    assert isinstance(squared, Tensor)
                    value += weight * float(squared.detach())
                    if squared.requires_grad:
                        product = torch.autograd.grad(squared, point, allow_unused=True)
                        _accumulate(total, product, weight)
                    continue
                full = [torch.zeros_like(p) for p in point]
                for loss in objective.chunk_losses(point, self.constants):
                    pieces = torch.autograd.grad(loss, point, allow_unused=True)
                    _accumulate(full, pieces)
                value += weight * float(sum(g.square().sum() for g in full))
                if total is None:
                    continue
                for loss in objective.chunk_losses(point, self.constants):
                    pieces = _zeros_for_none(
                        torch.autograd.grad(
                            loss, point, create_graph=True, allow_unused=True
                        ),
                        point,
                    )
                    inner = sum(
                        (piece * g).sum() for piece, g in zip(pieces, full, strict=True)
                    )
                    assert isinstance(inner, Tensor)
                    if not inner.requires_grad:  # L is linear in the parameters
                        continue
                    product = torch.autograd.grad(inner, point, allow_unused=True)
                    _accumulate(total, product, 2 * weight)
        return value, total


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
            if not flat.requires_grad:  # L is linear in the parameters: H = 0
                curvature = flat.new_zeros(())
            else:
                # vᵀHv = ⟨∇⟨∇L, v⟩, v⟩: a double backward pass, kept differentiable.
                pieces = torch.autograd.grad(
                    flat @ vector, point, create_graph=True, allow_unused=True
                )
                curvature = objective.flatten(_zeros_for_none(pieces, point)) @ vector
            total = weight * curvature if total is None else total + weight * curvature
        assert total is not None
        return total

    def _chunked(
        self, point: list[Tensor], gradient: bool
    ) -> tuple[float, list[Tensor] | None]:
        # s = Σ_c Σ_i a_i v_iᵀH_c v_i is a sum over chunks: each chunk's part and
        # its gradient are taken, and its graph freed, before the next.
        objective = self.objectives[0]
        vectors = self.vectors.to(dtype=objective.dtype, device=point[0].device)
        value = 0.0
        total = [torch.zeros_like(p) for p in point] if gradient else None
        with torch.enable_grad():
            for loss in objective.chunk_losses(point, self.constants):
                pieces = _zeros_for_none(
                    torch.autograd.grad(
                        loss, point, create_graph=True, allow_unused=True
                    ),
                    point,
                )
                flat = objective.flatten(pieces)
                part = None
                for vector, weight in zip(vectors, self.weights, strict=True):
                    if not flat.requires_grad:  # L is linear: no curvature
                        break
                    products = torch.autograd.grad(
                        flat @ vector,
                        point,
                        retain_graph=True,
                        create_graph=gradient,
                        allow_unused=True,
                    )
                    curvature = objective.flatten(_zeros_for_none(products, point))
                    term = weight * (curvature @ vector)
                    part = term if part is None else part + term
                if part is None:
                    continue
                value += float(part.detach())
                if total is not None and part.requires_grad:
                    _accumulate(
                        total, torch.autograd.grad(part, point, allow_unused=True)
                    )
        return value, total


def _accumulate(
    total: list[Tensor], pieces: Sequence[Tensor | None], scale: float = 1.0
) -> None:
    for into, piece in zip(total, pieces, strict=True):
        if piece is not None:
            into.add_(piece.detach(), alpha=scale)


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
