"""Cubic-regularized Newton with adaptive regularization (ARC)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_eos._validation import check_choice, check_int, check_number, check_seed
from lightning_eos.optim._base import (
    ClosureOptimizer,
    Derivatives,
    HessianProducts,
    check_dtypes,
    write,
)
from lightning_eos.optim._common import check_products, shared_settings
from lightning_eos.optim._cubic_model import gradient_descent_cubic, krylov_cubic

Subproblem = Literal["krylov", "gradient_descent"]


class CubicNewton(ClosureOptimizer):
    r"""Cubic-regularized Newton steps with the adaptive σ of ARC.

    Each step approximately minimizes the cubic model of the batch loss
    (Nesterov and Polyak 2006)

    .. math::
        m(s) = g^\top s + \tfrac12 s^\top H s + \tfrac{\sigma}{3}\|s\|^3,

    then compares the actual decrease with the model's,
    :math:`\rho = (L(\theta) - L(\theta + s))/(-m(s))`, and adapts σ as ARC does
    (Cartis, Gould and Toint 2011): the step is taken if
    :math:`\rho \ge \eta_1` (``accept_ratio``), and σ is divided by
    ``sigma_decrease`` (not below ``min_sigma``) if :math:`\rho \ge \eta_2`
    (``very_successful_ratio``), kept if the step was merely accepted, and
    multiplied by ``sigma_increase`` if it was rejected, in which case the
    parameters do not move. A rejected step still consumes the batch. The current
    σ is kept in the optimizer state (saved in checkpoints).

    Because the model is bounded below whatever the sign of the curvature, its
    minimizer moves along negative curvature: cubic Newton escapes saddle points.

    Subproblem solvers (only Hessian-vector products):

    * ``"krylov"``: the model minimized exactly over the Lanczos space of ``g``
      (:func:`~lightning_eos.optim._cubic_model.krylov_cubic`), with one random
      restart when that space is invariant;
    * ``"gradient_descent"``: gradient descent on the model from the Cauchy point,
      with a small random perturbation of ``g`` (Carmon and Duchi 2019).

    Both stop when :math:`\|\nabla m(s)\| \le` ``subproblem_tol`` ·
    :math:`\min(1, \|s\|)\|g\|` or after ``max_subproblem_iter`` products.

    Hessian-vector products are exact by default (the module needs
    ``backward = backward_with_graph``, see :func:`~lightning_eos.optim.
    backward_with_graph`), or finite differences of closure gradients.
    :attr:`last_stats`: ``loss``, ``grad_norm``, ``sigma`` (used by this step),
    ``model_decrease``, ``ratio`` (ρ), ``accepted`` (1 or 0), ``step_norm``,
    ``subproblem_products``, ``model_gradient``, ``new_loss``.

    Unsupported (refused): gradient accumulation, gradient clipping, several
    processes, sharded strategies, ``precision="16-mixed"``.

    Args:
        params: The parameters (all groups must share these settings).
        lr: Factor α on the model's minimizer, positive: the step is :math:`\alpha s`
            and the ratio compares with the model's decrease at :math:`\alpha s`
            (1 is ARC's step; a learning-rate scheduler can drive it).
        sigma: Initial regularization σ, positive.
        min_sigma: Lower bound of σ, positive.
        sigma_increase: Factor on σ after a rejected step, above 1.
        sigma_decrease: Divisor of σ after a very successful step, at least 1.
        accept_ratio: :math:`\eta_1`, in (0, 1).
        very_successful_ratio: :math:`\eta_2`, in [``accept_ratio``, 1).
        subproblem: ``"krylov"`` or ``"gradient_descent"``.
        subproblem_tol: Relative tolerance on the model gradient, positive.
        max_subproblem_iter: Most Hessian-vector products per step.
        perturbation: Relative size of the perturbation of ``g`` in gradient
            descent, at least 0.
        hessian_products: ``"exact"`` or ``"finite_difference"``.
        fd_step: Relative step of finite differences.
        seed: Seed of the random vectors of the solvers, in ``[0, 2**32 - 1]``.

    Raises:
        ValueError: For an argument outside its range, named in the message.

    References:
        Nesterov, Polyak (2006). Cubic regularization of Newton method and its
        global performance. Mathematical Programming 108, 177-205.

        Cartis, Gould, Toint (2011). Adaptive cubic regularisation methods for
        unconstrained optimization. Part I. Mathematical Programming 127, 245-295.

        Carmon, Duchi (2019). Gradient descent finds the cubic-regularized
        nonconvex Newton step. SIAM Journal on Optimization 29, 2146-2178.
    """

    second_order = True

    def __init__(
        self,
        params: Any,
        lr: float = 1.0,
        sigma: float = 1.0,
        min_sigma: float = 1e-6,
        sigma_increase: float = 2.0,
        sigma_decrease: float = 2.0,
        accept_ratio: float = 0.1,
        very_successful_ratio: float = 0.9,
        subproblem: Subproblem = "krylov",
        subproblem_tol: float = 0.1,
        max_subproblem_iter: int = 50,
        perturbation: float = 1e-6,
        hessian_products: HessianProducts = "exact",
        fd_step: float = 1e-4,
        seed: int = 0,
    ) -> None:
        check_products(hessian_products, fd_step)
        accept = check_number(
            "accept_ratio",
            accept_ratio,
            low=0.0,
            high=1.0,
            low_open=True,
            high_open=True,
        )
        if (
            isinstance(very_successful_ratio, (int, float))
            and not isinstance(very_successful_ratio, bool)
            and very_successful_ratio < accept
        ):
            raise ValueError(
                "`very_successful_ratio` must be at least `accept_ratio` "
                f"({accept:g}) and below 1, got {very_successful_ratio!r}: raise it "
                "together with `accept_ratio`."
            )
        defaults = {
            "lr": check_number("lr", lr, low=0.0, low_open=True),
            "sigma": check_number("sigma", sigma, low=0.0, low_open=True),
            "min_sigma": check_number("min_sigma", min_sigma, low=0.0, low_open=True),
            "sigma_increase": check_number(
                "sigma_increase", sigma_increase, low=1.0, low_open=True
            ),
            "sigma_decrease": check_number("sigma_decrease", sigma_decrease, low=1.0),
            "accept_ratio": accept,
            "very_successful_ratio": check_number(
                "very_successful_ratio",
                very_successful_ratio,
                low=accept,
                high=1.0,
                high_open=True,
            ),
            "subproblem": check_choice(
                "subproblem", subproblem, ("krylov", "gradient_descent")
            ),
            "subproblem_tol": check_number(
                "subproblem_tol", subproblem_tol, low=0.0, low_open=True
            ),
            "max_subproblem_iter": check_int(
                "max_subproblem_iter", max_subproblem_iter
            ),
            "perturbation": check_number("perturbation", perturbation, low=0.0),
            "hessian_products": hessian_products,
            "fd_step": fd_step,
        }
        self.seed = check_seed("seed", seed)
        super().__init__(params, defaults)
        shared_settings(self.param_groups, type(self).__name__)
        check_dtypes(self._parameters(), type(self).__name__)

    @property
    def sigma(self) -> float:
        """The regularization σ the next step will use."""
        state = self._global_state()
        return float(state.get("sigma", self.param_groups[0]["sigma"]))

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], Any] | None = None
    ) -> Tensor | None:
        """Take one ARC step; ``closure`` recomputes the loss and its gradient."""
        settings = shared_settings(self.param_groups, type(self).__name__)
        calls = self._begin(closure)
        derivatives = Derivatives(
            self, calls, settings["hessian_products"], settings["fd_step"]
        )
        self.counters["steps"] += 1
        if derivatives.loss is None:
            derivatives.release()
            return None
        sigma = self.sigma
        loss = float(derivatives.loss)
        g = derivatives.gradient
        stats = {
            "loss": loss,
            "grad_norm": float(g.norm()),
            "sigma": sigma,
            "model_decrease": 0.0,
            "ratio": math.nan,
            "accepted": 0.0,
            "step_norm": 0.0,
            "subproblem_products": 0.0,
            "model_gradient": math.nan,
            "new_loss": loss,
        }
        self.last_stats = stats
        if not derivatives.finite:
            self._warn_once(
                "non-finite",
                f"{type(self).__name__}: the loss or gradient is not finite; no step "
                "is taken.",
            )
            derivatives.release()
            return derivatives.loss

        generator = torch.Generator().manual_seed(
            self.seed * 1_000_003 + self.counters["steps"]
        )
        if settings["subproblem"] == "krylov":
            solution = krylov_cubic(
                derivatives.hvp,
                g,
                sigma,
                tol=settings["subproblem_tol"],
                max_iter=settings["max_subproblem_iter"],
                generator=generator,
            )
        else:
            solution = gradient_descent_cubic(
                derivatives.hvp,
                g,
                sigma,
                tol=settings["subproblem_tol"],
                max_iter=settings["max_subproblem_iter"],
                perturbation=settings["perturbation"],
                generator=generator,
            )
        alpha = settings["lr"]
        step = alpha * solution.step
        norm = float(solution.step.norm())
        decrease = -(
            alpha * float(g @ solution.step)
            + 0.5 * alpha**2 * solution.curvature
            + sigma / 3 * alpha**3 * norm**3
        )
        stats.update(
            model_decrease=decrease,
            step_norm=alpha * norm,
            subproblem_products=float(solution.products),
            model_gradient=solution.model_gradient,
        )
        if not decrease > 0:
            derivatives.release()  # a second-order stationary point of the model
            return derivatives.loss

        new_loss = derivatives.loss_at(derivatives.point + step)
        ratio = (loss - new_loss) / decrease
        if not math.isfinite(ratio):
            ratio = -math.inf
        accepted = ratio >= settings["accept_ratio"]
        if ratio >= settings["very_successful_ratio"]:
            sigma = max(sigma / settings["sigma_decrease"], settings["min_sigma"])
        elif not accepted:
            sigma = sigma * settings["sigma_increase"]
        self._global_state()["sigma"] = sigma
        stats.update(ratio=ratio, accepted=float(accepted), new_loss=new_loss)
        derivatives.release()
        if accepted:
            write(derivatives.params, derivatives.point + step)
        return derivatives.loss
