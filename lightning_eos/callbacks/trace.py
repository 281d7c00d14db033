"""The Hessian trace callback: Hutchinson or Hutch++ with a standard error."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
from torch import Tensor
from typing_extensions import override

from lightning_eos._validation import check_int
from lightning_eos.callbacks._base import CurvatureCallback
from lightning_eos.curvature.hessian import HessianOperator
from lightning_eos.curvature.trace import hutchinson, hutchpp


@dataclass
class TraceRecord:
    """One measurement of :class:`HessianTraceMonitor`.

    Attributes:
        step: The optimizer step.
        trace: The estimate of tr H.
        stderr: Its standard error.
        num_products: Hessian-vector products spent.
    """

    step: int
    trace: float
    stderr: float
    num_products: int


class HessianTraceMonitor(CurvatureCallback):
    r"""Log a stochastic estimate of :math:`\operatorname{tr}\nabla^2 L` and its error.

    Every ``every_n_steps`` optimizer steps (and before the first), the trace of the
    Hessian of the probe-set loss (the same :math:`L` as
    :class:`~lightning_eos.callbacks.SharpnessMonitor`'s) is estimated from
    ``num_products`` exact Hessian-vector products, by Hutchinson's estimator or by
    Hutch++ (:mod:`lightning_eos.curvature.trace`), with Rademacher vectors drawn
    from this callback's own generator (saved in checkpoints). The standard error is
    that of the stochastic part: about 68 % of estimates fall within one of it.

    Logged scalars: ``trace/estimate``, ``trace/stderr``, ``trace/hvps``, and
    ``trace/mean_eigenvalue`` (:math:`\operatorname{tr}H / p`). Training is not
    disturbed (see :class:`~lightning_eos.callbacks.SharpnessMonitor`).

    Args:
        method: ``"hutchpp"`` (smaller variance when a few eigenvalues dominate) or
            ``"hutchinson"``.
        num_products: Hessian-vector products per measurement (at least 3 for
            Hutch++, 1 for Hutchinson).
        every_n_steps: Measure when the step count is a multiple of this.
        probe_size: Examples in the probe set.
        chunk_size: Examples per chunk.
        loss_fn: ``loss_fn(module(inputs), targets)``, or ``None`` to use the
            module's ``curvature_loss(batch)``.
        mode: ``"train"`` or ``"eval"``.
        dtype: ``"float64"`` to probe a float32 model in double precision.
        seed: Seed of the probe set and the random vectors, in ``[0, 2**32 - 1]``.

    Example:
        >>> from lightning_eos.callbacks import HessianTraceMonitor
        >>> monitor = HessianTraceMonitor(method="hutchpp", num_products=30)

    References:
        Meyer, Musco, Musco, Woodruff (2021). Hutch++: optimal stochastic trace
        estimation. SOSA.
    """

    def __init__(
        self,
        method: Literal["hutchinson", "hutchpp"] = "hutchpp",
        num_products: int = 30,
        every_n_steps: int = 10,
        probe_size: int = 2048,
        chunk_size: int = 2048,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        mode: Literal["train", "eval"] = "train",
        dtype: Literal["float32", "float64"] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            every_n_steps, probe_size, chunk_size, loss_fn, mode, dtype, seed
        )
        if method not in ("hutchinson", "hutchpp"):
            raise ValueError(
                f"`method` must be 'hutchinson' or 'hutchpp', got {method!r}."
            )
        self.method = method
        self.num_products = check_int(
            "num_products", num_products, low=3 if method == "hutchpp" else 1
        )
        self.history: list[TraceRecord] = []

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            method=self.method, every_n_steps=self.every_n_steps
        )

    @override
    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, float]:
        operator = HessianOperator(self.objective(trainer, pl_module))
        estimator = hutchpp if self.method == "hutchpp" else hutchinson
        result = estimator(operator, self.num_products, generator=self.generator)
        if not math.isfinite(result.estimate):
            self.warn_once(
                "non-finite",
                "HessianTraceMonitor: the Hessian-vector products are not finite at "
                f"step {trainer.global_step}; the trace is logged as NaN.",
            )
        self.history.append(
            TraceRecord(
                trainer.global_step, result.estimate, result.stderr, result.num_products
            )
        )
        return {
            "trace/estimate": result.estimate,
            "trace/stderr": result.stderr,
            "trace/hvps": float(result.num_products),
            "trace/mean_eigenvalue": result.estimate / operator.dim,
        }
