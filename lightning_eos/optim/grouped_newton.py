"""One learning rate per group of tensors, from reduced second and third derivatives."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lightning_eos._validation import check_bool, check_choice, check_int, check_number
from lightning_eos.curvature.blocks import reduced_derivatives
from lightning_eos.optim._base import (
    ClosureOptimizer,
    Derivatives,
    check_dtypes,
    flatten,
    split,
    write,
)
from lightning_eos.optim._common import shared_settings

Grouping = Literal["tensor", "param_group", "single"]


class GroupedNewton(ClosureOptimizer):
    r"""Grouped Newton: a Newton step in the learning rates of groups of tensors.

    The parameters are split into :math:`S` groups (each tensor, each parameter
    group, or a single group) and the gradient :math:`g` into blocks
    :math:`g_1, \dots, g_S`. The step is :math:`\theta \leftarrow \theta -
    \sum_s t_s g_s`, one learning rate :math:`t_s` per group, chosen on the
    Taylor expansion of :math:`\varphi(t) = L(\theta + \sum_s t_s d_s)`,
    :math:`d_s = -g_s`, with the anisotropic Nesterov cubic regularization of
    Wolinski (2025), built from the diagonal of the reduced third derivative:

    .. math::
        t = \operatorname*{arg\,min}_t\;
        \bar g^\top t + \tfrac12 t^\top \bar H t
        + \frac{\lambda_{\mathrm{int}}}{6}\, \|D t\|_2^3,
        \qquad D = \operatorname{diag}\big(|\bar D_1|^{1/3}, \dots,
        |\bar D_S|^{1/3}\big),

    with :math:`\bar g_s = -\|g_s\|^2`, the reduced :math:`S \times S` Hessian
    :math:`\bar H_{su} = d_s^\top \nabla^2 L\, d_u` and the diagonal of the
    reduced third derivative :math:`\bar D_s = \nabla^3 L[d_s, d_s, d_s]`, all
    computed exactly from the closure's gradient graph by the function
    :func:`~lightning_eos.curvature.blocks.reduced_derivatives`, which also serves
    the probe :func:`~lightning_eos.curvature.block_derivatives` (:math:`S`
    Hessian-vector and :math:`S` third-order products). Without the cubic term
    (:math:`\bar D = 0`, a quadratic loss) this is the exact Newton step in
    :math:`t`; the anisotropic cubic term keeps it finite where
    :math:`\bar H` is indefinite or ill-conditioned. :math:`D_s t_s` does not
    change when a group is rescaled, so neither does the step (the affine
    invariance the paper proves). The minimizer solves
    :math:`t = -(\bar H + \tfrac12\lambda_{\mathrm{int}}\|Dt\|_2 D^2)^{-1}\bar g`;
    this small problem is solved in float64 by a damped Newton method, and the
    step is then scaled by ``lr``. If it
    has no minimizer (:math:`\bar H` not positive definite on groups with
    :math:`\bar D_s = 0`), no step is taken.

    Safeguard (``adaptive=True``, an addition to the paper's method, which keeps
    λ_int fixed): the loss at the new point is evaluated (one more closure call,
    without backward pass) and compared with the model's decrease as in ARC; the
    step is refused and λ_int multiplied by 4 when the ratio is below 0.1, and
    λ_int is halved, not below ``regularization``, when it is above 0.9. On the
    full-batch digits MLP the paper's fixed λ_int = 1 already decreases the loss
    at every one of the first 30 steps, and the safeguard never triggers; it is
    there for models where the third-order model is a poor guide. The current
    λ_int is kept in the optimizer state.

    Third derivatives through PyTorch's native BatchNorm (train mode) and
    LayerNorm have been found wrong, so modules holding them are refused. Products
    are exact; the module needs ``backward = backward_with_graph``.

    :attr:`last_stats`: ``loss``, ``grad_norm``, ``groups`` (S),
    ``lr_min`` / ``lr_mean`` / ``lr_max`` (over the :math:`t_s`), ``lr_<s>`` for
    each group when S ≤ 16, ``model_decrease``, ``reduced_min_eigenvalue``
    (of :math:`\bar H`), ``solved`` (1 or 0), ``regularization`` (the λ_int
    used), and with the safeguard ``ratio`` and ``accepted``.

    Unsupported (refused): gradient accumulation, gradient clipping, several
    processes, sharded strategies, ``precision="16-mixed"``.

    Args:
        params: The parameters.
        lr: Factor on the step, positive.
        regularization: :math:`\lambda_{\mathrm{int}} \ge 0` of the cubic term.
        grouping: ``"tensor"`` (each tensor its own group), ``"param_group"`` or
            ``"single"`` (one learning rate: a Newton line step along ``-g``).
        max_solver_iter: Most Newton iterations on the small problem.
        adaptive: Check each step against the model and adapt λ_int (see above).

    Raises:
        ValueError: For an argument outside its range, named in the message.

    References:
        Wolinski (2025). Gathering and exploiting higher-order information when
        training large structured models.
    """

    second_order = True

    def __init__(
        self,
        params: Any,
        lr: float = 1.0,
        regularization: float = 1.0,
        grouping: Grouping = "tensor",
        max_solver_iter: int = 100,
        adaptive: bool = True,
    ) -> None:
        defaults = {
            "lr": check_number("lr", lr, low=0.0, low_open=True),
            "regularization": check_number("regularization", regularization, low=0.0),
        }
        self.grouping = check_choice(
            "grouping", grouping, ("tensor", "param_group", "single")
        )
        self.max_solver_iter = check_int("max_solver_iter", max_solver_iter)
        self.adaptive = check_bool("adaptive", adaptive)
        super().__init__(params, defaults)
        shared_settings(self.param_groups, type(self).__name__)
        check_dtypes(self._parameters(), type(self).__name__)

    def attach(self, module: nn.Module) -> GroupedNewton:
        """Name the module trained (outside Lightning); refuse unsafe layers."""
        _refuse_third_order_layers(module, type(self).__name__, ValueError)
        return super().attach(module)  # type: ignore[return-value]

    def check_trainer(self, trainer: pl.Trainer) -> None:
        """Refuse the Trainer settings and layers this optimizer cannot serve."""
        super().check_trainer(trainer)
        if trainer.lightning_module is not None:
            _refuse_third_order_layers(
                trainer.lightning_module,
                type(self).__name__,
                MisconfigurationException,
            )

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], Any] | None = None
    ) -> Tensor | None:
        """Take one grouped Newton step; ``closure`` recomputes the loss."""
        name = type(self).__name__
        settings = shared_settings(self.param_groups, name)
        calls = self._begin(closure)
        derivatives = Derivatives(self, calls, "exact")
        self.counters["steps"] += 1
        if derivatives.loss is None:
            derivatives.release()
            return None
        groups = self._groups(derivatives.params)
        stats: dict[str, float] = {
            "loss": float(derivatives.loss),
            "grad_norm": float(derivatives.gradient.norm()),
            "groups": float(len(groups)),
            "model_decrease": 0.0,
            "solved": 0.0,
        }
        self.last_stats = stats
        if not derivatives.finite:
            self._warn_once(
                "non-finite",
                f"{name}: the loss or gradient is not finite; no step is taken.",
            )
            derivatives.release()
            return derivatives.loss

        gradient = derivatives.graph_gradient
        blocks = [g.detach() if g is not None else None for g in gradient]
        directions = [
            [
                -blocks[j] if j in members and blocks[j] is not None else None
                for j in range(len(blocks))
            ]
            for members in groups
        ]
        try:
            reduced = reduced_derivatives(
                derivatives.params, directions, gradient=gradient
            )
            self.counters["hvps"] += reduced.num_hvps
            self.counters["third_order"] += reduced.num_third_order
            assert reduced.third_order is not None
            g_bar = reduced.gradient.double()
            h_bar = reduced.hessian.double()
            regularization = self.regularization
            scales = (regularization * reduced.third_order.double().abs()) ** (1 / 3)
            t, _, solved = minimize_anisotropic_cubic(
                g_bar, h_bar, scales, max_iter=self.max_solver_iter
            )
            t = settings["lr"] * t
            decrease = -_model(g_bar, h_bar, scales, t)
            stats.update(
                model_decrease=decrease,
                solved=float(solved),
                reduced_min_eigenvalue=float(torch.linalg.eigvalsh(h_bar)[0]),
                regularization=regularization,
                lr_min=float(t.min()),
                lr_mean=float(t.mean()),
                lr_max=float(t.max()),
            )
            if len(groups) <= 16:
                stats.update({f"lr_{s}": float(value) for s, value in enumerate(t)})
            if not solved:
                self._warn_once(
                    "unbounded",
                    f"{name}: the reduced model has no minimizer (indefinite reduced "
                    "Hessian where the third derivative vanishes); no step is taken.",
                )
                return derivatives.loss
            step = self._step(derivatives, groups, t)
            accepted = True
            if self.adaptive:
                new_loss = derivatives.loss_at(derivatives.point + step)
                ratio = (float(derivatives.loss) - new_loss) / max(decrease, 1e-300)
                ratio = ratio if math.isfinite(ratio) else -math.inf
                accepted = ratio >= 0.1
                if not accepted:
                    regularization = 4 * regularization if regularization > 0 else 1.0
                elif ratio >= 0.9:
                    regularization = max(regularization / 2, settings["regularization"])
                self._global_state()["regularization"] = regularization
                stats.update(ratio=ratio, accepted=float(accepted))
        finally:
            derivatives.release()
        if accepted:
            write(derivatives.params, derivatives.point + step)
        return derivatives.loss

    @property
    def regularization(self) -> float:
        r"""The :math:`\lambda_{\mathrm{int}}` the next step will use."""
        state = self._global_state()
        return float(
            state.get("regularization", self.param_groups[0]["regularization"])
        )

    @staticmethod
    def _step(derivatives: Derivatives, groups: list[list[int]], t: Tensor) -> Tensor:
        r"""The step :math:`-\sum_s t_s g_s` as a flat vector."""
        rates = t.to(derivatives.gradient)
        pieces = split(derivatives.gradient, derivatives.params)
        step = [torch.zeros_like(piece) for piece in pieces]
        for s, members in enumerate(groups):
            for j in members:
                step[j] = -rates[s] * pieces[j]
        return flatten(step, derivatives.params)

    def _groups(self, params: list[Tensor]) -> list[list[int]]:
        if self.grouping == "tensor":
            return [[j] for j in range(len(params))]
        if self.grouping == "single":
            return [list(range(len(params)))]
        index = {id(p): j for j, p in enumerate(params)}
        return [
            [index[id(p)] for p in group["params"] if id(p) in index]
            for group in self.param_groups
        ]


def minimize_anisotropic_cubic(
    g: Tensor, H: Tensor, scales: Tensor, *, max_iter: int = 100
) -> tuple[Tensor, float, bool]:
    r"""Minimize :math:`m(t) = g^\top t + \frac12 t^\top H t + \frac16\|Dt\|_2^3`.

    :math:`D = \operatorname{diag}(\text{scales})`. The gradient of the model is
    :math:`g + Ht + \frac12\|Dt\| D^2 t` and its Hessian
    :math:`H + \frac12\big(\|Dt\| D^2 + D^2 t\, t^\top D^2 / \|Dt\|\big)`.
    Newton's method from :math:`t = 0`, with a shift that makes each Newton matrix
    positive definite and backtracking on the model; float64.

    Returns:
        The minimizer, the decrease :math:`-m(t)`, and whether the gradient of the
        model vanished (to relative 1e-10) within ``max_iter`` iterations.
    """

    def model(t: Tensor) -> float:
        return _model(g, H, scales, t)

    squares = scales * scales

    def model_gradient(t: Tensor) -> Tensor:
        return g + H @ t + 0.5 * float((scales * t).norm()) * squares * t

    t = torch.zeros_like(g)
    scale = float(g.norm())
    if scale == 0:
        return t, 0.0, True
    value = 0.0
    for _ in range(max_iter):
        gradient = model_gradient(t)
        if float(gradient.norm()) <= 1e-10 * scale:
            return t, -value, True
        radius = float((scales * t).norm())
        hessian = H + 0.5 * radius * torch.diag(squares)
        if radius > 0:
            weighted = squares * t
            hessian = hessian + 0.5 * torch.outer(weighted, weighted) / radius
        lowest = float(torch.linalg.eigvalsh(hessian)[0])
        size = float(hessian.abs().max())
        shift = 0.0 if lowest > 1e-12 * size else -lowest + 1e-8 * max(size, 1e-300)
        step = -torch.linalg.solve(
            hessian + shift * torch.eye(len(g), dtype=g.dtype), gradient
        )
        alpha = 1.0
        slope = float(gradient @ step)
        for _ in range(60):
            candidate = t + alpha * step
            new_value = model(candidate)
            if new_value <= value + 1e-4 * alpha * slope:
                break
            alpha *= 0.5
        else:
            return t, -value, False
        t, value = candidate, new_value
        if not math.isfinite(value) or float(t.norm()) > 1e12 * (1 + scale):
            return torch.zeros_like(g), 0.0, False
    return t, -value, float(model_gradient(t).norm()) <= 1e-6 * scale


def _model(g: Tensor, H: Tensor, scales: Tensor, t: Tensor) -> float:
    return float(g @ t + 0.5 * t @ H @ t + float((scales * t).norm()) ** 3 / 6)


def _refuse_third_order_layers(module: nn.Module, name: str, error: type) -> None:
    for sub in module.modules():
        bad = isinstance(sub, nn.LayerNorm) or (
            isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.training
        )
        if bad:
            raise error(
                f"{name} differentiates the loss three times, and PyTorch's native "
                f"{type(sub).__name__} has been found to give wrong third "
                "derivatives. Use a normalization written in plain tensor "
                "operations, or another optimizer."
            )
