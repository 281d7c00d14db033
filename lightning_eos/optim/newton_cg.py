"""Newton-CG with negative-curvature detection (Royer, O'Neill and Wright 2020)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_eos._validation import check_int, check_number, check_seed
from lightning_eos.optim._base import (
    ClosureOptimizer,
    Derivatives,
    HessianProducts,
    check_dtypes,
    write,
)
from lightning_eos.optim._cg import capped_cg
from lightning_eos.optim._common import (
    check_products,
    cubic_decrease_search,
    lowest_eigenpair,
    shared_settings,
)

#: Codes of ``last_stats["direction"]``.
_DIRECTIONS = {"solution": 0.0, "max_iter": 0.0, "negative_curvature": 1.0}


class NewtonCG(ClosureOptimizer):
    r"""Newton-CG with capped conjugate gradient and negative-curvature steps.

    One step of Algorithm 3 of Royer, O'Neill and Wright (2020) on the loss of the
    batch, with damping :math:`\lambda` (:math:`= 2\epsilon_H` in the paper):

    1. If :math:`\|g\| > \epsilon_g` (``grad_tol``): capped CG (see
       :func:`~lightning_eos.optim._cg.capped_cg`) on
       :math:`(H + \lambda I)d = -g`. It returns either an approximate solution
       (relative residual ``cg_tol``, or ``max_cg_iter`` iterations), or a
       direction of curvature below :math:`-\lambda/2`.
    2. Otherwise, the minimum-eigenvalue check: Lanczos (from
       :func:`lightning_eos.curvature.lanczos`, on :math:`-H`, with the
       optimizer's own random start) estimates :math:`\lambda_{\min}(H)`; if it is
       below :math:`-\lambda/4` its eigenvector is the direction, else the point
       is an approximate second-order stationary point and no step is taken.
    3. A negative-curvature direction is scaled to
       :math:`d = -\operatorname{sign}(d^\top g)\,\frac{|d^\top H d|}{\|d\|^2}
       \frac{d}{\|d\|}`.
    4. Backtracking from :math:`\alpha_0` (``lr``) by ``line_search_shrink``
       until :math:`L(\theta + \alpha d) < L(\theta) - \frac{c}{6}\alpha^3\|d\|^3`
       (``line_search_decrease`` = c); the step is dropped if none of
       ``max_line_search`` trials passes.

    So it escapes saddle points, where Newton's method is attracted to them.
    Each line-search trial calls the closure once; a module with
    :func:`~lightning_eos.optim.backward_with_graph` skips the backward pass of
    those calls. The Hessian is that of the batch loss exactly as
    ``training_step`` computes it (BatchNorm in train mode; dropout with the
    step's one mask).

    Hessian-vector products (``hessian_products``): ``"exact"`` (default)
    differentiates the gradient's graph, which needs the one-line ``backward``
    override :func:`~lightning_eos.optim.backward_with_graph` in the module (an
    error says so otherwise); ``"finite_difference"`` uses one closure call per
    product, with error :math:`\tfrac h2\nabla^3L[v,v]` (see
    :class:`~lightning_eos.optim._base.Derivatives`).

    :attr:`last_stats`: ``loss``, ``grad_norm``, ``cg_iterations``,
    ``cg_residual``, ``negative_curvature`` (1 if the step followed negative
    curvature), ``min_eigenvalue`` (NaN unless the check ran), ``damping``,
    ``step_length`` (α, 0 for no step), ``direction_norm``, ``line_search_trials``,
    ``new_loss``, ``negative_curvature_steps`` (cumulative, saved in checkpoints).

    Unsupported (refused): gradient accumulation, gradient clipping, several
    processes, sharded strategies, ``precision="16-mixed"``.

    Args:
        params: The parameters (all groups must share these settings).
        lr: Initial step length :math:`\alpha_0` of the line search, positive.
        damping: :math:`\lambda \ge 0`, added to the Hessian in CG and the scale of
            the negative-curvature tests.
        cg_tol: Relative residual tolerance of CG, in (0, 1).
        max_cg_iter: Most CG iterations (Hessian-vector products) per step.
        grad_tol: :math:`\epsilon_g \ge 0`; at or below it the minimum-eigenvalue
            check replaces CG.
        line_search_decrease: c in the sufficient-decrease test, in (0, 1).
        line_search_shrink: Backtracking factor, in (0, 1).
        max_line_search: Most line-search trials per step.
        eigen_tol: Relative residual tolerance of the Lanczos check.
        max_eigen_iter: Most Lanczos steps of the check.
        hessian_products: ``"exact"`` or ``"finite_difference"``.
        fd_step: Relative step δ of finite differences.
        seed: Seed of the Lanczos start vectors, in ``[0, 2**32 - 1]`` (the global
            random stream is not used).

    Raises:
        ValueError: For an argument outside its range, named in the message.

    References:
        Royer, O'Neill, Wright (2020). A Newton-CG algorithm with complexity
        guarantees for smooth unconstrained optimization. Mathematical
        Programming 180, 451-488.
    """

    second_order = True

    def __init__(
        self,
        params: Any,
        lr: float = 1.0,
        damping: float = 0.0,
        cg_tol: float = 1e-4,
        max_cg_iter: int = 50,
        grad_tol: float = 1e-6,
        line_search_decrease: float = 0.1,
        line_search_shrink: float = 0.5,
        max_line_search: int = 30,
        eigen_tol: float = 1e-3,
        max_eigen_iter: int = 50,
        hessian_products: HessianProducts = "exact",
        fd_step: float = 1e-4,
        seed: int = 0,
    ) -> None:
        check_products(hessian_products, fd_step)
        defaults = {
            "lr": check_number("lr", lr, low=0.0, low_open=True),
            "damping": check_number("damping", damping, low=0.0),
            "cg_tol": check_number(
                "cg_tol", cg_tol, low=0.0, high=1.0, low_open=True, high_open=True
            ),
            "max_cg_iter": check_int("max_cg_iter", max_cg_iter),
            "grad_tol": check_number("grad_tol", grad_tol, low=0.0),
            "line_search_decrease": check_number(
                "line_search_decrease",
                line_search_decrease,
                low=0.0,
                high=1.0,
                low_open=True,
                high_open=True,
            ),
            "line_search_shrink": check_number(
                "line_search_shrink",
                line_search_shrink,
                low=0.0,
                high=1.0,
                low_open=True,
                high_open=True,
            ),
            "max_line_search": check_int("max_line_search", max_line_search),
            "eigen_tol": check_number("eigen_tol", eigen_tol, low=0.0, low_open=True),
            "max_eigen_iter": check_int("max_eigen_iter", max_eigen_iter),
            "hessian_products": hessian_products,
            "fd_step": fd_step,
        }
        self.seed = check_seed("seed", seed)
        super().__init__(params, defaults)
        shared_settings(self.param_groups, type(self).__name__)
        check_dtypes(self._parameters(), type(self).__name__)

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], Any] | None = None
    ) -> Tensor | None:
        """Take one Newton-CG step; ``closure`` recomputes the loss and gradient."""
        settings = shared_settings(self.param_groups, type(self).__name__)
        calls = self._begin(closure)
        derivatives = Derivatives(
            self, calls, settings["hessian_products"], settings["fd_step"]
        )
        self.counters["steps"] += 1
        if derivatives.loss is None:
            derivatives.release()
            return None
        stats = _empty_stats(float(derivatives.loss), settings["damping"])
        self.last_stats = stats
        if not derivatives.finite:
            self._warn_once(
                "non-finite",
                f"{type(self).__name__}: the loss or gradient is not finite; no step "
                "is taken.",
            )
            derivatives.release()
            return derivatives.loss

        direction, negative = self._direction(derivatives, settings, stats)
        if direction is not None:
            alpha, new_loss, trials = cubic_decrease_search(
                derivatives,
                direction,
                initial=settings["lr"],
                decrease=settings["line_search_decrease"],
                shrink=settings["line_search_shrink"],
                max_trials=settings["max_line_search"],
            )
            stats.update(
                step_length=alpha,
                new_loss=new_loss,
                line_search_trials=float(trials),
                direction_norm=float(direction.norm()),
                negative_curvature=float(negative),
            )
            derivatives.release()
            if alpha > 0:
                write(derivatives.params, derivatives.point + alpha * direction)
                if negative:
                    state = self._global_state()
                    state["negative_curvature_steps"] = (
                        state.get("negative_curvature_steps", 0) + 1
                    )
        else:
            derivatives.release()
        stats["negative_curvature_steps"] = float(
            self._global_state().get("negative_curvature_steps", 0)
        )
        return derivatives.loss

    def _direction(
        self,
        derivatives: Derivatives,
        settings: dict[str, Any],
        stats: dict[str, float],
    ) -> tuple[Tensor | None, bool]:
        g = derivatives.gradient
        g_norm = float(g.norm())
        stats["grad_norm"] = g_norm
        damping = settings["damping"]
        if g_norm > settings["grad_tol"]:
            result = capped_cg(
                derivatives.hvp,
                g,
                damping=damping,
                tol=settings["cg_tol"],
                max_iter=settings["max_cg_iter"],
            )
            stats["cg_iterations"] = float(result.iterations)
            stats["cg_residual"] = result.relative_residual
            if result.kind != "negative_curvature":
                return result.direction, False
            return _negative_step(result.direction, result.curvature, g), True

        eigenvalue, vector, _ = lowest_eigenpair(
            derivatives.hvp,
            g,
            tol=settings["eigen_tol"],
            max_iter=settings["max_eigen_iter"],
            seed=self.seed * 1_000_003 + self.counters["steps"],
        )
        stats["min_eigenvalue"] = eigenvalue
        if eigenvalue < -damping / 4 and eigenvalue < 0:
            return _negative_step(vector, eigenvalue, g), True
        return None, False


def _negative_step(direction: Tensor, curvature: float, g: Tensor) -> Tensor:
    """Royer et al.'s scaling of a negative-curvature direction."""
    slope = float(direction @ g)
    sign = -1.0 if slope > 0 else 1.0
    return sign * abs(curvature) * direction / direction.norm()


def _empty_stats(loss: float, damping: float) -> dict[str, float]:
    return {
        "loss": loss,
        "grad_norm": math.nan,
        "cg_iterations": 0.0,
        "cg_residual": math.nan,
        "negative_curvature": 0.0,
        "min_eigenvalue": math.nan,
        "damping": damping,
        "step_length": 0.0,
        "direction_norm": 0.0,
        "line_search_trials": 0.0,
        "new_loss": loss,
    }
