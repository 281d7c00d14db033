"""The preconditioned sharpness of Adam, AdamW and RMSprop against its threshold."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_eos.callbacks._base import (
    CurvatureCallback,
    check_eigensolver,
    check_k_fits,
)
from lightning_eos.curvature.hessian import HessianOperator
from lightning_eos.curvature.lanczos import lanczos, warm_start
from lightning_eos.curvature.preconditioned import (
    PreconditionedOperator,
    adaptive_preconditioner,
)

_SUPPORTED = (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop)


@dataclass
class PreconditionedRecord:
    """One measurement of :class:`PreconditionedSharpnessMonitor`.

    Attributes:
        step: The optimizer step.
        eigenvalues: The top eigenvalues of P⁻¹H (with coupled weight decay).
        threshold: The threshold on the first, or ``None``.
        num_products: Hessian-vector products spent.
        converged: Whether the eigensolver met its tolerance.
    """

    step: int
    eigenvalues: list[float]
    threshold: float | None
    num_products: int
    converged: bool


class PreconditionedSharpnessMonitor(CurvatureCallback):
    r"""Log :math:`\lambda_1(P^{-1}H)` of Adam, AdamW or RMSprop against its threshold.

    Adaptive optimizers are at the edge of stability when the preconditioned
    sharpness, the largest eigenvalue of :math:`P^{-1}H` with the optimizer's own
    diagonal preconditioner :math:`P`, reaches :math:`(2+2\beta_1)/(1-\beta_1)` (38
    at :math:`\beta_1 = 0.9`) for Adam and AdamW, or 2 for RMSprop (Cohen et al.
    2022). :math:`P = \operatorname{diag}(\sqrt{\hat v} + \epsilon)/\eta` is read
    from the optimizer's state after the step that led to the current parameters,
    with Adam's bias correction; the eigenvalues are those of the symmetric
    :math:`P^{-1/2}HP^{-1/2}`, similar to :math:`P^{-1}H`, found by Lanczos from
    exact Hessian-vector products on the probe set and warm-started from the
    previous measurement (see :mod:`lightning_eos.curvature.preconditioned` for the
    table, the treatment of weight decay, ``amsgrad`` and centred RMSprop).

    A separate callback rather than an option of
    :class:`~lightning_eos.callbacks.SharpnessMonitor`: the operator, its
    eigenvectors and its threshold differ, and the sharpness of :math:`H` itself
    stays worth logging beside it. Nothing is measured before the first step, since
    the optimizer has no second-moment state yet.

    Logged scalars: ``preconditioned/lambda_1`` … ``preconditioned/lambda_k``,
    ``preconditioned/threshold``, ``preconditioned/ratio``, ``preconditioned/hvps``.

    Args:
        k: Number of top eigenvalues, at least 1.
        every_n_steps: Measure when the step count is a multiple of this.
        probe_size: Examples in the probe set.
        chunk_size: Examples per chunk.
        tol: Relative residual tolerance of the eigensolver, in (0, 1).
        max_iter: Most Lanczos steps per measurement.
        loss_fn: ``loss_fn(module(inputs), targets)``, or ``None`` to use the
            module's ``curvature_loss(batch)``.
        mode: ``"train"`` or ``"eval"``.
        dtype: ``"float64"`` to probe a float32 model in double precision.
        seed: Seed of the probe set and the random start vectors, in ``[0, 2**32 - 1]``.

    Raises:
        ValueError: At construction, for an argument out of range.
        MisconfigurationException: When fitting starts, if the run does not have
            exactly one optimizer, of class Adam, AdamW or RMSprop.

    Example:
        >>> from lightning_eos.callbacks import PreconditionedSharpnessMonitor
        >>> monitor = PreconditionedSharpnessMonitor(every_n_steps=20)

    References:
        Cohen et al. (2022). Adaptive gradient methods at the edge of stability.
        arXiv:2207.14484.
    """

    def __init__(
        self,
        k: int = 1,
        every_n_steps: int = 10,
        probe_size: int = 2048,
        chunk_size: int = 2048,
        tol: float = 1e-3,
        max_iter: int = 100,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        mode: Literal["train", "eval"] = "train",
        dtype: Literal["float32", "float64"] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            every_n_steps, probe_size, chunk_size, loss_fn, mode, dtype, seed
        )
        self.k, self.tol, self.max_iter = check_eigensolver(k, tol, max_iter)
        self.history: list[PreconditionedRecord] = []
        self._vectors: Tensor | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(k=self.k, every_n_steps=self.every_n_steps)

    @override
    def setup(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str
    ) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            check_k_fits(self.k, pl_module, type(self).__name__)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The optimizers exist from here on, not yet in ``setup``.
        optimizers = trainer.optimizers
        if len(optimizers) != 1 or not isinstance(optimizers[0], _SUPPORTED):
            names = [type(o).__name__ for o in optimizers]
            raise MisconfigurationException(
                "PreconditionedSharpnessMonitor reads the preconditioner from the "
                "state of one Adam, AdamW or RMSprop optimizer; the run's optimizers "
                f"are {names}. Use SharpnessMonitor for SGD."
            )

    @override
    def on_prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.add_charts(
            trainer,
            "preconditioned sharpness",
            {
                "λ₁(P⁻¹H) and threshold": [
                    r"preconditioned/lambda_\d+",
                    "preconditioned/threshold",
                ]
            },
        )

    @override
    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, float]:
        optimizer = trainer.optimizers[0]
        parameters = [p for p in pl_module.parameters() if p.requires_grad]
        if not any(optimizer.state.get(p) for p in parameters):
            return {}  # before the first step the optimizer has no state yet
        try:
            preconditioner = adaptive_preconditioner(optimizer, parameters)
        except ValueError as error:  # a parameter without state: never updated
            self.warn_once(
                "state",
                f"PreconditionedSharpnessMonitor measures nothing at step "
                f"{trainer.global_step}: {error}",
            )
            return {}
        if not bool(torch.isfinite(preconditioner.diagonal).all()):
            self.warn_once(
                "non-finite",
                "PreconditionedSharpnessMonitor: the optimizer's second moments are "
                f"not finite at step {trainer.global_step}; the sharpness is logged "
                "as NaN.",
            )
            return {"preconditioned/lambda_1": math.nan}
        objective = self.objective(trainer, pl_module)
        operator = PreconditionedOperator(
            HessianOperator(objective),
            preconditioner.diagonal.to(objective.device),
            preconditioner.weight_decay.to(objective.device),
        )
        result = lanczos(
            operator,
            self.k,
            tol=self.tol,
            max_iter=self.max_iter,
            init=warm_start(self._vectors, operator.dim),
            block_size=min(self.k + 1, operator.dim),
            generator=self.generator,
            extra=1,
        )
        step = trainer.global_step
        if result.finite:
            self._vectors = torch.cat([result.eigenvectors, result.extra_vectors])
        else:
            self.warn_once(
                "non-finite",
                "PreconditionedSharpnessMonitor: the products are not finite at step "
                f"{step}; the eigenvalues are logged as NaN.",
            )
        if result.finite and not result.converged:
            self.warn_once(
                "unconverged",
                f"PreconditionedSharpnessMonitor: Lanczos stopped after "
                f"{result.num_iterations} steps at step {step} above tol={self.tol}; "
                "raise max_iter for accurate values.",
            )
        eigenvalues = [float(v) for v in result.eigenvalues]
        threshold = preconditioner.threshold
        self.history.append(
            PreconditionedRecord(
                step, eigenvalues, threshold, result.num_products, result.converged
            )
        )
        metrics = {
            f"preconditioned/lambda_{i + 1}": v for i, v in enumerate(eigenvalues)
        }
        metrics["preconditioned/hvps"] = float(result.num_products)
        if threshold is not None:
            metrics["preconditioned/threshold"] = threshold
            metrics["preconditioned/ratio"] = eigenvalues[0] / threshold
        else:
            self.warn_once(
                "threshold",
                "PreconditionedSharpnessMonitor logs no threshold: "
                f"{preconditioner.rule}.",
            )
        return metrics

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["vectors"] = None if self._vectors is None else self._vectors.cpu()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._vectors = state_dict["vectors"]
