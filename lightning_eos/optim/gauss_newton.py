"""The damped Gauss-Newton step computed in function space."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_eos._validation import check_int, check_number
from lightning_eos.optim._base import ClosureOptimizer, Derivatives, check_dtypes, write
from lightning_eos.optim._common import shared_settings
from lightning_eos.optim._outputs import OutputProducts


class GaussNewton(ClosureOptimizer):
    r"""Damped Gauss-Newton in function space, for over-parameterized models.

    For a batch loss :math:`L(\theta) = \ell(f(\theta))` whose Hessian in the
    outputs is a multiple of the identity, :math:`\nabla_f^2 \ell = c I` (the half
    squared error averaged over :math:`N` examples has :math:`c = 1/N`), the
    damped Gauss-Newton step

    .. math::
        \Delta\theta = -\eta\,(c J^\top J + \lambda I)^{-1} J^\top r
                     = -\eta\, J^\top (c J J^\top + \lambda I)^{-1} r,
        \qquad r = \nabla_f \ell,

    is computed on the right, in function space: conjugate gradient solves the
    system with the :math:`n_{\mathrm{out}} \times n_{\mathrm{out}}` kernel
    :math:`JJ^\top` (:math:`n_{\mathrm{out}}` = examples × outputs), each
    iteration one product :math:`Jv` and one :math:`J^\top w`, and the step is
    :math:`J^\top z`. When the model has more parameters than outputs, the kernel
    is invertible and, as :math:`\lambda \to 0`, the linearized outputs move by
    exactly :math:`-\eta\, r/c` (for the squared error, :math:`f \to f - \eta(f - y)`):
    the regime studied by Arbel, Menegaux and Wolinski (2023).

    Limits, checked at the first step: the module's forward must be called once
    per ``training_step`` and return one tensor (its outputs are recorded with a
    forward hook); the loss must depend on the parameters only through them; and
    :math:`\nabla_f^2\ell` must be :math:`cI` (checked on a random vector) —
    cross-entropy is refused, use :class:`HessianFree` with
    ``curvature="gauss_newton"`` for it. Products are exact and need
    ``backward = backward_with_graph`` in the module. Memory: the graph of the
    forward pass and of :math:`J^\top u` are kept during the step; CG holds a few
    vectors of the size of the outputs. A full batch of 1,437 digits with 10
    outputs is a 14,370-dimensional kernel system, solved matrix-free; a dense
    kernel would need :math:`n_{\mathrm{out}}` backward passes and is not formed.

    A term :math:`P` added to the objective by a callback
    (:class:`~lightning_eos.penalties.PenaltyCallback`) does not pass through the
    outputs. Its gradient :math:`g_P` joins the right-hand side and, as the
    residual term of the Hessian of :math:`L`, its curvature is left out of the
    Gauss-Newton matrix:
    :math:`\Delta\theta = -\eta\,(cJ^\top J + \lambda I)^{-1}(J^\top r + g_P)`,
    computed by the same solve in function space as
    :math:`-\eta\,[J^\top z + g_P/\lambda]` with
    :math:`(cJJ^\top + \lambda I)\,z = r - (c/\lambda)\,J g_P` (Woodbury's
    identity). This needs :math:`\lambda > 0`.

    :attr:`last_stats`: ``loss``, ``grad_norm``, ``cg_iterations``,
    ``cg_residual`` (relative), ``damping``, ``step_norm``, ``output_change``
    (:math:`\|J\Delta\theta\|/\|r/c\|`, 1 when the linearized step interpolates).

    Unsupported (refused): gradient accumulation, gradient clipping, several
    processes, sharded strategies, ``precision="16-mixed"``.

    Args:
        params: The parameters (all groups must share these settings).
        lr: Step size η, positive.
        damping: λ, at least 0 (0 needs an invertible kernel).
        cg_tol: Relative residual tolerance of CG, in (0, 1).
        max_cg_iter: Most CG iterations per step.

    Raises:
        ValueError: For an argument outside its range, named in the message.

    References:
        Arbel, Menegaux, Wolinski (2023). Rethinking Gauss-Newton for learning
        over-parameterized models. NeurIPS.
    """

    second_order = True

    def __init__(
        self,
        params: Any,
        lr: float = 1.0,
        damping: float = 1e-3,
        cg_tol: float = 1e-6,
        max_cg_iter: int = 50,
    ) -> None:
        defaults = {
            "lr": check_number("lr", lr, low=0.0, low_open=True),
            "damping": check_number("damping", damping, low=0.0),
            "cg_tol": check_number(
                "cg_tol", cg_tol, low=0.0, high=1.0, low_open=True, high_open=True
            ),
            "max_cg_iter": check_int("max_cg_iter", max_cg_iter),
        }
        super().__init__(params, defaults)
        shared_settings(self.param_groups, type(self).__name__)
        check_dtypes(self._parameters(), type(self).__name__)

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], Any] | None = None
    ) -> Tensor | None:
        """Take one Gauss-Newton step; ``closure`` recomputes the loss."""
        name = type(self).__name__
        settings = shared_settings(self.param_groups, name)
        calls = self._begin(closure)
        if calls.module is None:
            raise RuntimeError(
                f"{name} reads the module's outputs: outside Lightning, call "
                "optimizer.attach(model) before stepping."
            )
        derivatives = Derivatives(self, calls, "exact", capture=calls.module)
        self.counters["steps"] += 1
        if derivatives.loss is None:
            derivatives.release()
            return None
        stats = {
            "loss": float(derivatives.loss),
            "grad_norm": float(derivatives.gradient.norm()),
            "cg_iterations": 0.0,
            "cg_residual": math.nan,
            "damping": settings["damping"],
            "step_norm": 0.0,
            "output_change": math.nan,
        }
        self.last_stats = stats
        if not derivatives.finite:
            self._warn_once(
                "non-finite",
                f"{name}: the loss or gradient is not finite; no step is taken.",
            )
            derivatives.release()
            return derivatives.loss
        if derivatives.added_gradient is not None and settings["damping"] == 0:
            derivatives.release()
            raise RuntimeError(
                f"{name} got a term added to the objective (a penalty) whose "
                "gradient need not lie in the row space of the Jacobian, where "
                "undamped Gauss-Newton has no curvature: use damping > 0."
            )
        added = derivatives.added_gradient
        try:
            products = OutputProducts(derivatives, name)
            c = self._loss_curvature(products, name)
            rhs = products.residual.detach()
            if added is not None:
                rhs = rhs - c / settings["damping"] * products.jvp(added)
            z, iterations, residual = self._solve(products, c, settings, rhs)
        except BaseException:
            derivatives.release()
            raise
        direction = products.vjp(z)
        if added is not None:
            direction = direction + added / settings["damping"]
        step = -settings["lr"] * direction
        output_change = products.jvp(step)
        target = products.residual.detach() / c
        self.counters["hvps"] += 1
        stats.update(
            cg_iterations=float(iterations),
            cg_residual=residual,
            step_norm=float(step.norm()),
            output_change=float(output_change.norm())
            / max(float(target.norm()), 1e-300),
        )
        derivatives.release()
        write(derivatives.params, derivatives.point + step)
        return derivatives.loss

    def _loss_curvature(self, products: OutputProducts, name: str) -> float:
        """The constant c with ∇²_f ℓ = cI, checked on a seeded random vector."""
        generator = torch.Generator().manual_seed(self.counters["steps"])
        probe = torch.randn(
            products.outputs.shape, generator=generator, dtype=torch.float64
        ).to(products.outputs)
        image = products.loss_hvp(probe)
        c = float((probe * image).sum()) / float((probe * probe).sum())
        error = float((image - c * probe).norm())
        tolerance = 10 * math.sqrt(torch.finfo(probe.dtype).eps)
        if not c > 0 or error > tolerance * float(image.norm()):
            raise RuntimeError(
                f"{name} needs a loss whose Hessian in the outputs is a positive "
                "multiple of the identity (the squared error); this one is not "
                "(for example the cross-entropy). Use HessianFree(curvature="
                "'gauss_newton') instead."
            )
        return c

    def _solve(
        self,
        products: OutputProducts,
        c: float,
        settings: dict[str, Any],
        rhs: Tensor,
    ) -> tuple[Tensor, int, float]:
        r"""CG on :math:`(cJJ^\top + \lambda I) z = b`, ``rhs`` :math:`b` (outputs)."""
        damping = settings["damping"]
        rhs = rhs.reshape(-1)
        shape = products.outputs.shape

        def kernel(vector: Tensor) -> Tensor:
            self.counters["hvps"] += 1
            image = products.jvp(products.vjp(vector.reshape(shape))).reshape(-1)
            return c * image + damping * vector

        rhs_norm = float(rhs.norm())
        z = torch.zeros_like(rhs)
        if rhs_norm == 0:
            return z.reshape(shape), 0, 0.0
        r = rhs.clone()
        p = r.clone()
        r_sq = float(r @ r)
        iterations = 0
        while iterations < settings["max_cg_iter"]:
            iterations += 1
            kp = kernel(p)
            curvature = float(p @ kp)
            if not curvature > 0:
                break
            alpha = r_sq / curvature
            z = z + alpha * p
            r = r - alpha * kp
            new_sq = float(r @ r)
            if math.sqrt(new_sq) <= settings["cg_tol"] * rhs_norm:
                r_sq = new_sq
                break
            p = r + (new_sq / r_sq) * p
            r_sq = new_sq
        return z.reshape(shape), iterations, math.sqrt(r_sq) / rhs_norm
