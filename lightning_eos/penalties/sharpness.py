r"""The sharpness penalty :math:`\mu\,\lambda_1(\nabla^2 L)` and its exact gradient."""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_eos.curvature.hessian import HessianOperator
from lightning_eos.curvature.objective import ProbeObjective
from lightning_eos.penalties._base import Penalty, PenaltyResult, check_coefficient
from lightning_eos.penalties._eigen import WarmTopEigenpair
from lightning_eos.penalties._terms import CurvatureTerm


class SharpnessPenalty(Penalty):
    r"""The sharpness penalty :math:`P = \mu\,\lambda_1(\nabla^2 L(\theta))`.

    :math:`S` is the largest algebraic eigenvalue of the Hessian of the objective,
    found by block Lanczos from exact Hessian-vector products, warm-started from
    the previous evaluation's eigenvector (and ``extra_vectors`` further Ritz
    vectors, which guard against a second eigenvalue overtaking the first
    unnoticed). For a simple top eigenvalue with unit eigenvector :math:`u_1`,

    .. math::
        \nabla P = \mu\, \nabla^3 L(\theta)[u_1, u_1]
        = \mu\, \nabla_\theta \bigl(u_1^\top \nabla^2 L(\theta)\, u_1\bigr)
        \Big|_{u_1 \text{ fixed}},

    the third-order vector :math:`T[u_1, u_1]` of
    :meth:`~lightning_eos.curvature.HessianOperator.third_order`. When the top
    eigenvalue is repeated, :math:`S` is not differentiable; the vector returned is
    then the gradient of the Rayleigh quotient along the eigenvector Lanczos
    returned, one element of the subdifferential. The gradient is exact up to the
    eigensolver's accuracy: with relative residual ``tol`` the eigenvector is off by
    about ``tol`` times :math:`S` over the spectral gap, and the value far less.

    Cost: one gradient with graph, the Lanczos products (usually one block of
    ``1 + extra_vectors`` once warm) and one third-order vector (about 5 gradient
    evaluations on the digits MLP on a CPU).

    Third derivatives: PyTorch's native BatchNorm with batch statistics,
    InstanceNorm and LayerNorm give wrong third derivatives; build the objective
    with ``normalization="plain"`` (as
    :class:`~lightning_eos.penalties.PenaltyCallback` does) on models that hold
    them.

    Args:
        coefficient: :math:`\mu`, a finite number at least 0.
        tol: Relative residual tolerance of the eigensolver, in (0, 1].
        max_iter: Most Lanczos steps per evaluation, at least 1.
        extra_vectors: Ritz vectors kept beyond the top one for the warm start,
            at least 0.
        seed: Seed of the random start vectors, in ``[0, 2**32 - 1]``.

    References:
        Cohen, Kaur, Li, Kolter, Talwalkar (2021). Gradient descent on neural
        networks typically occurs at the edge of stability. ICLR.
        Damian, Nichani, Lee (2023). Self-stabilization: the implicit bias of
        gradient descent at the edge of stability. ICLR.
    """

    name = "sharpness"
    has_term = True
    needs_third_order = True

    def __init__(
        self,
        coefficient: float,
        tol: float = 1e-3,
        max_iter: int = 100,
        extra_vectors: int = 1,
        seed: int = 0,
    ) -> None:
        self.coefficient = check_coefficient("coefficient", coefficient, False)
        self.eigensolver = WarmTopEigenpair(tol, max_iter, extra_vectors, seed)

    def evaluate(
        self, objective: ProbeObjective, step_size: float | None = None
    ) -> PenaltyResult:
        r"""Return :math:`\mu S` and :math:`\mu T[u_1, u_1]`."""
        mu = float(self.coefficient)
        operator = HessianOperator(objective)
        result = self.eigensolver.solve(operator)
        sharpness = float(result.eigenvalues[0])
        metrics = {
            "lambda_1": sharpness,
            "converged": float(result.converged),
            "coefficient": mu,
        }
        active = mu != 0 and result.finite
        term = None
        if active:
            u = result.eigenvectors[0]
            gradient = mu * operator.third_order(u, u)
            if objective.all_reduce is None:
                term = CurvatureTerm(objective, u, [mu])
        elif result.finite:
            gradient = torch.zeros(
                objective.dim, dtype=operator.dtype, device=operator.device
            )
        else:
            gradient = torch.full(
                (objective.dim,), math.nan, dtype=operator.dtype, device=operator.device
            )
        return PenaltyResult(
            value=mu * sharpness,
            gradient=gradient,
            active=active,
            metrics=metrics,
            num_products=operator.num_products,
            num_third_order=operator.num_third_order,
            term=term,
        )

    def state_dict(self) -> dict[str, Any]:
        """The eigensolver's generator and eigenvectors."""
        return self.eigensolver.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the eigensolver's generator and eigenvectors."""
        self.eigensolver.load_state_dict(state_dict)

    def _arguments(self) -> dict[str, Any]:
        solver = self.eigensolver
        return {
            "coefficient": self.coefficient,
            "tol": solver.tol,
            "max_iter": solver.max_iter,
            "extra_vectors": solver.extra_vectors,
        }
