"""Pieces shared by the second-order optimizers: settings, line search, eigen-oracle."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_eos._validation import check_choice, check_number
from lightning_eos.curvature.lanczos import Eigenpairs, lanczos
from lightning_eos.optim._base import Derivatives


def check_products(hessian_products: str, fd_step: float) -> None:
    """Check the options of Hessian-vector products."""
    check_choice("hessian_products", hessian_products, ("exact", "finite_difference"))
    check_number("fd_step", fd_step, low=0.0, low_open=True)


def shared_settings(groups: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The settings of the first group, after checking that every group has them.

    The second-order optimizers treat all parameters as one vector, so their
    options cannot differ between parameter groups.

    Raises:
        ValueError: If two groups differ in a setting.
    """
    first = {k: v for k, v in groups[0].items() if k != "params"}
    for group in groups[1:]:
        other = {k: v for k, v in group.items() if k != "params"}
        if other != first:
            raise ValueError(
                f"{name} works on all parameters as one vector: its parameter groups "
                f"must share every setting, got {first} and {other}."
            )
    return first


def cubic_decrease_search(
    derivatives: Derivatives,
    direction: Tensor,
    *,
    initial: float,
    decrease: float,
    shrink: float,
    max_trials: int,
) -> tuple[float, float, int]:
    r"""Backtracking with the cubic sufficient decrease of Royer et al. (2020).

    Tries :math:`\alpha = \alpha_0 s^j`, :math:`j = 0, 1, \dots`, and accepts the
    first with :math:`L(\theta + \alpha d) < L(\theta) - \tfrac{c}{6}\alpha^3
    \|d\|^3`.

    Returns:
        The accepted step length (0 if none), the loss there (the starting loss if
        none) and the number of trials.
    """
    start = float(derivatives.loss)
    norm_cubed = float(direction.norm()) ** 3
    alpha = initial
    for trial in range(1, max_trials + 1):
        value = derivatives.loss_at(derivatives.point + alpha * direction)
        if value < start - decrease / 6 * alpha**3 * norm_cubed:
            return alpha, value, trial
        alpha *= shrink
    return 0.0, start, max_trials


def armijo_search(
    derivatives: Derivatives,
    direction: Tensor,
    *,
    initial: float,
    decrease: float,
    shrink: float,
    max_trials: int,
    first_value: float | None = None,
) -> tuple[float, float, int]:
    r"""Backtracking with Armijo's sufficient decrease.

    Accepts the first :math:`\alpha = \alpha_0 s^j` with :math:`L(\theta + \alpha
    d) \le L(\theta) + c\,\alpha\, \nabla L^\top d`. ``first_value`` is the loss at
    :math:`\alpha_0`, when already known.

    Returns:
        The accepted step length (0 if none), the loss there and the trials.
    """
    start = float(derivatives.loss)
    slope = float(derivatives.gradient @ direction)
    alpha = initial
    for trial in range(1, max_trials + 1):
        if trial == 1 and first_value is not None:
            value = first_value
        else:
            value = derivatives.loss_at(derivatives.point + alpha * direction)
        if value <= start + decrease * alpha * min(slope, 0.0) and math.isfinite(value):
            return alpha, value, trial
        alpha *= shrink
    return 0.0, start, max_trials


class NegatedHessian:
    """The operator :math:`-H`, so that Lanczos's top eigenpair is H's lowest."""

    def __init__(self, hvp: Callable[[Tensor], Tensor], like: Tensor) -> None:
        self.hvp = hvp
        self.dim = like.numel()
        self.dtype = like.dtype
        self.device = like.device

    def matmat(self, vectors: Tensor) -> Tensor:
        """Return :math:`-Hv` for each row ``v``."""
        return torch.stack([-self.hvp(v) for v in vectors])


def lowest_eigenpair(
    hvp: Callable[[Tensor], Tensor],
    like: Tensor,
    *,
    tol: float,
    max_iter: int,
    seed: int,
) -> tuple[float, Tensor, Eigenpairs]:
    """The lowest eigenvalue of the Hessian and its unit eigenvector, by Lanczos.

    Returns:
        The eigenvalue estimate (a Rayleigh quotient, so never below the true
        lowest eigenvalue), the vector and the solver's result.
    """
    generator = torch.Generator().manual_seed(seed)
    result = lanczos(
        NegatedHessian(hvp, like),
        1,
        tol=tol,
        max_iter=min(max_iter, like.numel()),
        generator=generator,
    )
    return -float(result.eigenvalues[0]), result.eigenvectors[0], result
