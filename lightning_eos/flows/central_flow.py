r"""The central flow of gradient descent at the edge of stability."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_eos.curvature.objective import ProbeObjective
from lightning_eos.flows._base import (
    FlowRecord,
    Method,
    _Flow,
    check_count,
    check_positive,
    third_order_pairs,
)
from lightning_eos.flows.complementarity import (
    ComplementarityError,
    smat,
    solve_svec,
    svec,
    svec_scale,
)
from lightning_eos.flows.gradient_flow import GradientFlow


class CentralFlow(_Flow):
    r"""The central flow of gradient descent with learning rate :math:`\eta`.

    The flow (Cohen, Damian, Talwalkar, Kolter, Lee 2025), time in steps:

    .. math::
        \dot\theta = -\eta\Bigl[\nabla L(\theta)
            + \tfrac12 \nabla_\theta \langle \Sigma(t), \nabla^2 L(\theta)\rangle\Bigr].

    :math:`\Sigma \succeq 0` is the covariance of gradient descent's oscillation
    around the flow. It lives on the critical eigenspace :math:`E` of
    :math:`H = \nabla^2 L(\theta)` at :math:`2/\eta`; in an orthonormal basis
    :math:`u_1, \dots, u_k` of :math:`E`, :math:`\Sigma = \sum_{ij} S_{ij} u_i u_j^\top`
    and :math:`\nabla\langle\Sigma, H\rangle = \sum_{ij} S_{ij} T[u_i, u_j]` with the
    third-order vectors :math:`T[u, v] = \nabla(u^\top H v)`. Σ is defined by three
    conditions. (i) :math:`S \succeq 0`. (ii) Stability: the eigenvalues of
    :math:`H` on :math:`E` must not rise above :math:`2/\eta`; to first order their
    motion is that of :math:`U^\top H U`, whose derivative along the flow is
    :math:`\frac{d}{dt}(u_a^\top H u_b) = \langle T[u_a, u_b], \dot\theta\rangle
    = -\eta\,Z_{ab}` with

    .. math::
        Z = A + \beta[S], \qquad A_{ab} = \langle T[u_a, u_b], \nabla L\rangle, \qquad
        \beta[S]_{ab} = \tfrac12 \textstyle\sum_{ij} S_{ij}
            \langle T[u_a, u_b], T[u_i, u_j]\rangle,

    so the condition is :math:`Z \succeq 0`. (iii) Complementarity: Σ oscillates
    only where the constraint holds with equality, :math:`\langle S, Z\rangle = 0`
    (equivalently :math:`SZ = 0`). :math:`\beta` is positive semidefinite
    (:math:`\langle S, \beta[S]\rangle = \frac12\|\sum S_{ij}T[u_i,u_j]\|^2`), and
    (i)–(iii) are the optimality conditions of

    .. math::
        \min_{S\succeq 0}\ \bigl\|\nabla L + \tfrac12 \textstyle\sum_{ij} S_{ij}
            T[u_i, u_j]\bigr\|^2:

    Σ makes the time-averaged gradient as small as the cone allows. With one
    critical direction this is :math:`\sigma^2 = \max(0, -2\langle\nabla L,
    \nabla S\rangle/\|\nabla S\|^2)` with :math:`\nabla S = T[u_1, u_1]`. Below the
    threshold, :math:`\Sigma = 0` and the flow is gradient flow.

    Predictions at time :math:`t`: the time-averaged loss of gradient descent
    :math:`L(\theta) + \operatorname{tr}(\Sigma)/\eta`, its time-averaged squared
    gradient norm :math:`\|\nabla L\|^2 + \operatorname{tr}(H\Sigma H)`, and the
    variance of the oscillation along each eigenvector of Σ: its eigenvalue.

    Discretization. While no eigenvalue is within ``margin`` (relative) of
    :math:`2/\eta`, a unit of time is integrated exactly as :class:`GradientFlow`
    does (same substeps, same arithmetic: the two flows agree to the last bit).
    Otherwise the unit is split into ``substeps`` explicit Euler substeps of length
    :math:`h`. The *candidates* are the eigenpairs within the margin; at a refresh
    (every ``refresh_every`` substeps, and at every unit of time) they are
    recomputed by warm-started block Lanczos, with their third-order vectors. At
    each substep the gradient is recomputed and :math:`S` solves the complementarity
    problem for the constraint *after* the substep, linearized as in the reference
    implementation of the paper: with :math:`\Delta = \theta - \theta_{\text{refresh}}`,
    :math:`M_{ab} = \lambda_a\delta_{ab} + \langle T[u_a, u_b], \Delta\rangle` (the
    predicted :math:`U^\top HU`),

    .. math::
        M - h\eta\,(A + \beta[S]) \preceq \tfrac{2}{\eta} I
        \iff A + \tfrac{1}{h\eta}\bigl(\tfrac2\eta I - M\bigr) + \beta[S] \succeq 0.

    Candidates below the threshold then get no weight unless they would cross it
    within the substep, and an eigenvalue that drifted above :math:`2/\eta` is
    brought back to it: the critical set enters and leaves by itself. The problem is
    solved by :func:`~lightning_eos.flows.complementarity.solve_svec`, warm-started.
    The loss and the predictions are reported at the start of each unit of time,
    with Σ of its first substep.

    Cost per unit of time with :math:`k` candidates: ``substeps`` gradients, plus at
    each refresh an eigensolve (about ``k + extra_vectors`` products per Lanczos
    step) and :math:`k(k+1)/2` third-order vectors.

    Args:
        objective: The loss on the probe set; the flow evaluates it at its own point.
        point: θ(0), flat.
        lr: η of gradient descent, positive.
        substeps: Euler substeps per unit of time near the threshold; the paper's
            reference implementation takes 4. At least 1.
        refresh_every: Substeps between refreshes of eigenvectors and third-order
            vectors (``None``: once per unit of time). At least 1.
        margin: Relative distance to :math:`2/\eta` within which an eigenvalue is
            a candidate, in ``(0, 0.5]``.
        method: Integrator away from the threshold (see :class:`GradientFlow`).
        substep_bound: Largest :math:`h\eta\lambda_1` away from the threshold.
        tol: Relative residual tolerance of the eigensolver, in ``(0, 0.5]``.
        max_iter: Most Lanczos steps per eigensolve.
        extra_vectors: Ritz vectors kept beyond the tracked ones for warm starts.
        seed: Seed of the eigensolver's random start vectors.

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
        substeps: int = 4,
        refresh_every: int | None = None,
        margin: float = 0.01,
        method: Method = "rk4",
        substep_bound: float = 1.0,
        tol: float = 1e-3,
        max_iter: int = 100,
        extra_vectors: int = 1,
        seed: int = 0,
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
        )
        self.substeps = check_count("substeps", substeps)
        self.refresh_every = (
            self.substeps
            if refresh_every is None
            else check_count("refresh_every", refresh_every)
        )
        self.margin = check_positive("margin", margin, 0.5)
        self.tracked = 1
        self.detached = False  # whether it has ever left gradient flow

    # -- public -----------------------------------------------------------------------

    def observe(self) -> FlowRecord:
        """Loss, sharpness, Σ and the predictions at the current point."""
        if self._cache is not None:
            return self._cache["record"]
        started = self._start_clock()
        snapshot = self._snapshot()
        frame = self._refresh(warm=None)
        x = self._solve(frame, frame["gradient"], 1.0 / self.substeps)
        frame["solution"] = x
        self._stop_clock(started)
        self._cache = {**snapshot, "frame": frame, "record": self._record(frame, x)}
        return self._cache["record"]

    def advance(self, duration: float = 1.0, lr: float | None = None) -> None:
        """Integrate over ``duration`` steps (with learning rate ``lr`` if given).

        Raises:
            ValueError: If ``duration`` or ``lr`` is not positive.
        """
        if self._set_lr(duration, lr):
            self._cache = None  # the threshold moved: recompute the candidates
        self.observe()
        if self.failed is not None:
            self.time += duration
            return
        started = self._start_clock()
        frame = self._cache["frame"]
        if frame["count"] == 0:
            self._gradient_flow(duration, frame["gradient"], frame["eigenvalues"][0])
        else:
            self._central_substeps(duration, frame)
        self.time += duration
        self._moved()
        self._stop_clock(started)

    def adopt(self, flow: GradientFlow) -> bool:
        r"""Take over a gradient flow's state while the two flows coincide.

        Until an eigenvalue first comes within ``margin`` of :math:`2/\eta`, this
        flow *is* gradient flow with the same settings, computed identically; a
        caller that integrates both can integrate the gradient flow alone and copy
        it here. Call it at each unit of time instead of :meth:`observe`: it copies
        ``flow`` (which it observes) and returns ``True``, or, from the first time
        an eigenvalue is near the threshold on, copies the state from before that
        observation, takes nothing more, and returns ``False``; from then on this
        flow integrates itself.

        Args:
            flow: A :class:`GradientFlow` started from this flow's initial point with
                its learning rate, method, substep bound, eigensolver settings and
                seed, which this flow has adopted at every earlier time (it then
                takes over ``flow``'s time too).

        Raises:
            ValueError: If ``flow`` has other settings or is behind this flow.
        """
        if self.detached:
            return False
        settings = ("lr", "method", "substep_bound", "tol", "max_iter", "extra_vectors")
        mismatched = [
            name for name in settings if getattr(flow, name) != getattr(self, name)
        ]
        if mismatched or flow.time < self.time or flow.seed != self.seed:
            raise ValueError(
                "`flow` must have this flow's settings and time to be adopted; "
                f"it differs in {mismatched or ['time or seed']}."
            )
        record = flow.observe()
        cache = flow._cache
        self.theta, self.time, self.tracked = flow.theta, flow.time, 1
        if record.eigenvalues[0] >= (1.0 - self.margin) * 2.0 / self.lr:
            self.detached = True
            self.vectors = cache["vectors_before"]
            self.generator.set_state(cache["generator_before"])
            self._cache = None
            return False
        self.vectors = flow.vectors
        self.generator.set_state(flow.generator.get_state())
        frame = {
            "gradient": cache["gradient"],
            "loss": record.loss,
            "eigenvalues": record.eigenvalues,
            "count": 0,
            "point": self.theta,
            "solution": np.zeros(0),
        }
        self._cache = {
            "vectors_before": cache["vectors_before"],
            "generator_before": cache["generator_before"],
            "tracked_before": 1,
            "frame": frame,
            "record": dataclasses.replace(record),
        }
        return True

    # -- the integration --------------------------------------------------------------

    def _central_substeps(self, duration: float, frame: dict[str, Any]) -> None:
        count = max(1, math.ceil(duration * self.substeps - 1e-9))
        h = duration / count
        eta = self.lr
        x = frame["solution"]
        if h != 1.0 / self.substeps:
            x = self._solve(frame, frame["gradient"], h, warm=x)
        for index in range(count):
            if index > 0:
                if index % self.refresh_every == 0:
                    frame = self._refresh(warm=(frame, x))
                    if frame["count"] == 0:  # every candidate left: gradient flow
                        self.theta = self.theta - (h * eta) * frame["gradient"]
                        continue
                    gradient = frame["gradient"]
                else:
                    gradient = self._gradient(self.theta)
                x = self._solve(frame, gradient, h, warm=x)
            else:
                gradient = frame["gradient"]
            if self.failed is not None:
                return
            correction = 0.5 * (frame["tau"].T @ frame["to_tensor"](x))
            self.theta = self.theta - (h * eta) * (gradient + correction)
        self._substeps += count

    def _refresh(self, warm: tuple[dict[str, Any], np.ndarray] | None) -> dict:
        """Eigenpairs, candidates and third-order vectors at the current point."""
        operator = self._hessian()
        threshold = 2.0 / self.lr
        while True:
            result = self._eigenpairs(operator, self.tracked)
            values = result.eigenvalues
            count = int((values >= (1.0 - self.margin) * threshold).sum())
            if count < len(values) or len(values) >= operator.dim:
                break
            self.tracked += 1  # every tracked eigenvalue is a candidate: look further
        self.tracked = min(count + 1, operator.dim)
        vectors = result.eigenvectors[:count]
        frame: dict[str, Any] = {
            "gradient": operator.gradient(),
            "loss": operator.loss(),
            "eigenvalues": [float(v) for v in values],
            "count": count,
            "point": self.theta,
            "vectors": vectors,
            "to_tensor": lambda x: torch.from_numpy(x).to(
                dtype=self.theta.dtype, device=self.theta.device
            ),
        }
        if count == 0:
            return frame
        pairs = third_order_pairs(operator, vectors)
        self._costs["third_order"] += pairs.shape[0]
        scale = torch.as_tensor(svec_scale(count), dtype=pairs.dtype)
        tau = pairs * scale.to(pairs.device)[:, None]
        frame["tau"] = tau
        frame["gram"] = (tau @ tau.T).double().cpu().numpy()
        frame["diagonal"] = svec(np.diag(threshold - values[:count].numpy()))
        if warm is not None:
            old_frame, old_x = warm
            rotation = (vectors @ old_frame["vectors"].T).double().cpu().numpy()
            frame["warm"] = (
                svec(rotation @ smat(old_x, len(old_frame["vectors"])) @ rotation.T)
                if old_frame["count"]
                else None
            )
        return frame

    def _solve(
        self,
        frame: dict[str, Any],
        gradient: Tensor,
        h: float,
        warm: np.ndarray | None = None,
    ) -> np.ndarray:
        """Σ (as svec coordinates of S) for a substep of length ``h`` from here."""
        count = frame["count"]
        if count == 0:
            return np.zeros(0)
        eta = self.lr
        tau = frame["tau"]
        displacement = self.theta - frame["point"]
        along_gradient = (tau @ gradient).double().cpu().numpy()
        along_move = (tau @ displacement).double().cpu().numpy()
        c = along_gradient + (frame["diagonal"] - along_move) / (h * eta)
        warm = warm if warm is not None else frame.get("warm")
        try:
            x, _ = solve_svec(c, 0.5 * frame["gram"], count, warm=warm)
        except ComplementarityError as error:
            self.failed = f"at time {self.time:g}: {error}"
            return np.zeros_like(c)
        return x

    def _record(self, frame: dict[str, Any], x: np.ndarray) -> FlowRecord:
        if frame["count"]:
            self.detached = True
        count = frame["count"]
        gradient = frame["gradient"]
        norm_sq = float(gradient.square().sum())
        loss = frame["loss"]
        if self.failed is not None:
            nan = math.nan
            return FlowRecord(
                time=self.time,
                loss=loss,
                gradient_norm_sq=norm_sq,
                sharpness=frame["eigenvalues"][0],
                eigenvalues=frame["eigenvalues"],
                loss_average=nan,
                gradient_norm_sq_average=nan,
                candidates=count,
                **self._take_costs(),
            )
        sigma = smat(x, count) if count else np.zeros((0, 0))
        values = np.linalg.eigvalsh(sigma)[::-1] if count else np.zeros(0)
        largest = float(values[0]) if count else 0.0
        rank = int((values > 1e-7 * largest).sum()) if largest > 0 else 0
        curvature = np.asarray(frame["eigenvalues"][:count])
        return FlowRecord(
            time=self.time,
            loss=loss,
            gradient_norm_sq=norm_sq,
            sharpness=frame["eigenvalues"][0],
            eigenvalues=frame["eigenvalues"],
            loss_average=loss + float(np.trace(sigma)) / self.lr,
            gradient_norm_sq_average=norm_sq
            + float(np.sum(curvature[:, None] * sigma * curvature[None, :])),
            variances=[float(v) for v in values[:rank]],
            critical=rank,
            candidates=count,
            **self._take_costs(),
        )

    # -- checkpoint state -------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """See :meth:`GradientFlow.state_dict`; adds the number of tracked pairs."""
        state = super().state_dict()
        state["tracked"] = (
            self._cache["tracked_before"] if self._cache is not None else self.tracked
        )
        state["detached"] = self.detached
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict`."""
        super().load_state_dict(state)
        self.tracked = state["tracked"]
        self.detached = state["detached"]

    def _snapshot(self) -> dict[str, Any]:
        return {**super()._snapshot(), "tracked_before": self.tracked}
