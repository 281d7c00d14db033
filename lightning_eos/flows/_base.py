"""What the flows share: the point, the clock, sharpness tracking, RK4/Euler, state."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_eos._validation import check_choice, check_int, check_number, check_seed
from lightning_eos.curvature.hessian import HessianOperator
from lightning_eos.curvature.lanczos import Eigenpairs, lanczos
from lightning_eos.curvature.objective import ProbeObjective

Method = Literal["rk4", "euler"]
#: Largest h·η·λ₁ for which each method is stable on a quadratic (the intersection
#: of its stability region with the negative real axis).
STABILITY_BOUNDS = {"euler": 2.0, "rk4": 2.785}


@dataclass
class FlowRecord:
    """The state of a flow at one time, and what the last unit of time cost.

    Attributes:
        time: The flow's time, in steps of the optimizer it models.
        loss: L(θ(t)) on the probe set.
        gradient_norm_sq: ‖∇L(θ(t))‖².
        sharpness: λ₁(∇²L(θ(t))) (of the preconditioned Hessian for RMSProp).
        eigenvalues: The tracked top eigenvalues, decreasing.
        loss_average: The flow's prediction of the optimizer's time-averaged loss;
            the loss itself for gradient flow.
        gradient_norm_sq_average: The prediction of the time-averaged ‖∇L‖².
        variances: Eigenvalues of Σ, decreasing: the predicted variances of the
            oscillation along its eigenvectors (empty for gradient flow).
        critical: Rank of Σ: the number of directions that oscillate.
        candidates: Eigenvalues near the threshold that entered the problem for Σ.
        substeps: Substeps taken in the last unit of time.
        gradients: Gradients evaluated in the last unit of time and this record.
        products: Hessian-vector products spent on it.
        third_order: Third-order vectors T[u, v] spent on it.
        seconds: Wall-clock time spent on it.
        converged: Whether every eigensolve met its tolerance.
    """

    time: float
    loss: float
    gradient_norm_sq: float
    sharpness: float
    eigenvalues: list[float]
    loss_average: float
    gradient_norm_sq_average: float
    variances: list[float] = field(default_factory=list)
    critical: int = 0
    candidates: int = 0
    substeps: int = 0
    gradients: int = 0
    products: int = 0
    third_order: int = 0
    seconds: float = 0.0
    converged: bool = True


def loss_and_gradient(objective: ProbeObjective, theta: Tensor) -> tuple[float, Tensor]:
    """L(θ) and ∇L(θ) by one plain backward pass per chunk, summed over processes."""
    variables = [t.detach().requires_grad_() for t in objective.split(theta.clone())]
    loss = torch.zeros((), dtype=objective.dtype, device=objective.device)
    gradient = torch.zeros(
        objective.dim, dtype=objective.dtype, device=objective.device
    )
    for chunk_loss in objective.chunk_losses(variables):
        grads = torch.autograd.grad(chunk_loss, variables, materialize_grads=True)
        loss = loss + chunk_loss.detach()
        gradient += objective.flatten(grads)
    packed = objective._reduce(torch.cat([loss.reshape(1), gradient]))
    return float(packed[0].item()), packed[1:]


def third_order_pairs(operator: HessianOperator, vectors: Tensor) -> Tensor:
    r"""The third-order vectors :math:`T[u_i, u_j]`, :math:`i \le j`, in ``triu`` order.

    Every third-order product of the flows goes through this function, so that a
    faster route (batched or forward-mode products) changes one place.

    Args:
        operator: The Hessian at the point.
        vectors: :math:`u_1, \dots, u_k`, one per row.

    Returns:
        ``(k(k+1)/2, dim)``: the rows :math:`T[u_i, u_j]` for
        ``(i, j)`` in ``torch.triu_indices(k, k)`` order.
    """
    k = vectors.shape[0]
    rows, cols = torch.triu_indices(k, k)
    return operator.third_order(vectors[rows], vectors[cols])


class _Flow:
    """A point θ(t) integrated from θ(0) by a flow, time measured in steps.

    Subclasses define :meth:`observe` and :meth:`advance`; this class holds the
    point, the clock, the warm-started sharpness tracking, the gradient-flow
    integrator and the checkpoint state.
    """

    def __init__(
        self,
        objective: ProbeObjective,
        point: Tensor,
        lr: float,
        *,
        method: Method,
        substep_bound: float,
        tol: float,
        max_iter: int,
        extra_vectors: int,
        seed: int,
        max_substeps: int = 256,
    ) -> None:
        self.lr = check_number("lr", lr, low=0.0, low_open=True)
        self.max_substeps = check_int("max_substeps", max_substeps)
        self.method = check_choice("method", method, STABILITY_BOUNDS)
        self.substep_bound = check_number(
            "substep_bound",
            substep_bound,
            low=0.0,
            high=STABILITY_BOUNDS[method],
            low_open=True,
        )
        self.tol = check_number("tol", tol, low=0.0, high=0.5, low_open=True)
        self.max_iter = check_int("max_iter", max_iter)
        self.extra_vectors = check_int("extra_vectors", extra_vectors, low=0)
        self.seed = check_seed("seed", seed)
        if point.dim() != 1 or point.numel() != objective.dim:
            raise ValueError(
                f"`point` must be a flat vector of {objective.dim} entries, got shape "
                f"{tuple(point.shape)}."
            )
        if not bool(torch.isfinite(point).all()):
            raise ValueError("`point` must be finite, got NaN or infinite entries.")
        self.objective = objective
        self.theta = (
            point.detach().to(device=objective.device, dtype=objective.dtype).clone()
        )
        self.time = 0.0
        self.generator = torch.Generator().manual_seed(seed)
        self.vectors: Tensor | None = None  # warm start of the eigensolver
        self.failed: str | None = None  # why the flow stopped, if it did
        self._cache: Any = None
        self._costs = {"gradients": 0, "products": 0, "third_order": 0}
        self._seconds = 0.0
        self._substeps = 0
        self._converged = True

    # -- what subclasses implement ----------------------------------------------------

    def observe(self) -> FlowRecord:
        """The flow's quantities at the current point (computed once per point)."""
        raise NotImplementedError

    def advance(self, duration: float = 1.0, lr: float | None = None) -> None:
        """Integrate the flow over ``duration`` steps with learning rate ``lr``."""
        raise NotImplementedError

    # -- shared machinery -------------------------------------------------------------

    def _set_lr(self, duration: float, lr: float | None) -> bool:
        """Check the arguments of :meth:`advance`; whether the learning rate changed."""
        check_number("duration", duration, low=0.0, low_open=True)
        if lr is None:
            return False
        lr = check_number("lr", lr, low=0.0, low_open=True)
        changed = lr != self.lr
        self.lr = lr
        return changed

    def _eigenpairs(
        self, operator: Any, k: int, tol: float | None = None
    ) -> Eigenpairs:
        """Top-``k`` eigenpairs, warm-started from the previous ones."""
        k = min(k, operator.dim)
        block = min(k + self.extra_vectors, operator.dim)
        result = lanczos(
            operator,
            k,
            tol=self.tol if tol is None else tol,
            max_iter=self.max_iter,
            init=self.vectors,
            block_size=block,
            generator=self.generator,
            extra=block - k,
        )
        self._costs["products"] += result.num_products
        self._converged &= result.converged
        if result.finite:
            self.vectors = torch.cat([result.eigenvectors, result.extra_vectors])
        return result

    def _curvature_operator(self, operator: HessianOperator) -> Any:
        """The operator whose top eigenvalue meets the threshold: H itself here."""
        return operator

    def _gradient(self, theta: Tensor) -> Tensor:
        self._costs["gradients"] += 1
        return loss_and_gradient(self.objective, theta)[1]

    def _hessian(self) -> HessianOperator:
        """The Hessian at the current point; its loss and gradient count as one."""
        self._costs["gradients"] += 1
        return HessianOperator(self.objective, point=self.theta)

    def _gradient_flow(
        self, duration: float, gradient: Tensor, sharpness: float
    ) -> None:
        r"""Integrate :math:`\dot\theta = -\eta\nabla L(\theta)` over ``duration``.

        ``n = ⌈duration · η · λ₁ / substep_bound⌉`` substeps of equal length ``h``,
        with :math:`\lambda_1` measured at the start: :math:`h\eta\lambda_1 \le`
        ``substep_bound``. ``gradient`` is :math:`\nabla L` at the current point.
        """
        eta = self.lr
        count = self._substep_count(duration * eta * max(sharpness, 0.0))
        if count is None:
            return
        h = duration / count
        theta = self.theta
        for index in range(count):
            k1 = gradient if index == 0 else self._gradient(theta)
            if self.method == "euler":
                theta = theta - (h * eta) * k1
                continue
            k2 = self._gradient(theta - (h * eta / 2) * k1)
            k3 = self._gradient(theta - (h * eta / 2) * k2)
            k4 = self._gradient(theta - (h * eta) * k3)
            theta = theta - (h * eta / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
        self._substeps += count
        self.theta = theta

    def _substep_count(self, stiffness: float) -> int | None:
        """Substeps for ``stiffness`` = duration · (step-scaled λ₁); None if too many.

        A flow that would need more than ``max_substeps`` substeps for one unit of
        time stops (:attr:`failed` says why): explicit substeps cannot follow it.
        """
        count = max(1, math.ceil(stiffness / self.substep_bound))
        if count > self.max_substeps:
            self.failed = (
                f"at time {self.time:g}: one unit of time needs {count} substeps "
                f"(h·λ₁ ≤ {self.substep_bound} with a step-scaled λ₁ of "
                f"{stiffness:.4g}), more than max_substeps={self.max_substeps}: the "
                "flow is too stiff to integrate explicitly"
            )
            return None
        return count

    def _start_clock(self) -> float:
        return time.perf_counter()

    def _stop_clock(self, started: float) -> None:
        self._seconds += time.perf_counter() - started

    def _take_costs(self) -> dict[str, Any]:
        """The costs since the previous record, which are then reset."""
        costs = {
            **self._costs,
            "seconds": self._seconds,
            "substeps": self._substeps,
            "converged": self._converged,
        }
        self._costs = dict.fromkeys(self._costs, 0)
        self._seconds, self._substeps, self._converged = 0.0, 0, True
        return costs

    def _moved(self) -> None:
        """Forget what was computed at the previous point."""
        self._cache = None

    # -- checkpoint state -------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly as an uninterrupted integration.

        The quantities at the current point are recomputed after loading, from the
        same warm start and generator state as before, so the continuation is the
        same computation.
        """
        cache = self._cache
        vectors, generator = (
            (cache["vectors_before"], cache["generator_before"])
            if cache is not None
            else (self.vectors, self.generator.get_state())
        )
        return {
            "theta": self.theta.cpu(),
            "time": self.time,
            "lr": self.lr,
            "vectors": None if vectors is None else vectors.cpu(),
            "generator": generator,
            "failed": self.failed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict`."""
        device, dtype = self.objective.device, self.objective.dtype
        self.theta = state["theta"].to(device=device, dtype=dtype)
        self.time = state["time"]
        self.lr = state["lr"]
        vectors = state["vectors"]
        self.vectors = (
            None if vectors is None else vectors.to(device=device, dtype=dtype)
        )
        self.generator.set_state(state["generator"])
        self.failed = state["failed"]
        self._cache = None

    def _snapshot(self) -> dict[str, Any]:
        """The warm start and generator state before a computation at this point."""
        return {
            "vectors_before": self.vectors,
            "generator_before": self.generator.get_state(),
        }
