"""Hessian-free (truncated Newton) optimization for minibatch training."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_eos._validation import check_bool, check_choice, check_int, check_number
from lightning_eos.optim._base import (
    ClosureOptimizer,
    Derivatives,
    HessianProducts,
    check_dtypes,
    write,
)
from lightning_eos.optim._cg import truncated_cg
from lightning_eos.optim._common import armijo_search, check_products, shared_settings
from lightning_eos.optim._outputs import OutputProducts

Curvature = Literal["hessian", "gauss_newton"]


class HessianFree(ClosureOptimizer):
    r"""The practical minibatch Newton-CG of neural-network training (Martens 2010).

    Each step, on the current batch:

    1. Conjugate gradient on :math:`(C + \lambda I)d = -g`, with :math:`C` the
       Hessian (``curvature="hessian"``) or the Gauss-Newton matrix
       :math:`J^\top\nabla^2_f\ell\,J` (``"gauss_newton"``, positive semidefinite
       for convex losses of the outputs), warm-started from ``cg_decay`` times the
       previous step's solution and stopped by Martens' relative-progress rule
       (see :func:`~lightning_eos.optim._cg.truncated_cg`), at a direction of
       non-positive curvature, or after ``max_cg_iter`` products.
    2. Backtracking from :math:`\alpha_0` (``lr``) by ``line_search_shrink`` until
       Armijo's condition :math:`L(\theta + \alpha d) \le L(\theta) +
       c\,\alpha\, g^\top d` holds; no step if ``max_line_search`` trials fail.
    3. Tikhonov damping adapted by the reduction ratio (Levenberg-Marquardt):
       :math:`\rho = (L(\theta + \alpha_0 d) - L(\theta))/q(\alpha_0 d)` with the
       undamped model :math:`q(s) = g^\top s + \frac12 s^\top C s`;
       :math:`\lambda \leftarrow \lambda \cdot` ``damping_increase`` if
       :math:`\rho < 1/4`, :math:`\lambda \leftarrow \lambda /` ``damping_decrease``
       (the paper's ×2/3 is 1.5 here) if :math:`\rho > 3/4`, never below
       ``min_damping``. The current λ and the warm start are kept in the optimizer
       state (saved in checkpoints).

    Gauss-Newton curvature records the outputs of the module's single forward
    call per ``training_step`` and needs the loss to depend on the parameters only
    through them (checked). Hessian-vector products are exact by default (the
    module needs ``backward = backward_with_graph``); ``hessian_products=
    "finite_difference"`` is available for ``curvature="hessian"``.

    :attr:`last_stats`: ``loss``, ``grad_norm``, ``damping`` (used by this step),
    ``cg_iterations``, ``negative_curvature`` (1 if CG stopped on it),
    ``reduction_ratio``, ``step_length``, ``line_search_trials``,
    ``direction_norm``, ``new_loss``.

    Unsupported (refused): gradient accumulation, gradient clipping, several
    processes, sharded strategies, ``precision="16-mixed"``.

    Args:
        params: The parameters (all groups must share these settings).
        lr: Initial step length :math:`\alpha_0`, positive.
        damping: Initial λ, at least 0.
        curvature: ``"hessian"`` or ``"gauss_newton"``.
        adapt_damping: Adapt λ by the reduction ratio.
        damping_increase: Factor on λ when :math:`\rho < 1/4`, at least 1.
        damping_decrease: Divisor of λ when :math:`\rho > 3/4`, at least 1.
        min_damping: Floor of an adapted λ, at least 0.
        max_cg_iter: Most curvature products per step.
        cg_decay: Factor on the previous solution used as CG's start, in [0, 1].
        progress_tol: ε of Martens' stopping rule, positive.
        line_search_decrease: Armijo's c, in (0, 1).
        line_search_shrink: Backtracking factor, in (0, 1).
        max_line_search: Most line-search trials per step.
        hessian_products: ``"exact"`` or ``"finite_difference"``.
        fd_step: Relative step of finite differences.

    Raises:
        ValueError: For an argument outside its range, named in the message.

    References:
        Martens (2010). Deep learning via Hessian-free optimization. ICML.

        Schraudolph (2002). Fast curvature matrix-vector products for second-order
        gradient descent. Neural Computation 14.
    """

    second_order = True

    def __init__(
        self,
        params: Any,
        lr: float = 1.0,
        damping: float = 1.0,
        curvature: Curvature = "hessian",
        adapt_damping: bool = True,
        damping_increase: float = 1.5,
        damping_decrease: float = 1.5,
        min_damping: float = 1e-6,
        max_cg_iter: int = 50,
        cg_decay: float = 0.95,
        progress_tol: float = 5e-4,
        line_search_decrease: float = 1e-2,
        line_search_shrink: float = 0.8,
        max_line_search: int = 20,
        hessian_products: HessianProducts = "exact",
        fd_step: float = 1e-4,
    ) -> None:
        check_products(hessian_products, fd_step)
        check_choice("curvature", curvature, ("hessian", "gauss_newton"))
        if curvature == "gauss_newton" and hessian_products != "exact":
            raise ValueError(
                "`hessian_products` must be 'exact' with curvature='gauss_newton' "
                f"(Gauss-Newton products differentiate the outputs), got "
                f"{hessian_products!r}."
            )
        open_unit = {"low": 0.0, "high": 1.0, "low_open": True, "high_open": True}
        defaults = {
            "lr": check_number("lr", lr, low=0.0, low_open=True),
            "damping": check_number("damping", damping, low=0.0),
            "curvature": curvature,
            "adapt_damping": check_bool("adapt_damping", adapt_damping),
            "damping_increase": check_number(
                "damping_increase", damping_increase, low=1.0
            ),
            "damping_decrease": check_number(
                "damping_decrease", damping_decrease, low=1.0
            ),
            "min_damping": check_number("min_damping", min_damping, low=0.0),
            "max_cg_iter": check_int("max_cg_iter", max_cg_iter),
            "cg_decay": check_number("cg_decay", cg_decay, low=0.0, high=1.0),
            "progress_tol": check_number(
                "progress_tol", progress_tol, low=0.0, low_open=True
            ),
            "line_search_decrease": check_number(
                "line_search_decrease", line_search_decrease, **open_unit
            ),
            "line_search_shrink": check_number(
                "line_search_shrink", line_search_shrink, **open_unit
            ),
            "max_line_search": check_int("max_line_search", max_line_search),
            "hessian_products": hessian_products,
            "fd_step": fd_step,
        }
        super().__init__(params, defaults)
        shared_settings(self.param_groups, type(self).__name__)
        check_dtypes(self._parameters(), type(self).__name__)

    @property
    def damping(self) -> float:
        """The damping λ the next step will use."""
        state = self._global_state()
        return float(state.get("damping", self.param_groups[0]["damping"]))

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], Any] | None = None
    ) -> Tensor | None:
        """Take one Hessian-free step; ``closure`` recomputes the loss and gradient."""
        name = type(self).__name__
        settings = shared_settings(self.param_groups, name)
        calls = self._begin(closure)
        gauss_newton = settings["curvature"] == "gauss_newton"
        if gauss_newton and calls.module is None:
            raise RuntimeError(
                f"{name}(curvature='gauss_newton') reads the module's outputs: "
                "outside Lightning, call optimizer.attach(model) before stepping."
            )
        derivatives = Derivatives(
            self,
            calls,
            settings["hessian_products"],
            settings["fd_step"],
            capture=calls.module if gauss_newton else None,
        )
        self.counters["steps"] += 1
        if derivatives.loss is None:
            derivatives.release()
            return None
        damping = self.damping
        loss = float(derivatives.loss)
        stats = {
            "loss": loss,
            "grad_norm": float(derivatives.gradient.norm()),
            "damping": damping,
            "cg_iterations": 0.0,
            "negative_curvature": 0.0,
            "reduction_ratio": math.nan,
            "step_length": 0.0,
            "line_search_trials": 0.0,
            "direction_norm": 0.0,
            "new_loss": loss,
        }
        self.last_stats = stats
        if not derivatives.finite:
            self._warn_once(
                "non-finite",
                f"{name}: the loss or gradient is not finite; no step is taken.",
            )
            derivatives.release()
            return derivatives.loss

        try:
            matvec = self._curvature_products(derivatives, gauss_newton, name)
        except BaseException:
            derivatives.release()
            raise
        state = self._global_state()
        previous = state.get("direction")
        if previous is not None and previous.numel() != derivatives.gradient.numel():
            previous = None  # the trainable parameters changed: start CG from zero
        x0 = (
            None
            if previous is None
            else settings["cg_decay"] * previous.to(derivatives.gradient)
        )
        result = truncated_cg(
            matvec,
            derivatives.gradient,
            damping=damping,
            x0=x0,
            max_iter=settings["max_cg_iter"],
            progress_tol=settings["progress_tol"],
        )
        direction = result.direction
        state["direction"] = direction.detach().clone()

        alpha0 = settings["lr"]
        first = derivatives.loss_at(derivatives.point + alpha0 * direction)
        slope = float(derivatives.gradient @ direction)
        undamped_curvature = 2 * (result.model - slope) - damping * float(
            direction @ direction
        )
        predicted = alpha0 * slope + 0.5 * alpha0**2 * undamped_curvature
        ratio = (first - loss) / predicted if predicted < 0 else -math.inf
        if not math.isfinite(ratio):
            ratio = -math.inf
        alpha, new_loss, trials = armijo_search(
            derivatives,
            direction,
            initial=alpha0,
            decrease=settings["line_search_decrease"],
            shrink=settings["line_search_shrink"],
            max_trials=settings["max_line_search"],
            first_value=first,
        )
        if settings["adapt_damping"]:
            if ratio < 0.25:
                damping = max(
                    damping * settings["damping_increase"], settings["min_damping"]
                )
            elif ratio > 0.75:
                damping = max(
                    damping / settings["damping_decrease"], settings["min_damping"]
                )
            state["damping"] = damping
        stats.update(
            cg_iterations=float(result.iterations),
            negative_curvature=float(result.kind == "negative_curvature"),
            reduction_ratio=ratio,
            step_length=alpha,
            line_search_trials=float(trials),
            direction_norm=float(direction.norm()),
            new_loss=new_loss,
        )
        derivatives.release()
        if alpha > 0:
            write(derivatives.params, derivatives.point + alpha * direction)
        return derivatives.loss

    def _curvature_products(
        self, derivatives: Derivatives, gauss_newton: bool, name: str
    ) -> Callable[[Tensor], Tensor]:
        if not gauss_newton:
            return derivatives.hvp
        products = OutputProducts(derivatives, name)

        def matvec(vector: Tensor) -> Tensor:
            self.counters["hvps"] += 1
            return products.gauss_newton(vector)

        return matvec
