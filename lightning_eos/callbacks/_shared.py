"""Top eigenpairs for the callbacks that need them: shared or their own."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_eos.callbacks._base import CurvatureCallback
from lightning_eos.callbacks.sharpness import SharpnessMonitor
from lightning_eos.curvature.hessian import HessianOperator
from lightning_eos.curvature.lanczos import Eigenpairs, lanczos, warm_start

Sharing = Literal["auto", "own"]
#: Settings that must agree for two callbacks to probe the same loss.
_PROBE_SETTINGS = ("probe_size", "chunk_size", "mode", "seed")


class EigenpairSource:
    """The top ``k`` eigenpairs of the probe-set Hessian at a measurement.

    With ``sharing="auto"`` and a :class:`SharpnessMonitor` in the trainer's
    callbacks that probes the same loss (same ``probe_size``, ``chunk_size``,
    ``mode``, ``seed`` and ``loss_fn``) with at least ``k`` eigenvalues, its
    eigenpairs of the same step are used: one eigensolve per step, whatever order
    the callbacks run in (:meth:`SharpnessMonitor.eigenpairs`). The owner then
    uses that monitor's probe set. Otherwise (``sharing="own"``, no such monitor)
    the owner solves with Lanczos on its own operator, warm-started from its
    previous eigenvectors.
    """

    def __init__(
        self, k: int, sharing: Sharing, tol: float, max_iter: int, extra: int = 1
    ) -> None:
        if sharing not in ("auto", "own"):
            raise ValueError(f"`eigenpairs` must be 'auto' or 'own', got {sharing!r}.")
        self.k, self.sharing, self.tol, self.max_iter = k, sharing, tol, max_iter
        self.extra = extra
        self.monitor: SharpnessMonitor | None = None
        self.vectors: Tensor | None = None

    def setup(self, trainer: pl.Trainer, owner: CurvatureCallback) -> None:
        """Find the monitor to share with, or explain (once) why there is none."""
        self.monitor = None
        if self.sharing == "own":
            return
        monitors = [c for c in trainer.callbacks if isinstance(c, SharpnessMonitor)]
        reasons = []
        for monitor in monitors:
            different = [
                key
                for key in _PROBE_SETTINGS
                if getattr(monitor, key) != getattr(owner, key)
            ]
            if monitor.loss_fn is not owner.loss_fn:
                different.append("loss_fn")
            if monitor.k < self.k:
                different.append(f"k (the monitor finds {monitor.k} < {self.k})")
            if not different:
                self.monitor = monitor
                return
            reasons.append(", ".join(different))
        if reasons:
            owner.warn_once(
                "sharing",
                f"{type(owner).__name__} computes its own eigenpairs: the "
                f"SharpnessMonitor of this run differs in {'; '.join(reasons)}. Give "
                "both the same probe settings to compute the eigenpairs once per step.",
            )

    def prepare(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, owner: Any
    ) -> bool:
        """Give the owner the monitor's probe set; ``False`` when not sharing."""
        if self.monitor is None:
            return False
        self.monitor.prepare(trainer, pl_module)
        owner.probe = self.monitor.probe
        return True

    def get(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        operator: HessianOperator,
        generator: torch.Generator,
    ) -> Eigenpairs:
        """The eigenpairs of this step (``operator`` is used only when not sharing)."""
        if self.monitor is not None:
            result = self.monitor.eigenpairs(trainer, pl_module)
            return Eigenpairs(
                eigenvalues=result.eigenvalues[: self.k],
                eigenvectors=result.eigenvectors[: self.k],
                extra_vectors=result.extra_vectors,
                residuals=result.residuals[: self.k],
                converged=result.converged,
                finite=result.finite,
                num_products=0,
                num_iterations=0,
            )
        result = lanczos(
            operator,
            self.k,
            tol=self.tol,
            max_iter=self.max_iter,
            init=warm_start(self.vectors, operator.dim),
            block_size=min(self.k + self.extra, operator.dim),
            generator=generator,
            extra=self.extra,
        )
        if result.finite:
            self.vectors = torch.cat([result.eigenvectors, result.extra_vectors])
        return result

    def state_dict(self) -> dict[str, Any]:
        return {"vectors": None if self.vectors is None else self.vectors.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.vectors = state.get("vectors")


class SharedEigenpairsCallback(CurvatureCallback):
    """A curvature callback whose eigenpairs come from :attr:`source`.

    Subclasses set ``self.source`` (an :class:`EigenpairSource`) in their
    constructor. When the source shares a :class:`SharpnessMonitor`'s eigenpairs,
    the callback uses that monitor's probe set instead of drawing its own.
    """

    source: EigenpairSource

    @override
    def setup(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str
    ) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self.source.setup(trainer, self)

    @override
    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.probe is not None:
            return
        if self.source.prepare(trainer, pl_module, self):
            self.on_prepare(trainer, pl_module)
        else:
            super().prepare(trainer, pl_module)


def not_finite_message(owner: str, step: int) -> str:
    """The warning for a measurement whose products hold NaN or infinity."""
    return (
        f"{owner}: the Hessian-vector products are not finite at step {step} (the "
        "loss or the parameters hold NaN or infinity); the measurement is logged "
        "as NaN."
    )
