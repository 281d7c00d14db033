r"""The central flow of gradient descent at the edge of stability."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_eos._validation import check_int, check_number
from lightning_eos.curvature.objective import ProbeObjective
from lightning_eos.flows._base import (
    FlowRecord,
    Method,
    _Flow,
    loss_and_gradient,
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
    step) and :math:`k(k+1)/2` third-order vectors. A learning rate that changes
    between :meth:`observe` and :meth:`advance` moves the threshold, and the
    current point is refreshed once more.

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
        tol: Relative residual tolerance of the eigensolver while there is no
            candidate (it then only finds :math:`\lambda_1`), in ``(0, 0.5]``.
        candidate_tol: The tolerance once there are candidates: their eigenvectors
            enter the third-order vectors, and an error :math:`\epsilon` in them
            is an error of order :math:`\epsilon` in Σ. In ``(0, 0.5]``.
        max_iter: Most Lanczos steps per eigensolve.
        extra_vectors: Ritz vectors kept beyond the tracked ones for warm starts.
        seed: Seed of the eigensolver's random start vectors, in ``[0, 2**32 - 1]``.
        max_substeps: Most substeps per unit of time away from the threshold (see
            :class:`GradientFlow`).
        max_critical: Most candidate directions. The complementarity problem
            has :math:`k(k+1)/2` unknowns for :math:`k` candidates and its solver's
            cost grows like the cube of that (seconds per substep beyond about 25
            on a CPU); a flow with more candidates stops, and says so in
            :attr:`failed`, instead of slowing to a halt. At least 1.

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
            method=method,
            substep_bound=substep_bound,
            tol=tol,
            max_iter=max_iter,
            extra_vectors=extra_vectors,
            seed=seed,
            max_substeps=max_substeps,
        )
        self.substeps = check_int("substeps", substeps)
        self.max_critical = check_int("max_critical", max_critical)
        self.refresh_every = (
            self.substeps
            if refresh_every is None
            else check_int("refresh_every", refresh_every)
        )
        self.margin = check_number("margin", margin, low=0.0, high=0.5, low_open=True)
        self.candidate_tol = check_number(
            "candidate_tol", candidate_tol, low=0.0, high=0.5, low_open=True
        )
        self.tracked = 1
        self.detached = False  # whether it has ever left gradient flow
        self._frame: dict[str, Any] | None = None  # the last refresh
        self._since_refresh = 0  # substeps taken since it
        self._solution: np.ndarray | None = None  # S of the last substep

    # -- public -----------------------------------------------------------------------

    def observe(self) -> FlowRecord:
        """Loss, sharpness, Σ and the predictions at the current point."""
        if self._cache is not None:
            return self._cache["record"]
        started = self._start_clock()
        snapshot = self._snapshot()
        measured = self._needs_refresh()
        if measured:
            frame = self._refresh()
            loss, gradient = frame["loss"], frame["gradient"]
        else:
            frame = self._frame
            self._costs["gradients"] += 1
            loss, gradient = loss_and_gradient(self.objective, self.theta)
        x = self._solve(frame, gradient, 1.0 / self.substeps, warm=self._solution)
        self._solution = x
        self._stop_clock(started)
        record = self._record(frame, loss, gradient, x, measured)
        self._cache = {**snapshot, "record": record, "gradient": gradient}
        return record

    def advance(self, duration: float = 1.0, lr: float | None = None) -> None:
        """Integrate over ``duration`` steps (with learning rate ``lr`` if given).

        Raises:
            ValueError: If ``duration`` or ``lr`` is not positive.
        """
        if self._set_lr(duration, lr):
            self._cache = None  # the threshold moved: recompute the candidates
        record = self.observe()
        if self.failed is not None:
            self.time += duration
            self._moved()
            return
        started = self._start_clock()
        assert self._frame is not None
        if self._frame["count"] == 0:
            self._gradient_flow(duration, self._cache["gradient"], record.sharpness)
        else:
            self._central_substeps(duration, self._cache["gradient"])
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
                its method, substep bound, eigensolver settings and seed, which this
                flow has adopted at every earlier time (it then takes over
                ``flow``'s time and learning rate too).

        Raises:
            ValueError: If ``flow`` has other settings or is behind this flow.
        """
        if self.detached:
            return False
        settings = ("method", "substep_bound", "tol", "max_iter", "extra_vectors")
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
        self.theta, self.time, self.lr, self.tracked = flow.theta, flow.time, flow.lr, 1
        self._frame, self._since_refresh, self._solution = None, 0, None
        if record.eigenvalues[0] >= (1.0 - self.margin) * self._threshold():
            self.detached = True
            self.vectors = cache["vectors_before"]
            self.generator.set_state(cache["generator_before"])
            self._cache = None
            return False
        self.vectors = flow.vectors
        self.generator.set_state(flow.generator.get_state())
        self._frame = {
            "count": 0,
            "lr": self.lr,
            "eigenvalues": torch.tensor(record.eigenvalues, dtype=torch.float64),
        }
        self._cache = {
            **self._snapshot(),
            "vectors_before": cache["vectors_before"],
            "generator_before": cache["generator_before"],
            "record": dataclasses.replace(record),
            "gradient": cache["gradient"],
        }
        return True

    # -- the integration --------------------------------------------------------------

    def _needs_refresh(self) -> bool:
        frame = self._frame
        return (
            frame is None
            or frame["count"] == 0
            or frame["lr"] != self.lr
            or self._since_refresh >= self.refresh_every
        )

    def _central_substeps(self, duration: float, gradient: Tensor) -> None:
        count = max(1, math.ceil(duration * self.substeps - 1e-9))
        h = duration / count
        x = self._solution
        if h != 1.0 / self.substeps:
            x = self._solve(self._frame, gradient, h, warm=x)
        for index in range(count):
            if index > 0:
                if self._needs_refresh():
                    gradient = self._refresh()["gradient"]
                else:
                    gradient = self._gradient(self.theta)
                if self._frame["count"] == 0:  # every candidate left
                    remaining = (count - index) * h
                    sharpness = float(self._frame["eigenvalues"][0])
                    self._gradient_flow(remaining, gradient, sharpness)
                    break
                x = self._solve(self._frame, gradient, h, warm=self._solution)
            if self.failed is not None:
                break
            self._solution = x
            self._euler_step(self._frame, gradient, x, h)
            self._since_refresh += 1
        self._substeps += count

    def _refresh(self) -> dict[str, Any]:
        """Eigenpairs, candidates and third-order vectors at the current point."""
        operator = self._hessian()
        curvature = self._curvature_operator(operator)
        threshold = self._threshold()
        old = self._frame
        tol = self.candidate_tol if old is not None and old["count"] else self.tol
        while True:
            result = self._eigenpairs(curvature, self.tracked, tol)
            values = result.eigenvalues
            count = int((values >= (1.0 - self.margin) * threshold).sum())
            if count and tol != self.candidate_tol:
                tol = self.candidate_tol  # the first candidate: solve again, tighter
                continue
            if count < len(values) or len(values) >= operator.dim:
                break
            if count > self.max_critical:
                break
            self.tracked += 1  # every tracked eigenvalue is a candidate: look further
        if count > self.max_critical:
            self.failed = (
                f"at time {self.time:g}: {count} or more eigenvalues are within "
                f"{self.margin:g} of the threshold, more than "
                f"max_critical={self.max_critical}: far above the edge of stability, "
                "the complementarity problem is too large to solve at every substep"
            )
            count = 0
        self.tracked = min(count + 1, operator.dim)
        vectors = self._directions(result.eigenvectors[:count])
        frame: dict[str, Any] = {
            "count": count,
            "lr": self.lr,
            "eigenvalues": values.clone(),
            "gradient": operator.gradient(),
            "loss": operator.loss(),
            "point": self.theta,
            "vectors": vectors,
        }
        if count:
            pairs = third_order_pairs(operator, vectors)
            self._costs["third_order"] += pairs.shape[0]
            scale = torch.as_tensor(svec_scale(count)).to(pairs)
            frame["tau"] = pairs * scale[:, None]
            self._extend(frame)
        # Carry the last S over to the new basis as a warm start: R S Rᵀ, R = UᵀU'.
        if count and self._solution is not None and old and old["count"]:
            rotation = (vectors @ old["vectors"].T).double().cpu().numpy()
            old_sigma = smat(self._solution, old["count"])
            self._solution = svec(rotation @ old_sigma @ rotation.T)
        else:
            self._solution = None
        self._frame, self._since_refresh = frame, 0
        return frame

    def _solve(
        self,
        frame: dict[str, Any],
        gradient: Tensor,
        h: float,
        warm: np.ndarray | None = None,
    ) -> np.ndarray:
        """S (svec coordinates) for a substep of length ``h`` from the current point."""
        count = frame["count"]
        if count == 0 or self.failed is not None:
            return np.zeros(count * (count + 1) // 2)
        c = self._linear(frame, gradient, h)
        try:
            x, _ = solve_svec(c, self._quadratic(frame), count, warm=warm)
        except ComplementarityError as error:
            self.failed = f"at time {self.time:g}: {error}"
            return np.zeros_like(c)
        return x

    # -- what the optimizer decides (gradient descent here) ---------------------------

    def _threshold(self) -> float:
        """The eigenvalue of the curvature operator at which steps become unstable."""
        return 2.0 / self.lr

    def _directions(self, vectors: Tensor) -> Tensor:
        """The directions u_a of Σ from the eigenvectors of the curvature operator."""
        return vectors

    def _extend(self, frame: dict[str, Any]) -> None:
        """Precompute at a refresh: the Gram matrix of the third-order vectors."""
        frame["gram"] = (frame["tau"] @ frame["tau"].T).double().cpu()

    def _quadratic(self, frame: dict[str, Any]) -> np.ndarray:
        """The quadratic term ½ τ τᵀ: ⟨S, β[S]⟩ = ½‖Σ S_ij T[u_i, u_j]‖²."""
        return 0.5 * frame["gram"].numpy()

    def _linear(self, frame: dict[str, Any], gradient: Tensor, h: float) -> np.ndarray:
        """The linear term svec(A) + svec(2/η I − M)/(hη), svec(A)_p = ⟨τ_p, ∇L⟩."""
        eta = self.lr
        along_gradient = (frame["tau"] @ gradient).double().cpu().numpy()
        count = frame["count"]
        gap = svec(2.0 / eta * np.eye(count) - self._predicted_curvature(frame))
        return along_gradient + gap / (h * eta)

    def _predicted_curvature(self, frame: dict[str, Any]) -> np.ndarray:
        """M = UᵀH(θ)U to first order from the refresh: diag(λ) + ⟨T[u_a, u_b], Δ⟩."""
        count = frame["count"]
        moved = self.theta - frame["point"]
        along_move = (frame["tau"] @ moved).double().cpu().numpy()
        diagonal = svec(np.diag(frame["eigenvalues"][:count].numpy()))
        return smat(diagonal + along_move, count)

    def _euler_step(
        self, frame: dict[str, Any], gradient: Tensor, x: np.ndarray | None, h: float
    ) -> None:
        """θ ← θ − hη(∇L + ½ Σ S_ij T[u_i, u_j])."""
        velocity = gradient
        if x is not None:
            tau = frame["tau"]
            velocity = gradient + 0.5 * (tau.T @ torch.from_numpy(x).to(tau))
        self.theta = self.theta - (h * self.lr) * velocity

    def _predictions(
        self,
        frame: dict[str, Any],
        loss: float,
        norm_sq: float,
        sigma: np.ndarray,
        curvature: np.ndarray,
    ) -> tuple[float, float, np.ndarray]:
        """Time-averaged loss and ‖∇L‖², and the variances (eigenvalues of Σ)."""
        average_loss = loss + float(np.trace(sigma)) / self.lr
        average_norm = norm_sq + float(np.sum((curvature @ sigma) * curvature))
        return average_loss, average_norm, np.linalg.eigvalsh(sigma)[::-1]

    def _record(
        self,
        frame: dict[str, Any],
        loss: float,
        gradient: Tensor,
        x: np.ndarray,
        measured: bool,
    ) -> FlowRecord:
        count = frame["count"]
        eigenvalues = frame["eigenvalues"].tolist()
        curvature = np.zeros((0, 0))
        if count:
            self.detached = True
            curvature = self._predicted_curvature(frame)
            if not measured:  # between refreshes: first-order predictions
                predicted = np.linalg.eigvalsh(curvature)[::-1].tolist()
                eigenvalues = sorted(predicted + eigenvalues[count:], reverse=True)
        norm_sq = float(gradient.square().sum())
        sigma = smat(x, count) if count else np.zeros((0, 0))
        average_loss, average_norm, values = loss, norm_sq, np.zeros(0)
        if count:
            average_loss, average_norm, values = self._predictions(
                frame, loss, norm_sq, sigma, curvature
            )
        largest = float(values[0]) if count else 0.0
        rank = int((values > 1e-7 * largest).sum()) if largest > 0 else 0
        failed = self.failed is not None
        return FlowRecord(
            time=self.time,
            loss=loss,
            gradient_norm_sq=norm_sq,
            sharpness=eigenvalues[0],
            eigenvalues=eigenvalues,
            loss_average=math.nan if failed else average_loss,
            gradient_norm_sq_average=math.nan if failed else average_norm,
            variances=[] if failed else [float(v) for v in values[:rank]],
            critical=0 if failed else rank,
            candidates=count,
            **self._take_costs(),
        )

    # -- checkpoint state -------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """See :meth:`GradientFlow.state_dict`; adds the last refresh and S."""
        state = super().state_dict()
        before = self._cache if self._cache is not None else self._snapshot()
        frame = before["frame_before"]
        solution = before["solution_before"]
        state.update(
            tracked=before["tracked_before"],
            detached=self.detached,
            since_refresh=before["since_refresh_before"],
            frame=None if frame is None else _to_cpu(frame),
            solution=None if solution is None else torch.from_numpy(solution.copy()),
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict`."""
        super().load_state_dict(state)
        self.tracked = state["tracked"]
        self.detached = state["detached"]
        self._since_refresh = state["since_refresh"]
        frame = state["frame"]
        self._frame = None if frame is None else _to_device(frame, self.theta)
        solution = state["solution"]
        self._solution = None if solution is None else solution.numpy().copy()

    def _snapshot(self) -> dict[str, Any]:
        return {
            **super()._snapshot(),
            "tracked_before": self.tracked,
            "frame_before": self._frame,
            "since_refresh_before": self._since_refresh,
            "solution_before": self._solution,
        }


def _to_cpu(frame: dict[str, Any]) -> dict[str, Any]:
    return {k: v.cpu() if isinstance(v, Tensor) else v for k, v in frame.items()}


def _to_device(frame: dict[str, Any], like: Tensor) -> dict[str, Any]:
    """Move a saved frame's vectors next to ``like`` (float64 bookkeeping stays)."""
    return {
        key: value.to(device=like.device, dtype=like.dtype)
        if isinstance(value, Tensor) and key not in ("eigenvalues", "gram")
        else value
        for key, value in frame.items()
    }
