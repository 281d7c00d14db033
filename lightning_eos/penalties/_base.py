"""What every penalty shares: its result, its coefficient, its state and its checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_eos._validation import check_number
from lightning_eos.curvature.objective import ProbeObjective
from lightning_eos.penalties._terms import PenaltyTerm

#: A penalty coefficient: a non-negative number, or ``"lr"`` for the learning rate of
#: the step the penalty is added to.
Coefficient = float | Literal["lr"]


@dataclass
class PenaltyResult:
    r"""One evaluation of a penalty :math:`P` at the current parameters.

    Attributes:
        value: :math:`P(\theta)` (summed over processes).
        gradient: :math:`\nabla P(\theta)`, flat, in the objective's type (the same
            on every process).
        active: Whether the gradient is to be added to the training gradient. A
            penalty whose coefficient is zero at this step is inactive: its
            gradient is exactly zero and adding it would change nothing but the
            sign of zero entries, so it is not added at all.
        metrics: Further scalars to log (the penalized quantity itself, for
            example the sharpness), keyed by short names.
        num_products: Hessian-vector products spent.
        num_third_order: Third-order vectors :math:`T[u, v]` spent.
        term: The penalty as a differentiable function of the parameters, frozen
            at this evaluation (:class:`~lightning_eos.penalties.PenaltyTerm`),
            for optimizers that differentiate or compare values of their
            objective; ``None`` for an inactive or non-finite penalty, and for an
            objective whose data is spread over several processes.
        notes: Conditions the caller should warn about once each, keyed by a
            short name (a penalty that cannot do what it is for at this point).
    """

    value: float
    gradient: Tensor
    active: bool
    metrics: dict[str, float] = field(default_factory=dict)
    num_products: int = 0
    num_third_order: int = 0
    term: PenaltyTerm | None = None
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def gradient_norm(self) -> float:
        r""":math:`\|\nabla P(\theta)\|`."""
        return float(self.gradient.norm())


class Penalty:
    r"""An explicit penalty :math:`P(\theta)` with its exact gradient.

    A penalty is evaluated on a :class:`~lightning_eos.curvature.ProbeObjective` (the
    loss of a module on a set of batches, summed over processes) at the module's
    current parameters. Subclasses implement :meth:`evaluate`; the ones with state
    kept between steps (warm-started eigenvectors, a random generator) implement
    :meth:`state_dict` and :meth:`load_state_dict`, so that a run resumed from a
    checkpoint evaluates what an uninterrupted one would.

    Attributes:
        name: Short name, used in logged keys (``penalty/<name>/value``).
        needs_third_order: Whether the gradient uses third derivatives of the loss
            (:class:`~lightning_eos.penalties.PenaltyCallback` then evaluates
            normalization layers in plain tensor operations, whose third
            derivatives autograd gets right).
        has_term: Whether :meth:`evaluate` returns the penalty as a
            differentiable :class:`~lightning_eos.penalties.PenaltyTerm` as
            well, which the second-order optimizers need.
    """

    name: str = "penalty"
    needs_third_order: bool = False
    has_term: bool = False

    @property
    def needs_step_size(self) -> bool:
        """Whether :meth:`evaluate` needs the learning rate of the step."""
        return False

    def evaluate(
        self, objective: ProbeObjective, step_size: float | None = None
    ) -> PenaltyResult:
        r"""Evaluate the penalty and its gradient at the module's parameters.

        Args:
            objective: The loss :math:`L` on the data the penalty is built from.
            step_size: The learning rate :math:`\eta` of the step the penalty is
                added to, for penalties that need it.

        Returns:
            The :class:`PenaltyResult`.
        """
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """State kept between evaluations, for checkpoints."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state returned by :meth:`state_dict`."""

    def __repr__(self) -> str:
        arguments = ", ".join(f"{k}={v!r}" for k, v in self._arguments().items())
        return f"{type(self).__name__}({arguments})"

    def _arguments(self) -> dict[str, Any]:
        return {}


# -- argument checks ------------------------------------------------------------------


def check_coefficient(name: str, value: Any, allow_lr: bool) -> Coefficient:
    """Return ``value`` as a float (or ``"lr"``), or raise a ``ValueError``.

    Accepted: a finite number at least 0, and ``"lr"`` when ``allow_lr`` is true.
    """
    if allow_lr and value == "lr":
        return "lr"
    try:
        return check_number(name, value, low=0.0)
    except ValueError as error:
        if not allow_lr:
            raise
        raise ValueError(f"{error} 'lr' is accepted too.") from None


def resolve_coefficient(
    coefficient: Coefficient, step_size: float | None, owner: str
) -> float:
    """The numeric coefficient: ``coefficient`` itself, or the step size for "lr"."""
    if coefficient != "lr":
        return float(coefficient)
    if step_size is None:
        raise ValueError(
            f"{owner} was built with coefficient='lr' and needs the learning rate: "
            "pass `step_size` to `evaluate`."
        )
    return float(step_size)


def unit_random(
    count: int,
    dim: int,
    generator: torch.Generator,
    like: Tensor,
    distribution: Literal["rademacher", "gaussian"],
) -> Tensor:
    """``count`` random vectors with identity second moment, on ``like``'s device."""
    if distribution == "rademacher":
        signs = torch.randint(0, 2, (count, dim), generator=generator)
        vectors = signs.to(torch.float64) * 2 - 1
    else:
        vectors = torch.randn(count, dim, generator=generator, dtype=torch.float64)
    return vectors.to(dtype=like.dtype, device=like.device)
