r"""The stable flow and the central flow of RMSProp (the preconditioned form)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_eos._validation import check_number
from lightning_eos.curvature.hessian import HessianOperator
from lightning_eos.curvature.objective import ProbeObjective
from lightning_eos.flows._base import Method
from lightning_eos.flows.central_flow import CentralFlow
from lightning_eos.flows.complementarity import smat, svec, svec_scale
from lightning_eos.flows.gradient_flow import GradientFlow


class PreconditionedHessian:
    r"""The symmetric operator :math:`P^{-1/2} H P^{-1/2}` for a diagonal :math:`P`.

    Its eigenvalues are those of :math:`P^{-1}H`; an eigenvector :math:`v` gives the
    generalized eigenvector :math:`u = P^{-1/2} v` (:math:`Hu = \lambda Pu`,
    :math:`u^\top P u = 1`).
    """

    def __init__(self, operator: HessianOperator, scale: Tensor) -> None:
        self.operator = operator
        self.scale = scale  # P^{-1/2}
        self.dim, self.dtype, self.device = operator.dim, operator.dtype, scale.device

    def matmat(self, vectors: Tensor) -> Tensor:
        """Return :math:`P^{-1/2} H P^{-1/2} v` for the rows ``v`` of ``vectors``."""
        return self.scale * self.operator.matmat(vectors * self.scale)


class _RMSPropState:
    r"""The average :math:`\nu` and :math:`P = \mathrm{diag}(\sqrt\nu + \epsilon)/\eta`.

    Mixed into the flows of gradient descent, it replaces their velocity
    :math:`-\eta\nabla L` by :math:`-P^{-1}\nabla L`, integrates :math:`\nu` with
    :math:`\theta`, and measures the sharpness of :math:`P^{-1}H`.
    """

    theta: Tensor
    lr: float
    method: str
    substep_bound: float
    objective: ProbeObjective

    def _init_state(self, alpha: float, eps: float, nu: Tensor | None) -> None:
        self.alpha = check_number(
            "alpha", alpha, low=0.0, high=1.0, low_open=True, high_open=True
        )
        self.eps = check_number("eps", eps, low=0.0)
        self.kappa = (1.0 - self.alpha) / self.alpha
        if nu is None:
            gradient = self._gradient(self.theta)  # type: ignore[attr-defined]
            nu = (1.0 - self.alpha) * gradient.square()
        nu = nu.detach().to(device=self.theta.device, dtype=self.theta.dtype)
        if nu.shape != self.theta.shape or not bool(
            (torch.isfinite(nu) & (nu >= 0)).all()
        ):
            raise ValueError(
                f"`nu` must be a flat, finite, non-negative vector of "
                f"{self.theta.numel()} entries, got shape {tuple(nu.shape)}."
            )
        self.nu = nu.clone()

    def _preconditioner(self, nu: Tensor | None = None) -> Tensor:
        nu = self.nu if nu is None else nu
        return (nu.clamp_min(0).sqrt() + self.eps) / self.lr

    def _rate(self, nu: Tensor | None = None) -> Tensor:
        r""":math:`2\,dP/d\nu = 1/(\eta\sqrt\nu)`, zero where :math:`\nu = 0`."""
        nu = self.nu if nu is None else nu
        root = nu.clamp_min(0).sqrt()
        return torch.where(root > 0, 1.0 / (self.lr * root), torch.zeros_like(root))

    def _curvature_operator(self, operator: HessianOperator) -> PreconditionedHessian:
        return PreconditionedHessian(operator, self._preconditioner().rsqrt())

    def _gradient_flow(
        self, duration: float, gradient: Tensor, sharpness: float
    ) -> None:
        r"""Integrate the stable flow of :class:`RMSPropFlow` on :math:`(\theta, \nu)`.

        ``n = ⌈duration · λ₁(P⁻¹H) / substep_bound⌉`` substeps of RK4 or Euler on the
        pair :math:`(\theta, \nu)`.
        """
        count = self._substep_count(duration * max(sharpness, 0.0))  # type: ignore[attr-defined]
        if count is None:
            return
        h = duration / count

        def velocity(theta: Tensor, nu: Tensor, grad: Tensor | None = None):
            grad = self._gradient(theta) if grad is None else grad  # type: ignore[attr-defined]
            return -grad / self._preconditioner(nu), self.kappa * (grad.square() - nu)

        theta, nu = self.theta, self.nu
        for index in range(count):
            k1 = velocity(theta, nu, gradient if index == 0 else None)
            if self.method == "euler":
                theta, nu = theta + h * k1[0], nu + h * k1[1]
                continue
            k2 = velocity(theta + h / 2 * k1[0], nu + h / 2 * k1[1])
            k3 = velocity(theta + h / 2 * k2[0], nu + h / 2 * k2[1])
            k4 = velocity(theta + h * k3[0], nu + h * k3[1])
            theta = theta + h / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
            nu = nu + h / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
        self._substeps += count  # type: ignore[attr-defined]
        self.theta, self.nu = theta, nu

    def _state_extra(self) -> dict[str, Any]:
        return {"nu": self.nu.cpu()}

    def _load_extra(self, state: dict[str, Any]) -> None:
        self.nu = state["nu"].to(device=self.theta.device, dtype=self.theta.dtype)


class RMSPropFlow(_RMSPropState, GradientFlow):
    r"""The stable flow of RMSProp: its gradient flow, with the preconditioner moving.

    RMSProp (``torch.optim.RMSprop`` without momentum, not centred) takes the steps
    :math:`\nu_t = \alpha\nu_{t-1} + (1-\alpha)\nabla L(\theta_t)^{\odot2}`,
    :math:`\theta_{t+1} = \theta_t - P_t^{-1}\nabla L(\theta_t)` with
    :math:`P_t = \mathrm{diag}(\sqrt{\nu_t} + \epsilon)/\eta`. Its stable flow,
    time in steps, is

    .. math::
        \dot\theta = -P(\nu)^{-1}\nabla L(\theta), \qquad
        \dot\nu = \kappa\,(\nabla L(\theta)^{\odot 2} - \nu), \qquad
        \kappa = \frac{1-\alpha}{\alpha},

    the backward-difference form of the average (:math:`\nu_t - \nu_{t-1} =
    \kappa(\nabla L(\theta_t)^{\odot 2} - \nu_t)` exactly). :math:`\nu(0)` models the
    average that the first step uses, :math:`(1-\alpha)\nabla L(\theta_0)^{\odot 2}`
    for a fresh optimizer, unless given. The sharpness is that of the preconditioned
    Hessian, :math:`\lambda_1(P^{-1}H)` (threshold 2), found by Lanczos on
    :math:`P^{-1/2}HP^{-1/2}`; substeps obey :math:`h\lambda_1(P^{-1}H) \le`
    ``substep_bound``.

    Args:
        objective: The loss on the probe set.
        point: θ(0), flat.
        lr: η, positive.
        alpha: The smoothing constant α (``torch.optim.RMSprop``'s ``alpha``, the
            β₂ of the papers), in ``(0, 1)``.
        eps: ε, added to :math:`\sqrt\nu`, at least 0.
        nu: ν(0), flat and non-negative; ``None`` for
            :math:`(1-\alpha)\nabla L(\theta_0)^{\odot 2}`.
        method, substep_bound, tol, max_iter, extra_vectors, seed, max_substeps: As
            for :class:`GradientFlow`. The stable flow of RMSProp becomes stiff when
            :math:`\nu` decays along a direction that no longer moves; it then stops
            at ``max_substeps``.

    Raises:
        ValueError: For an argument outside its range.

    References:
        Cohen, Damian, Talwalkar, Kolter, Lee (2025). Understanding optimization in
        deep learning with central flows. ICLR.
    """

    def __init__(
        self,
        objective: ProbeObjective,
        point: Tensor,
        lr: float,
        *,
        alpha: float = 0.99,
        eps: float = 1e-8,
        nu: Tensor | None = None,
        method: Method = "rk4",
        substep_bound: float = 1.0,
        tol: float = 1e-2,
        max_iter: int = 100,
        extra_vectors: int = 1,
        seed: int = 0,
        max_substeps: int = 256,
    ) -> None:
        super().__init__(
            objective,
            point,
            lr,
            method=method,
            substep_bound=substep_bound,
            tol=tol,
            max_iter=max_iter,
            extra_vectors=extra_vectors,
            seed=seed,
            max_substeps=max_substeps,
        )
        self._init_state(alpha, eps, nu)

    def state_dict(self) -> dict[str, Any]:
        """See :meth:`GradientFlow.state_dict`; adds ν."""
        return {**super().state_dict(), **self._state_extra()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict`."""
        super().load_state_dict(state)
        self._load_extra(state)


class RMSPropCentralFlow(_RMSPropState, CentralFlow):
    r"""The central flow of RMSProp: its stable flow plus the oscillation's effect.

    In the generalized eigenbasis :math:`Hu_a = \lambda_a P u_a`,
    :math:`U^\top P U = I`, of the critical directions (:math:`\lambda_a = 2`, the
    threshold of :math:`P^{-1}H`), with :math:`\Sigma = \sum S_{ab} u_a u_b^\top`:

    .. math::
        \dot\theta = -P^{-1}\bar g, \qquad
        \bar g = \nabla L + \tfrac12\nabla\langle\Sigma, H\rangle, \qquad
        \dot\nu = \kappa\bigl[\bar g^{\odot 2} + \mathrm{diag}(H\Sigma H) - \nu\bigr]

    (:math:`\bar g` is the time-averaged gradient, and the average squared gradient
    is its square plus the variance :math:`\mathrm{diag}(H\Sigma H)` of the
    oscillation :math:`H\delta`, both to second order in :math:`\delta`; this
    reproduces RMSProp's drift on the toy of the tests, which the square of
    :math:`\nabla L` alone misses by 10 %). The stability condition involves the
    moving preconditioner: :math:`G = U^\top(H - 2P)U` must not rise on the critical
    space. With :math:`\dot P = \dot\nu / (2\eta\sqrt\nu)`,
    :math:`\dot G = -(A + \beta[S])` where, writing :math:`e(S) = \mathrm{diag}(U S
    U^\top)` and :math:`\mathrm{diag}(H\Sigma H) = 4P^2 e(S)` on the critical space,

    .. math::
        A_{ab} = \langle T[u_a, u_b], P^{-1}\nabla L\rangle
            + \textstyle\sum_m u_{am}u_{bm}\,
            \frac{\kappa(\partial_m L^2 - \nu_m)}{\eta\sqrt{\nu_m}}, \qquad
        \beta[S]_{ab} = \tfrac12\langle T[u_a, u_b], P^{-1}\textstyle\sum_{ij}
            S_{ij}T[u_i, u_j]\rangle
            + \textstyle\sum_m u_{am}u_{bm}\,
            \frac{4\kappa P_m^2}{\eta\sqrt{\nu_m}}\, e_m(S),

    and Σ solves the same complementarity problem as for gradient descent
    (:math:`S \succeq 0`, :math:`A + \beta[S] \succeq 0`, :math:`S(A+\beta[S]) = 0`;
    :math:`\beta` is positive semidefinite). In :math:`A`, the square of
    :math:`\bar g` (with the S of the previous substep) replaces that of
    :math:`\nabla L`: its dependence on S is of higher order and is not linearized.
    It is discretized as :class:`CentralFlow` is, with threshold 2, the constraint
    after each substep linearized in both :math:`\theta` and :math:`\nu`, and Euler
    steps of the pair.
    Predictions: time-averaged loss :math:`L + \frac12\langle\Sigma, H\rangle`
    (:math:`\approx L + \operatorname{tr} S`), time-averaged :math:`\|\nabla L\|^2
    + \operatorname{tr}(H\Sigma H)`; the variances are the eigenvalues of Σ.
    Sharpness: :math:`\lambda_1(P^{-1}H)`.

    Args:
        objective, point, lr, alpha, eps, nu: As for :class:`RMSPropFlow`.
        substeps, refresh_every, margin, method, substep_bound, tol, candidate_tol,
        max_iter, extra_vectors, seed, max_substeps, max_critical: As for
            :class:`CentralFlow`; ``margin`` is relative to the threshold 2.

    Raises:
        ValueError: For an argument outside its range.

    References:
        Cohen, Damian, Talwalkar, Kolter, Lee (2025). Understanding optimization in
        deep learning with central flows. ICLR. (Section on RMSProp.)
    """

    def __init__(
        self,
        objective: ProbeObjective,
        point: Tensor,
        lr: float,
        *,
        alpha: float = 0.99,
        eps: float = 1e-8,
        nu: Tensor | None = None,
        substeps: int = 4,
        refresh_every: int | None = None,
        margin: float = 0.01,
        method: Method = "rk4",
        substep_bound: float = 1.0,
        tol: float = 1e-2,
        candidate_tol: float = 1e-3,
        max_iter: int = 100,
        extra_vectors: int = 1,
        seed: int = 0,
        max_substeps: int = 256,
        max_critical: int = 20,
    ) -> None:
        super().__init__(
            objective,
            point,
            lr,
            substeps=substeps,
            refresh_every=refresh_every,
            margin=margin,
            method=method,
            substep_bound=substep_bound,
            tol=tol,
            candidate_tol=candidate_tol,
            max_iter=max_iter,
            extra_vectors=extra_vectors,
            seed=seed,
            max_substeps=max_substeps,
            max_critical=max_critical,
        )
        self._init_state(alpha, eps, nu)

    # -- the hooks of CentralFlow ------------------------------------------------------

    def _threshold(self) -> float:
        return 2.0

    def _directions(self, vectors: Tensor) -> Tensor:
        return vectors * self._preconditioner().rsqrt()

    def _extend(self, frame: dict[str, Any]) -> None:
        count = frame["count"]
        rows, cols = torch.triu_indices(count, count)
        vectors = frame["vectors"]
        scale = torch.as_tensor(svec_scale(count)).to(vectors)
        frame["phi"] = vectors[rows] * vectors[cols] * scale[:, None]
        frame["preconditioner"] = self._preconditioner()

    def _quadratic(self, frame: dict[str, Any]) -> np.ndarray:
        """½ τ P⁻¹ τᵀ + Φ diag(4κP²/(η√ν)) Φᵀ, with Φ_p = s_p u_i ⊙ u_j."""
        tau, phi = frame["tau"], frame["phi"]
        preconditioner = self._preconditioner()
        weight = 4.0 * self.kappa * preconditioner.square() * self._rate()
        quadratic = 0.5 * (tau / preconditioner) @ tau.T + (phi * weight) @ phi.T
        return quadratic.double().cpu().numpy()

    def _linear(self, frame: dict[str, Any], gradient: Tensor, h: float) -> np.ndarray:
        tau, phi = frame["tau"], frame["phi"]
        # The mean gradient's square, with the S of the previous substep (its
        # dependence on S is of higher order than β's and is not linearized).
        mean = gradient
        if self._solution is not None and len(self._solution) == tau.shape[0]:
            mean = gradient + 0.5 * (tau.T @ torch.from_numpy(self._solution).to(tau))
        drift = self.kappa * (mean.square() - self.nu) * self._rate()
        along = tau @ (gradient / self._preconditioner()) + phi @ drift
        count = frame["count"]
        gap = svec(2.0 * np.eye(count) - self._predicted_curvature(frame))
        return along.double().cpu().numpy() + gap / h

    def _predicted_curvature(self, frame: dict[str, Any]) -> np.ndarray:
        """U^T H U − 2(U^T P U − I) to first order in θ, exactly in P."""
        moved = self.theta - frame["point"]
        shift = self._preconditioner() - frame["preconditioner"]
        along = (frame["tau"] @ moved - 2.0 * (frame["phi"] @ shift)).double().cpu()
        count = frame["count"]
        diagonal = svec(np.diag(frame["eigenvalues"][:count].numpy()))
        return smat(diagonal + along.numpy(), count)

    def _oscillation(self, frame: dict[str, Any], x: np.ndarray) -> Tensor:
        """diag(HΣH) with Hu_a = λ_a P u_a."""
        count = frame["count"]
        sigma = torch.from_numpy(smat(x, count)).to(self.theta)
        values = frame["eigenvalues"][:count].to(self.theta)
        images = values[:, None] * frame["vectors"] * self._preconditioner()
        return ((sigma @ images) * images).sum(dim=0)

    def _euler_step(
        self, frame: dict[str, Any], gradient: Tensor, x: np.ndarray | None, h: float
    ) -> None:
        velocity, squares = gradient, gradient.square()
        if x is not None:
            tau = frame["tau"]
            velocity = gradient + 0.5 * (tau.T @ torch.from_numpy(x).to(tau))
            # Mean square of the gradient = (its mean)² + its variance.
            squares = velocity.square() + self._oscillation(frame, x)
        preconditioner = self._preconditioner()
        self.theta = self.theta - h * velocity / preconditioner
        self.nu = self.nu + (h * self.kappa) * (squares - self.nu)

    def _predictions(
        self,
        frame: dict[str, Any],
        loss: float,
        norm_sq: float,
        sigma: np.ndarray,
        curvature: np.ndarray,
    ) -> tuple[float, float, np.ndarray]:
        count = frame["count"]
        moved = self.theta - frame["point"]
        along = (frame["tau"] @ moved).double().cpu().numpy()
        hessian = smat(
            svec(np.diag(frame["eigenvalues"][:count].numpy())) + along, count
        )
        values = frame["eigenvalues"][:count].to(self.theta)
        images = values[:, None] * frame["vectors"] * self._preconditioner()
        gram_images = (images @ images.T).double().cpu().numpy()
        vectors = frame["vectors"]
        gram = (vectors @ vectors.T).double().cpu().numpy()
        # The eigenvalues of Σ = U S Uᵀ are those of G^{1/2} S G^{1/2}, G = UᵀU.
        root = _sqrtm(gram)
        variances = np.linalg.eigvalsh(root @ sigma @ root)[::-1]
        return (
            loss + 0.5 * float(np.sum(sigma * hessian)),
            norm_sq + float(np.sum(sigma * gram_images)),
            variances,
        )

    # -- adoption and state ------------------------------------------------------------

    def adopt(self, flow: GradientFlow) -> bool:
        """See :meth:`CentralFlow.adopt`; ``flow`` is an :class:`RMSPropFlow`."""
        if not isinstance(flow, RMSPropFlow) or (flow.alpha, flow.eps) != (
            self.alpha,
            self.eps,
        ):
            raise ValueError(
                "`flow` must be an RMSPropFlow with this flow's alpha and eps to be "
                "adopted."
            )
        if self.detached:
            return False
        adopted = super().adopt(flow)
        self.nu = flow.nu
        return adopted

    def state_dict(self) -> dict[str, Any]:
        """See :meth:`CentralFlow.state_dict`; adds ν."""
        return {**super().state_dict(), **self._state_extra()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict`."""
        super().load_state_dict(state)
        self._load_extra(state)


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
