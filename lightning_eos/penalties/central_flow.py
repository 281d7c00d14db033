r"""The central-flow penalty: hold the sharpness of a small-step run at 2/η_target."""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_eos._validation import check_number
from lightning_eos.curvature.hessian import HessianOperator
from lightning_eos.curvature.objective import ProbeObjective
from lightning_eos.penalties._base import Penalty, PenaltyResult
from lightning_eos.penalties._eigen import WarmTopEigenpair
from lightning_eos.penalties._terms import CurvatureTerm

#: The ratio of the penalty's gradient to the loss's beyond which a warning is due.
_FAR = 10.0


class CentralFlowPenalty(Penalty):
    r"""The central flow's penalty :math:`\frac12\sigma^2 S` for a larger step.

    Gradient descent with step :math:`\eta_\star` (``target_lr``) at the edge of
    stability oscillates around its *central flow* (Cohen, Damian, Talwalkar,
    Kolter, Lee 2025), which with one critical direction is

    .. math::
        \frac{d\theta}{dt} = -\eta_\star\Bigl[\nabla L + \tfrac12\sigma^2(t)\,
        \nabla S\Bigr],
        \qquad
        \sigma^2 = \max\Bigl(0,\; -\frac{2\langle \nabla L, \nabla S\rangle}
        {\|\nabla S\|^2}\Bigr) \text{ while } S = 2/\eta_\star,

    and :math:`\sigma^2 = 0` (gradient flow) while :math:`S < 2/\eta_\star`. Here
    :math:`S = \lambda_1(\nabla^2 L)` is the sharpness, :math:`\nabla S =
    T[u_1, u_1]` its gradient, and :math:`\sigma^2` the variance of the
    oscillation along :math:`u_1`, chosen so that :math:`S` stays at
    :math:`2/\eta_\star`. Adding :math:`\tfrac12\sigma^2\nabla S` to the gradient
    makes gradient descent with a *small* step :math:`\eta` follow the same path,
    in time :math:`\eta \cdot \text{steps}`: its sharpness is held at the sharpness
    of the large-step run. The penalty's value is :math:`\frac12\sigma^2 S`, and
    its gradient is :math:`\frac12\sigma^2\nabla S` with :math:`\sigma^2` held
    fixed, a Lagrange multiplier rather than a function of :math:`\theta`.

    What "at :math:`2/\eta_\star`" means for discrete steps: a projection rule.
    With :math:`\eta` the learning rate of the step, the sharpness after the
    step :math:`\theta^+ = \theta - \eta(\nabla L + \frac12\sigma^2\nabla S)` is,
    to first order, :math:`S^+ = S - \eta\langle\nabla S, \nabla L\rangle -
    \frac12\eta\sigma^2\|\nabla S\|^2`. The multiplier is the smallest
    :math:`\sigma^2 \ge 0` with :math:`S^+ \le b`, where :math:`b = 2/\eta_\star +
    (1 - \kappa)\max(0, S - 2/\eta_\star)`:

    .. math::
        \sigma^2 = \max\Bigl(0,\; \frac{2\,(S - \eta\langle\nabla S, \nabla L
        \rangle - b)}{\eta\,\|\nabla S\|^2}\Bigr).

    At :math:`S = 2/\eta_\star` this is the central-flow multiplier above; below
    the threshold it is zero unless the plain step would cross it, in which case
    the step lands on it; above the threshold (after an overshoot of the
    linearization, or when the penalty is attached to a run that is already
    sharper) a fraction :math:`\kappa` (``rate``) of the excess is removed per
    step. No tolerance band is needed: the rule is the complementarity condition
    of the central flow (:math:`\sigma^2 \ge 0`, :math:`S \le 2/\eta_\star`, one of
    them tight) applied to the next step. It assumes a gradient-descent step
    :math:`\theta^+ = \theta - \eta g` (torch's SGD without momentum); with other
    optimizers the learning rate is used as :math:`\eta` all the same and the
    sharpness is held only approximately.

    Limits. One critical direction: when a second eigenvalue reaches the threshold
    as well, the central flow's multiplier becomes a matrix on their eigenspace,
    while this penalty acts on whichever is the top eigenvalue at each step, so the
    two alternate at the threshold. If :math:`\nabla S = 0` the multiplier is set
    to zero, and the caller is warned when :math:`S` is above the threshold. Far
    above it where :math:`\nabla S` is small (a penalty attached to a run that is
    already much sharper), removing the excess in one step takes a step of about
    :math:`\kappa(S - 2/\eta_\star)/\|\nabla S\|`, beyond the reach of the
    first-order rule: the caller is warned when the penalty's gradient exceeds
    ten times the loss's (``gradient_ratio`` in the metrics), and a smaller
    ``rate`` spreads the correction over more steps.

    Cost: one gradient with graph, the warm-started Lanczos products and one
    third-order vector per step, whether or not the penalty is active.

    Args:
        target_lr: :math:`\eta_\star`, the step size whose sharpness to imitate,
            positive.
        rate: :math:`\kappa`, the fraction of an excess sharpness removed per step,
            in (0, 1].
        tol: Relative residual tolerance of the eigensolver, in (0, 1].
        max_iter: Most Lanczos steps per evaluation, at least 1.
        extra_vectors: Ritz vectors kept beyond the top one for the warm start,
            at least 0.
        seed: Seed of the random start vectors, in ``[0, 2**32 - 1]``.

    References:
        Cohen, Damian, Talwalkar, Kolter, Lee (2025). Understanding optimization in
        deep learning with central flows. ICLR.
        Damian, Nichani, Lee (2023). Self-stabilization: the implicit bias of
        gradient descent at the edge of stability. ICLR.
    """

    name = "central_flow"
    has_term = True
    needs_third_order = True

    def __init__(
        self,
        target_lr: float,
        rate: float = 1.0,
        tol: float = 1e-3,
        max_iter: int = 100,
        extra_vectors: int = 1,
        seed: int = 0,
    ) -> None:
        self.target_lr = check_number("target_lr", target_lr, low=0.0, low_open=True)
        self.rate = check_number("rate", rate, low=0.0, high=1.0, low_open=True)
        self.eigensolver = WarmTopEigenpair(tol, max_iter, extra_vectors, seed)

    @property
    def threshold(self) -> float:
        r""":math:`2/\eta_\star`."""
        return 2 / self.target_lr

    @property
    def needs_step_size(self) -> bool:
        """Always: the projection rule needs the learning rate of the step."""
        return True

    def evaluate(
        self, objective: ProbeObjective, step_size: float | None = None
    ) -> PenaltyResult:
        r"""Return :math:`\frac12\sigma^2 S` and :math:`\frac12\sigma^2\nabla S`."""
        if step_size is None or not step_size > 0:
            raise ValueError(
                "CentralFlowPenalty needs the positive learning rate of the step "
                f"(`step_size`) for its projection rule, got {step_size!r}."
            )
        eta = float(step_size)
        operator = HessianOperator(objective)
        gradient = operator.gradient()
        result = self.eigensolver.solve(operator)
        sharpness = float(result.eigenvalues[0])
        u = result.eigenvectors[0]
        if not result.finite:
            nan = torch.full_like(gradient, math.nan)
            return PenaltyResult(
                math.nan, nan, False, {"lambda_1": math.nan}, operator.num_products
            )

        sharpness_gradient = operator.third_order(u, u)
        alignment = float(gradient @ sharpness_gradient)
        squared_norm = float(sharpness_gradient.square().sum())
        sigma2 = self.multiplier(sharpness, alignment, squared_norm, eta)

        gradient_norm = float(gradient.norm())
        # How much the penalty's gradient outweighs the loss's: about 1 or less
        # while the rule projects; far more when it must remove a large excess.
        weight = 0.5 * sigma2 * squared_norm**0.5 / max(gradient_norm, 1e-300)
        metrics = {
            "lambda_1": sharpness,
            "threshold": self.threshold,
            "ratio": sharpness / self.threshold,
            "sigma2": sigma2,
            "sharpening": -alignment,
            "sharpness_gradient_norm": squared_norm**0.5,
            "gradient_ratio": weight,
            "converged": float(result.converged),
        }
        notes = {}
        if sharpness > self.threshold and squared_norm == 0:
            notes["flat"] = (
                f"CentralFlowPenalty: λ₁ = {sharpness:.4g} is above 2/target_lr = "
                f"{self.threshold:.4g}, but its gradient is zero here, so no multiple "
                "of it can lower the sharpness: the penalty stays inactive."
            )
        elif weight > _FAR:
            notes["far"] = (
                f"CentralFlowPenalty: λ₁ = {sharpness:.4g} is "
                f"{sharpness / self.threshold:.3g} × 2/target_lr where its gradient "
                f"is small, and removing rate = {self.rate:g} of the excess in one "
                f"step makes the penalty's gradient {weight:.3g} times the loss's, "
                "beyond the first-order rule's reach: training may diverge. Lower "
                "`rate`, or attach the penalty before λ₁ passes 2/target_lr."
            )
        term = None
        if sigma2 > 0 and objective.all_reduce is None:
            term = CurvatureTerm(objective, u, [0.5 * sigma2])
        return PenaltyResult(
            value=0.5 * sigma2 * sharpness,
            gradient=0.5 * sigma2 * sharpness_gradient,
            active=sigma2 > 0,
            metrics=metrics,
            num_products=operator.num_products,
            num_third_order=operator.num_third_order,
            term=term,
            notes=notes,
        )

    def multiplier(
        self, sharpness: float, alignment: float, squared_norm: float, eta: float
    ) -> float:
        r"""The projection rule's :math:`\sigma^2` (see the class docstring).

        Args:
            sharpness: :math:`S`.
            alignment: :math:`\langle \nabla L, \nabla S\rangle`.
            squared_norm: :math:`\|\nabla S\|^2`.
            eta: The learning rate of the step.
        """
        bound = self.threshold + (1 - self.rate) * max(0.0, sharpness - self.threshold)
        excess = sharpness - eta * alignment - bound
        if excess <= 0 or squared_norm == 0:
            return 0.0
        return 2 * excess / (eta * squared_norm)

    def state_dict(self) -> dict[str, Any]:
        """The eigensolver's generator and eigenvectors."""
        return self.eigensolver.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the eigensolver's generator and eigenvectors."""
        self.eigensolver.load_state_dict(state_dict)

    def _arguments(self) -> dict[str, Any]:
        return {"target_lr": self.target_lr, "rate": self.rate}
