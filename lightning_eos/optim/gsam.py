"""Surrogate-gap guided sharpness-aware minimization (GSAM)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_eos._validation import check_number
from lightning_eos.curvature.thresholds import StabilityThreshold
from lightning_eos.optim.sam import SAM, BaseOptimizer, Perturb


class GSAM(SAM):
    r"""GSAM: SAM that also descends the surrogate gap (Zhuang et al. 2022).

    With :math:`g = \nabla L(\theta)` and :math:`g_p = \nabla L(\theta +
    \epsilon)` from the two passes of :class:`SAM`, the clean gradient is split
    into its parts parallel and orthogonal to :math:`g_p`,

    .. math::
        g_\perp = g - \frac{\langle g, g_p\rangle}{\|g_p\|^2}\, g_p,

    and the base optimizer steps with :math:`g_p - \alpha\, g_\perp`: the
    orthogonal part decreases the surrogate gap
    :math:`L(\theta + \epsilon) - L(\theta)` without changing the descent on the
    perturbed loss to first order. ``alpha=0`` is SAM. Inner products run over all
    parameters with a gradient.

    Everything else is as in :class:`SAM`. Gradient clipping and
    ``on_before_optimizer_step`` act on :math:`g_p`, before the combination; after
    the step ``.grad`` holds :math:`g_p - \alpha g_\perp`. The paper also ties ρ to
    the learning-rate schedule; here ρ is fixed (a group's ``rho`` may be changed
    by hand). :attr:`last_stats` adds ``cosine`` (between :math:`g` and
    :math:`g_p`).

    Args:
        params: The parameters or parameter groups.
        base_optimizer: As in :class:`SAM`.
        rho: Radius ρ of the perturbation, at least 0.
        alpha: Weight α of the surrogate-gap term, at least 0.
        adaptive: Use ASAM's perturbation.
        eta: ASAM's :math:`\eta_{\mathrm{A}}`, at least 0.
        perturb: Which tensors are perturbed (see :class:`SAM`).
        lr: The learning rate, positive, for a base optimizer given as a class.
        base_kwargs: Further arguments of a base optimizer given as a class.

    Raises:
        ValueError: As :class:`SAM`, and for a negative ``alpha``.

    References:
        Zhuang, Gong, Yuan, Cui, Adam, Dvornek, Tatikonda, Duncan, Liu (2022).
        Surrogate gap minimization improves sharpness-aware training. ICLR.
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: BaseOptimizer = torch.optim.SGD,
        rho: float = 0.05,
        alpha: float = 0.1,
        adaptive: bool = False,
        eta: float = 0.01,
        perturb: Perturb = "all",
        lr: float | None = None,
        base_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.alpha = check_number("alpha", alpha, low=0.0)
        super().__init__(
            params,
            base_optimizer,
            rho=rho,
            adaptive=adaptive,
            eta=eta,
            perturb=perturb,
            lr=lr,
            base_kwargs=base_kwargs,
        )

    def _clean_gradients(self) -> list[tuple[Tensor, Tensor]]:
        return [
            (p, p.grad.detach().clone())
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        ]

    def _combine(self, clean: list[tuple[Tensor, Tensor]] | None) -> None:
        assert clean is not None
        pairs = [(p.grad, g) for p, g in clean if p.grad is not None]
        inner = sum(float((gp * g).sum()) for gp, g in pairs)
        perturbed_sq = sum(float(gp.pow(2).sum()) for gp, _ in pairs)
        clean_sq = sum(float(g.pow(2).sum()) for _, g in pairs)
        coefficient = inner / perturbed_sq if perturbed_sq > 0 else 0.0
        for gp, g in pairs:
            orthogonal = g - coefficient * gp
            gp.sub_(self.alpha * orthogonal)
        denominator = (perturbed_sq * clean_sq) ** 0.5
        self._cosine = inner / denominator if denominator > 0 else float("nan")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Tensor | None:  # type: ignore[override]
        """Take one GSAM step; ``closure`` recomputes the loss and its gradient."""
        self._cosine = float("nan")
        loss = super().step(closure)
        self.last_stats["cosine"] = self._cosine
        return loss

    def stability_threshold(self) -> StabilityThreshold:
        """No threshold is known for GSAM (``None`` unless ``alpha`` is 0)."""
        if self.alpha == 0:
            return super().stability_threshold()
        return StabilityThreshold(
            None, reason="no stability threshold is known for GSAM with alpha > 0"
        )
