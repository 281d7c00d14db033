r"""The preconditioned Hessian of adaptive optimizers and its stability threshold.

An adaptive optimizer steps along :math:`P^{-1}` times a (momentum-averaged)
gradient, with a diagonal preconditioner :math:`P` read from its state. On a
quadratic with Hessian :math:`H` and :math:`P` frozen, the iteration is stable
exactly while the largest eigenvalue of :math:`P^{-1}H` stays below a threshold
that depends only on the momentum (Cohen et al. 2022):

===================  ====================================  ===================
optimizer            :math:`P`                             threshold
===================  ====================================  ===================
Adam, AdamW (β₁)     diag(√v̂ + ε)/η                         (2 + 2β₁)/(1 − β₁)
RMSprop              diag(√ν + ε)/η                         2
RMSprop, momentum β  diag(√ν + ε)/η                         2 + 2β
===================  ====================================  ===================

Here :math:`\hat v = v/(1 - \beta_2^t)` is Adam's bias-corrected second moment.

38 for Adam's default :math:`\beta_1 = 0.9`. The first moment of Adam is an
exponential moving average, hence the EMA threshold of gradient descent with
:math:`\eta = 1`; its bias correction :math:`1/(1 - \beta_1^t)` is ignored, as it
tends to one within a few tens of steps. With ``amsgrad`` the running maximum of
:math:`v` is used, and for a centred RMSprop :math:`\nu` minus the squared mean
gradient. Coupled weight decay :math:`\omega` (``weight_decay`` of Adam and
RMSprop) adds :math:`\omega\theta` to the gradient, so the iteration sees
:math:`P^{-1}(H + \omega I)`, which is what is measured; the decoupled decay of
AdamW shrinks the parameters by :math:`1 - \eta\omega` per step and is not included.

:math:`P^{-1}H` is not symmetric, but it is similar to the symmetric
:math:`P^{-1/2} H P^{-1/2}`, whose eigenvalues an eigensolver finds from Hessian-
vector products: :class:`PreconditionedOperator`.

References:
    Cohen, Ghorbani, Krishnan, Agarwal, Medapati, Badura, Suo, Cardoze, Nado, Dahl,
    Gilmer (2022). Adaptive gradient methods at the edge of stability.
    arXiv:2207.14484.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "AdaptivePreconditioner",
    "PreconditionedOperator",
    "adaptive_preconditioner",
]

_SUPPORTED = (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop)


@dataclass
class AdaptivePreconditioner:
    r"""The diagonal of :math:`P` and the threshold on :math:`\lambda_1(P^{-1}H)`.

    Attributes:
        diagonal: :math:`P` as a flat vector, in the order of the given parameters
            (float64, computed from the state in float64).
        weight_decay: Coupled weight decay :math:`\omega` as a flat vector (zero
            where a group has none).
        threshold: The stability threshold on :math:`\lambda_1(P^{-1}(H + \omega
            I))`, or ``None`` when the parameter groups disagree on the momentum.
        rule: The formula of the threshold, for example ``"(2+2β₁)/(1−β₁)"``.
    """

    diagonal: Tensor
    weight_decay: Tensor
    threshold: float | None
    rule: str


def adaptive_preconditioner(
    optimizer: torch.optim.Optimizer, parameters: Sequence[Tensor]
) -> AdaptivePreconditioner:
    """Read :math:`P` and the threshold from an Adam, AdamW or RMSprop optimizer.

    Args:
        optimizer: The optimizer, after at least one step (its state holds the
            second-moment estimates).
        parameters: The parameters, in the order of the flat vectors to build.

    Returns:
        The :class:`AdaptivePreconditioner`.

    Raises:
        ValueError: If the optimizer is not Adam, AdamW or RMSprop, maximizes, does
            not hold a parameter, or has no second-moment state for one yet.
    """
    name = type(optimizer).__name__
    if not isinstance(optimizer, _SUPPORTED):
        raise ValueError(
            f"`optimizer` must be torch.optim.Adam, AdamW or RMSprop to read a "
            f"diagonal preconditioner from its state, got {name}."
        )
    group_of = {
        id(p): group for group in optimizer.param_groups for p in group["params"]
    }
    for index, parameter in enumerate(parameters):
        if id(parameter) not in group_of:
            raise ValueError(
                f"`optimizer` does not hold parameter {index} (shape "
                f"{tuple(parameter.shape)}): its preconditioner is unknown."
            )
    diagonals, decays, momenta = [], [], set()
    for index, parameter in enumerate(parameters):
        group = group_of[id(parameter)]
        if group.get("maximize", False):
            raise ValueError(f"`optimizer` {name} maximizes: it has no stable edge.")
        state = optimizer.state.get(parameter, {})
        diagonal = _diagonal(optimizer, group, state, name, index)
        diagonals.append(diagonal.reshape(-1))
        decoupled = group.get(
            "decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)
        )
        coupled = 0.0 if decoupled else float(group["weight_decay"])
        decays.append(torch.full_like(diagonals[-1], float(coupled)))
        momenta.add(_momentum(optimizer, group))
    threshold, rule = None, "the parameter groups differ in momentum"
    if len(momenta) == 1:
        beta = momenta.pop()
        if isinstance(optimizer, torch.optim.RMSprop):
            threshold, rule = 2 + 2 * beta, "2+2β" if beta else "2"
        else:
            threshold, rule = (2 + 2 * beta) / (1 - beta), "(2+2β₁)/(1−β₁)"
    return AdaptivePreconditioner(
        diagonal=torch.cat(diagonals),
        weight_decay=torch.cat(decays),
        threshold=threshold,
        rule=rule,
    )


class PreconditionedOperator:
    r"""The symmetric :math:`P^{-1/2}(H + \operatorname{diag}\omega)P^{-1/2}`.

    It has the eigenvalues of :math:`P^{-1}(H + \operatorname{diag}\omega)`: an
    eigenvector :math:`z` of the symmetric form gives the eigenvector
    :math:`P^{-1/2}z` of the other. One Hessian-vector product per product.

    Args:
        operator: :math:`H`, for example a
            :class:`~lightning_eos.curvature.HessianOperator`.
        diagonal: :math:`P` as a flat positive vector.
        weight_decay: :math:`\omega` as a flat vector, or ``None`` for zero.
    """

    def __init__(
        self, operator, diagonal: Tensor, weight_decay: Tensor | None = None
    ) -> None:
        if diagonal.shape != (operator.dim,):
            raise ValueError(
                f"`diagonal` must have shape ({operator.dim},), got "
                f"{tuple(diagonal.shape)}."
            )
        if not bool((diagonal > 0).all()):
            raise ValueError("`diagonal` must be positive everywhere.")
        self.operator = operator
        self.dim, self.dtype, self.device = (
            operator.dim,
            operator.dtype,
            operator.device,
        )
        self.scale = diagonal.to(dtype=self.dtype, device=self.device).rsqrt()
        self.shift = (
            None
            if weight_decay is None
            else (weight_decay.to(dtype=self.dtype, device=self.device) * self.scale**2)
        )

    def matmat(self, vectors: Tensor) -> Tensor:
        r"""Return :math:`P^{-1/2}(H + \omega)P^{-1/2} v` for the rows ``v``."""
        products = self.scale * self.operator.matmat(vectors * self.scale)
        if self.shift is not None:
            products = products + self.shift * vectors
        return products


def _diagonal(optimizer, group: dict, state: dict, name: str, index: int) -> Tensor:
    lr, eps = float(group["lr"]), float(group["eps"])
    if isinstance(optimizer, torch.optim.RMSprop):
        if "square_avg" not in state:
            raise ValueError(
                f"`optimizer` {name} has no 'square_avg' state for parameter "
                f"{index} yet: the preconditioner exists after its first step."
            )
        second = state["square_avg"].double()
        if group.get("centered", False):
            second = second - state["grad_avg"].double() ** 2
        return (second.sqrt() + eps) / lr
    key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
    if key not in state or "step" not in state:
        raise ValueError(
            f"`optimizer` {name} has no '{key}' state for parameter {index} yet: "
            "the preconditioner exists after its first step."
        )
    step = float(state["step"])
    beta2 = float(group["betas"][1])
    corrected = state[key].double() / (1 - beta2**step)
    return (corrected.sqrt() + eps) / lr


def _momentum(optimizer, group: dict) -> float:
    if isinstance(optimizer, torch.optim.RMSprop):
        return float(group["momentum"])
    return float(group["betas"][0])
