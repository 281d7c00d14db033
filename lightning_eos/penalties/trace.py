"""The trace penalty μ·tr(∇²L), by Hutchinson's estimator."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from lightning_eos._validation import check_choice, check_int, check_seed
from lightning_eos.curvature.hessian import HessianOperator
from lightning_eos.curvature.objective import ProbeObjective
from lightning_eos.penalties._base import (
    Penalty,
    PenaltyResult,
    check_coefficient,
    unit_random,
)
from lightning_eos.penalties._terms import CurvatureTerm

_DISTRIBUTIONS = ("rademacher", "gaussian")


class TracePenalty(Penalty):
    r"""The trace penalty :math:`P = \mu\,\mathrm{tr}\,\nabla^2 L(\theta)`.

    The trace is estimated without bias by Hutchinson's estimator with
    :math:`s` = ``num_samples`` random vectors :math:`v_i` with
    :math:`\mathbb{E}[v v^\top] = I`, drawn afresh at every evaluation:

    .. math::
        \widehat{P} = \frac{\mu}{s}\sum_{i=1}^s v_i^\top H v_i,
        \qquad
        \nabla \widehat{P} = \frac{\mu}{s}\sum_{i=1}^s T[v_i, v_i],

    where :math:`T[v, v] = \nabla_\theta (v^\top \nabla^2 L(\theta)\, v)` with
    :math:`v` fixed (:meth:`~lightning_eos.curvature.HessianOperator.third_order`).
    Since :math:`\mathbb{E}[v^\top H v] = \mathrm{tr}\,H` for every :math:`\theta`,
    the gradient estimate is unbiased too: :math:`\mathbb{E}[T[v, v]] =
    \nabla\,\mathrm{tr}\,H`. For fixed vectors, both are exact. Rademacher vectors
    (independent ±1 entries) give the smallest variance among vectors with
    independent entries, :math:`\mathrm{Var}[v^\top H v] = 2\sum_{i \ne j}
    H_{ij}^2`; Gaussian vectors add :math:`2\sum_i H_{ii}^2`.

    The vectors come from this penalty's own generator (saved in checkpoints), so
    the random stream of training does not move. The vectors of the last
    evaluation are kept in :attr:`last_vectors`.

    Cost: one gradient with graph, ``num_samples`` Hessian-vector products (for the
    value) and ``num_samples`` third-order vectors.

    Third derivatives: PyTorch's native BatchNorm with batch statistics,
    InstanceNorm and LayerNorm give wrong third derivatives; build the objective
    with ``normalization="plain"`` (as
    :class:`~lightning_eos.penalties.PenaltyCallback` does) on models that hold
    them.

    Args:
        coefficient: :math:`\mu`, a finite number at least 0.
        num_samples: :math:`s`, random vectors per evaluation, at least 1.
        distribution: ``"rademacher"`` or ``"gaussian"``.
        seed: Seed of the generator of the vectors, in ``[0, 2**32 - 1]``.

    References:
        Hutchinson (1989). A stochastic estimator of the trace of the influence
        matrix for Laplacian smoothing splines. Communications in Statistics.
        Wen, Ma, Li (2023). How sharpness-aware minimization minimizes sharpness.
        ICLR (the trace of the Hessian as SAM's implicit penalty).
    """

    name = "trace"
    has_term = True
    needs_third_order = True

    def __init__(
        self,
        coefficient: float,
        num_samples: int = 1,
        distribution: Literal["rademacher", "gaussian"] = "rademacher",
        seed: int = 0,
    ) -> None:
        self.coefficient = check_coefficient("coefficient", coefficient, False)
        self.num_samples = check_int("num_samples", num_samples)
        self.distribution = check_choice("distribution", distribution, _DISTRIBUTIONS)
        self.seed = check_seed("seed", seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.last_vectors: torch.Tensor | None = None

    def evaluate(
        self, objective: ProbeObjective, step_size: float | None = None
    ) -> PenaltyResult:
        r"""Return :math:`\mu\,\widehat{\mathrm{tr}}` and its gradient estimate."""
        mu = float(self.coefficient)
        operator = HessianOperator(objective)
        like = torch.empty(0, dtype=operator.dtype, device=operator.device)
        vectors = unit_random(
            self.num_samples, objective.dim, self.generator, like, self.distribution
        )
        self.last_vectors = vectors

        quadratic_forms = (operator.matmat(vectors) * vectors).sum(dim=1)
        estimate = float(quadratic_forms.mean())
        metrics = {"trace": estimate, "coefficient": mu}
        if self.num_samples > 1:
            spread = float(quadratic_forms.std()) / math.sqrt(self.num_samples)
            metrics["trace_standard_error"] = spread

        active = mu != 0
        term = None
        if active:
            gradient = mu * operator.third_order(vectors, vectors).mean(dim=0)
            if objective.all_reduce is None:
                weights = [mu / self.num_samples] * self.num_samples
                term = CurvatureTerm(objective, vectors, weights)
        else:
            gradient = like.new_zeros(objective.dim)
        return PenaltyResult(
            value=mu * estimate,
            gradient=gradient,
            active=active,
            metrics=metrics,
            num_products=operator.num_products,
            num_third_order=operator.num_third_order,
            term=term,
        )

    def state_dict(self) -> dict[str, Any]:
        """The generator of the vectors."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the generator of the vectors."""
        self.generator.set_state(state_dict["generator"])

    def _arguments(self) -> dict[str, Any]:
        return {
            "coefficient": self.coefficient,
            "num_samples": self.num_samples,
            "distribution": self.distribution,
        }
