r"""Gradient flow, integrated with substeps bounded by the current sharpness."""

from __future__ import annotations

from torch import Tensor

from lightning_eos.curvature.objective import ProbeObjective
from lightning_eos.flows._base import FlowRecord, Method, _Flow


class GradientFlow(_Flow):
    r"""Gradient flow :math:`\dot\theta = -\eta\,\nabla L(\theta)`, time in steps.

    One unit of time is one step of gradient descent with learning rate
    :math:`\eta`: below the edge of stability, gradient descent follows this flow
    (Cohen et al. 2021). :meth:`advance` integrates it over ``duration`` steps with
    ``n`` equal substeps of length :math:`h`, chosen from the sharpness
    :math:`\lambda_1` at the start so that

    .. math::
        h\,\eta\,\lambda_1 \le \texttt{substep\_bound}.

    ``method="rk4"`` (default) takes classical fourth-order Runge-Kutta substeps (4
    gradients each); its stability interval on the negative real axis is
    :math:`h\eta\lambda \in (0, 2.785]`, and with the default bound 1 the error in
    the stiffest mode is 2 % of an already ``e``-fold decayed component per substep.
    ``method="euler"`` takes explicit Euler substeps (1 gradient each), stable for
    :math:`h\eta\lambda < 2`; use a bound well below 1 for accuracy. Only the top of
    the spectrum bounds the substep: a large negative eigenvalue (far from a minimum)
    is integrated with the same :math:`h`, which is accurate as long as
    :math:`h\eta|\lambda_{\min}|` stays small too.

    :math:`\lambda_1` comes from warm-started block Lanczos
    (:func:`~lightning_eos.curvature.lanczos`) on exact Hessian-vector products at
    each unit of time; :meth:`observe` returns it with the loss and the gradient.

    Args:
        objective: The loss on the probe set; the flow evaluates it at its own point.
        point: θ(0), flat.
        lr: The learning rate η of the steps that time is measured in, positive.
        method: ``"rk4"`` or ``"euler"``.
        substep_bound: Largest :math:`h\eta\lambda_1` of a substep, in ``(0, 2.785]``
            for RK4 and ``(0, 2]`` for Euler.
        tol: Relative residual tolerance of the eigensolver, in ``(0, 0.5]``. The
            eigenvalue's own error is about the square of it (0.03 % on the digits
            MLP at the default), and it only sets the substeps.
        max_iter: Most Lanczos steps per eigensolve.
        extra_vectors: Ritz vectors kept beyond the tracked ones for warm starts.
        seed: Seed of the eigensolver's random start vectors, in ``[0, 2**32 - 1]``.
        max_substeps: Most substeps per unit of time; a flow that needs more (its
            sharpness has grown beyond ``max_substeps · substep_bound / η``) stops,
            and :attr:`failed` says why.

    Raises:
        ValueError: For an argument outside its range.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_eos.curvature import ProbeObjective
        >>> model = nn.Linear(3, 1, bias=False).double()
        >>> model.weight.data.zero_()  # θ(0) = 0
        tensor([[0., 0., 0.]], dtype=torch.float64)
        >>> data = [(torch.eye(3, dtype=torch.float64), torch.ones(3, 1).double())]
        >>> loss = lambda out, y: 0.5 * ((out - y) ** 2).sum() / 3
        >>> objective = ProbeObjective(model, data, loss_fn=loss)
        >>> flow = GradientFlow(objective, objective.point(), lr=0.5)
        >>> for step in range(30):
        ...     flow.advance()
        >>> [round(v, 6) for v in flow.theta.tolist()]  # 1 − exp(−ηt/3) = 1 − e⁻⁵
        [0.993262, 0.993262, 0.993262]
    """

    def __init__(
        self,
        objective: ProbeObjective,
        point: Tensor,
        lr: float,
        *,
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

    def observe(self) -> FlowRecord:
        """Loss, gradient norm and sharpness at the current point."""
        if self._cache is not None:
            return self._cache["record"]
        started = self._start_clock()
        snapshot = self._snapshot()
        operator = self._hessian()
        result = self._eigenpairs(self._curvature_operator(operator), 1)
        gradient = operator.gradient()
        loss = operator.loss()
        sharpness = float(result.eigenvalues[0])
        self._stop_clock(started)
        norm_sq = float(gradient.square().sum())
        record = FlowRecord(
            time=self.time,
            loss=loss,
            gradient_norm_sq=norm_sq,
            sharpness=sharpness,
            eigenvalues=[float(v) for v in result.eigenvalues],
            loss_average=loss,
            gradient_norm_sq_average=norm_sq,
            **self._take_costs(),
        )
        self._cache = {**snapshot, "record": record, "gradient": gradient}
        return record

    def advance(self, duration: float = 1.0, lr: float | None = None) -> None:
        """Integrate over ``duration`` steps (with learning rate ``lr`` if given).

        Raises:
            ValueError: If ``duration`` or ``lr`` is not positive.
        """
        self._set_lr(duration, lr)
        if self.failed is not None:
            self.time += duration
            return
        record = self.observe()
        started = self._start_clock()
        self._gradient_flow(duration, self._cache["gradient"], record.sharpness)
        self.time += duration
        self._moved()
        self._stop_clock(started)
