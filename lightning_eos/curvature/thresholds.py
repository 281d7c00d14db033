r"""Stability thresholds: the sharpness above which an optimizer's step is unstable.

On a quadratic with Hessian :math:`H`, gradient descent with step :math:`\eta`
multiplies the component along an eigenvector with eigenvalue :math:`\lambda` by
:math:`1 - \eta\lambda` each step, and diverges along it exactly when
:math:`\lambda > 2/\eta`. With momentum the iteration is a linear recurrence of
order two whose roots leave the unit disc at the thresholds below (Cohen et al.
2021, "Gradient descent on neural networks typically occurs at the edge of
stability", and their Appendix on momentum):

============================  ============================================
torch.optim.SGD               threshold on :math:`\lambda_1(H)`
============================  ============================================
no momentum                   :math:`2/\eta`
momentum β, dampening τ       :math:`(2 + 2\beta)/((1 - \tau)\eta)`
Nesterov momentum β           :math:`(2 + 2\beta)/((1 + 2\beta)\eta)`
============================  ============================================

Dampening τ = 0 is heavy-ball momentum, (2 + 2β)/η; τ = β is the exponential
moving average :math:`m \leftarrow \beta m + (1 - \beta) g`, (2 + 2β)/((1 − β)η).
Coupled weight decay ``weight_decay = ω`` adds :math:`\omega\theta` to the gradient,
so the iteration sees :math:`H + \omega I`; the threshold on :math:`\lambda_1(H)` is
the one above minus ω.

Adaptive methods (Adam, RMSProp) have thresholds on the *preconditioned* Hessian
:math:`P^{-1}H` (Cohen et al. 2022, "Adaptive gradient methods at the edge of
stability"), not on :math:`H`: no threshold on :math:`\lambda_1(H)` is returned for
them.

An optimizer of any other class can declare its own threshold by defining a method
``stability_threshold(self)`` that returns a float, ``None``, or a
:class:`StabilityThreshold` (with its rule, or the reason why there is none).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_ADAPTIVE = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adadelta,
)


@dataclass(frozen=True)
class StabilityThreshold:
    r"""A threshold on the sharpness, or the reason why there is none.

    Attributes:
        value: The threshold on :math:`\\lambda_1(H)`, or ``None``.
        rule: The formula used, for example ``"2/η"``.
        reason: Why ``value`` is ``None``.
    """

    value: float | None
    rule: str = ""
    reason: str = ""


def stability_threshold(optimizer: torch.optim.Optimizer) -> StabilityThreshold:
    """The stability threshold of an optimizer's next step, from its param groups.

    Args:
        optimizer: The optimizer, with the learning rate and momentum of the step
            to be judged in its ``param_groups``.

    Returns:
        The threshold, or a value of ``None`` with the reason.
    """
    declared = getattr(optimizer, "stability_threshold", None)
    if callable(declared):
        value = declared()
        if isinstance(value, StabilityThreshold):
            return value
        name = type(optimizer).__name__
        if value is None:
            return StabilityThreshold(None, reason=f"{name} declares no threshold")
        return StabilityThreshold(float(value), rule=f"{name}.stability_threshold()")
    name = type(optimizer).__name__
    if isinstance(optimizer, _ADAPTIVE):
        return StabilityThreshold(
            None,
            reason=(
                f"{name} adapts its step per coordinate: its stability threshold "
                "applies to the preconditioned Hessian P⁻¹H, not to H"
            ),
        )
    if type(optimizer) is not torch.optim.SGD:
        return StabilityThreshold(
            None, reason=f"no stability threshold is known for {name}"
        )
    return _sgd_threshold(optimizer)


def _sgd_threshold(optimizer: torch.optim.SGD) -> StabilityThreshold:
    keys = ("lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize")
    settings = {
        tuple(_as_float(group[key]) for key in keys) for group in optimizer.param_groups
    }
    if len(settings) > 1:
        return StabilityThreshold(
            None,
            reason=(
                "the parameter groups of SGD differ in learning rate, momentum or "
                "weight decay, so no single threshold applies"
            ),
        )
    lr, beta, tau, nesterov, decay, maximize = settings.pop()
    if maximize:
        return StabilityThreshold(
            None, reason="SGD with maximize=True ascends the loss"
        )
    if lr <= 0:
        return StabilityThreshold(None, reason=f"the learning rate is {lr}")
    if beta and tau >= 1:
        return StabilityThreshold(
            None, reason=f"SGD with dampening {tau} takes no step"
        )
    if beta == 0:
        value, rule = 2 / lr, "2/η"
    elif nesterov:
        value, rule = (2 + 2 * beta) / ((1 + 2 * beta) * lr), "(2+2β)/((1+2β)η)"
    elif tau == 0:
        value, rule = (2 + 2 * beta) / lr, "(2+2β)/η"
    else:
        value, rule = (2 + 2 * beta) / ((1 - tau) * lr), "(2+2β)/((1−τ)η)"
    if decay:
        value, rule = value - decay, f"{rule} − ω"
    return StabilityThreshold(value, rule=rule)


def _as_float(value: object) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)
