"""The sharpness callback: the Hessian's top eigenvalues against 2/η during fit."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_eos._validation import check_int
from lightning_eos.callbacks._base import (
    CurvatureCallback,
    check_eigensolver,
    check_k_fits,
)
from lightning_eos.curvature.hessian import HessianOperator
from lightning_eos.curvature.lanczos import Eigenpairs, lanczos, warm_start
from lightning_eos.curvature.thresholds import StabilityThreshold, stability_threshold

#: Optimizers whose preconditioned sharpness PreconditionedSharpnessMonitor measures.
_PRECONDITIONED = (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop)


@dataclass
class SharpnessRecord:
    """One measurement of :class:`SharpnessMonitor`.

    Attributes:
        step: The optimizer step (the number of steps taken before the measurement).
        eigenvalues: λ₁ ≥ … ≥ λ_k.
        threshold: The stability threshold of the step that led here, or ``None``.
        num_products: Hessian-vector products spent.
        converged: Whether the eigensolver met its tolerance.
    """

    step: int
    eigenvalues: list[float]
    threshold: float | None
    num_products: int
    converged: bool


class SharpnessMonitor(CurvatureCallback):
    r"""Log the Hessian's top eigenvalues (the sharpness) and the stability threshold.

    Every ``every_n_steps`` optimizer steps, and once before the first step, the
    ``k`` largest eigenvalues :math:`\lambda_1 \ge \dots \ge \lambda_k` of the
    Hessian :math:`\nabla^2 L(\theta)` of the training loss on a fixed probe set are
    computed by block Lanczos (:func:`~lightning_eos.curvature.lanczos`) from exact
    Hessian-vector products (:class:`~lightning_eos.curvature.HessianOperator`),
    warm-started from the previous measurement's eigenvectors. Eigenvalues are
    ranked algebraically: the sharpness is the largest eigenvalue, not the largest
    in magnitude.

    What is measured. :math:`L(\theta) = \sum_c \frac{n_c}{N}\ell(\theta; B_c)` is
    the mean of the module's batch loss over the probe set: ``probe_size`` training
    examples (all of them if there are fewer), drawn uniformly once when training
    starts with this callback's own generator, in chunks of ``chunk_size``. With
    ``mode="train"`` every layer runs as in training: BatchNorm normalizes each
    chunk with its own statistics (so its Hessian depends on ``chunk_size``), and
    dropout draws one fixed mask per chunk and measurement. With ``mode="eval"``,
    BatchNorm uses its running statistics and dropout is off. In both modes the
    running statistics themselves are never updated.

    The threshold. The sharpness is compared with the stability threshold of the
    step that produced the current parameters (Cohen et al. 2021): :math:`2/\eta`
    for gradient descent, :math:`(2+2\beta)/\eta` with heavy-ball momentum,
    :math:`(2+2\beta)/((1+2\beta)\eta)` with Nesterov momentum, minus the coupled
    weight decay (see :mod:`lightning_eos.curvature.thresholds`). The learning rate
    is read when the step starts, before a per-step scheduler updates it. For an
    optimizer without a known threshold on :math:`\lambda_1(H)` (Adam, for example,
    whose threshold applies to the preconditioned Hessian) the eigenvalues are
    logged alone, with one warning that says why; for Adam, AdamW and RMSprop,
    :class:`~lightning_eos.callbacks.PreconditionedSharpnessMonitor` measures
    :math:`\lambda_1(P^{-1}H)` against its threshold.

    Logged scalars, at ``step=trainer.global_step`` on every logger, whatever
    ``log_every_n_steps`` is: ``sharpness/lambda_1`` … ``sharpness/lambda_k``,
    ``sharpness/threshold``, ``sharpness/ratio`` (:math:`\lambda_1` / threshold),
    ``sharpness/hvps`` (products spent on the measurement). With TensorBoard, a
    Custom Scalars chart shows :math:`\lambda_1 … \lambda_k` with the threshold.
    Each measurement is also appended to :attr:`history`.

    Training is not disturbed: the measurement works on copies of the parameters
    and buffers, restores every submodule's train/eval flag, never touches
    ``.grad`` or the optimizer, and draws its random numbers from its own generator
    (whose state, with the probe set and the eigenvectors, is saved in checkpoints,
    so that a resumed run measures what an uninterrupted one would).

    A measurement whose Hessian-vector products are NaN or infinite (a diverged
    run) logs NaN and warns once; training goes on. A measurement that reaches
    ``max_iter`` before ``tol`` is logged and warned about once.

    Unsupported: strategies that shard parameters (FSDP, DeepSpeed), which are
    refused in ``setup``; SyncBatchNorm in train mode.

    Args:
        k: Number of top eigenvalues, at least 1.
        every_n_steps: Measure when the optimizer step count is a multiple of this,
            at least 1.
        probe_size: Examples in the probe set, at least 1.
        chunk_size: Examples per chunk (bounds the memory of a product), at least 1.
        tol: Relative residual tolerance of the eigensolver: each returned
            eigenvalue is within ``tol`` (relative) of an eigenvalue of the Hessian.
            Positive.
        max_iter: Most Lanczos steps per measurement, at least 1.
        extra_vectors: Ritz vectors kept beyond the top ``k`` to warm-start the next
            measurement (each costs one product per Lanczos step); they let an
            eigenvalue that overtakes :math:`\lambda_k` be found. At least 0.
        loss_fn: ``loss_fn(module(inputs), targets)`` for batches ``(inputs,
            targets, ...)``; when ``None`` the module must define
            ``curvature_loss(batch)``. Either must be a mean over the batch's
            examples: chunks are weighted by their sizes, so a sum-reduced loss
            would make the result depend on ``chunk_size``.
        mode: ``"train"`` or ``"eval"``: the mode of every layer during a product.
        dtype: ``"float64"`` to probe a float32 model in double precision (on copies),
            ``"float32"``, or ``None`` for the parameters' own type.
        seed: Seed of the probe set, the random start vectors and dropout masks, in
            ``[0, 2**32 - 1]``.

    Raises:
        ValueError: At construction, for an argument outside its range.
        MisconfigurationException: In ``setup`` or when training starts, for a
            sharded strategy, a module without trainable parameters, no way to
            compute the loss, or a probe set that cannot be drawn.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from lightning_eos.callbacks import SharpnessMonitor
        >>> from lightning_eos.losses import half_squared_error
        >>> monitor = SharpnessMonitor(k=2, loss_fn=half_squared_error)
        >>> trainer = Trainer(callbacks=[monitor], max_steps=100)  # doctest: +SKIP

    References:
        Cohen, Kaur, Li, Kolter, Talwalkar (2021). Gradient descent on neural networks
        typically occurs at the edge of stability. ICLR.
    """

    def __init__(
        self,
        k: int = 1,
        every_n_steps: int = 10,
        probe_size: int = 2048,
        chunk_size: int = 2048,
        tol: float = 1e-3,
        max_iter: int = 100,
        extra_vectors: int = 1,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        mode: Literal["train", "eval"] = "train",
        dtype: Literal["float32", "float64"] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            every_n_steps, probe_size, chunk_size, loss_fn, mode, dtype, seed
        )
        self.k, self.tol, self.max_iter = check_eigensolver(k, tol, max_iter)
        self.extra_vectors = check_int("extra_vectors", extra_vectors, low=0)
        self.history: list[SharpnessRecord] = []
        self.last_result: Eigenpairs | None = None
        self._vectors: Tensor | None = None
        self._threshold = StabilityThreshold(None, reason="no optimizer step yet")

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
    def on_prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.add_charts(
            trainer,
            "sharpness",
            {
                "top eigenvalues and stability threshold": [
                    r"sharpness/lambda_\d+",
                    "sharpness/threshold",
                ],
                "λ₁ / threshold": ["sharpness/ratio"],
            },
        )
        self._threshold = self._optimizer_threshold(trainer)

    def eigenpairs(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> Eigenpairs:
        """The eigenpairs at the current step, for callbacks that share them.

        Measured (and logged) now if this monitor has not measured at this step
        yet, so that a step's eigenpairs are computed once however the callbacks
        are ordered; the monitor's own hook then skips the step.

        Returns:
            The :class:`~lightning_eos.curvature.Eigenpairs` of this step.
        """
        self.prepare(trainer, pl_module)
        if self._last_measured_step != trainer.global_step or self.last_result is None:
            self._measure(trainer, pl_module)
        assert self.last_result is not None
        return self.last_result

    @override
    def on_train_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # Read before the step: a per-step scheduler has already moved the learning
        # rate by the time on_train_batch_end runs.
        self._threshold = self._optimizer_threshold(trainer)

    @override
    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, float]:
        operator = HessianOperator(self.objective(trainer, pl_module))
        result = lanczos(
            operator,
            self.k,
            tol=self.tol,
            max_iter=self.max_iter,
            init=warm_start(self._vectors, operator.dim),
            block_size=self.k + self.extra_vectors,
            generator=self.generator,
            extra=self.extra_vectors,
        )
        step = trainer.global_step
        self.last_result = result
        if result.finite:
            self._vectors = torch.cat([result.eigenvectors, result.extra_vectors])
        else:
            self.warn_once(
                "non-finite",
                f"SharpnessMonitor: the Hessian-vector products are not finite at step "
                f"{step} (the loss or the parameters hold NaN or infinity); the "
                "eigenvalues are logged as NaN.",
            )
        if result.finite and not result.converged:
            self.warn_once(
                "unconverged",
                "SharpnessMonitor: Lanczos stopped after "
                f"{result.num_iterations} steps "
                f"at step {step} with relative residuals above tol={self.tol} "
                f"(largest {float(result.residuals.max()):.2e}); raise max_iter for "
                "accurate values.",
            )
        eigenvalues = [float(v) for v in result.eigenvalues]
        threshold = self._threshold.value
        if threshold is None:
            optimizers = trainer.optimizers
            hint = (
                "; add PreconditionedSharpnessMonitor (lightning_eos.callbacks) to "
                "measure λ₁(P⁻¹H) against the threshold of "
                f"{type(optimizers[0]).__name__}"
                if len(optimizers) == 1 and isinstance(optimizers[0], _PRECONDITIONED)
                else ""
            )
            self.warn_once(
                "threshold",
                "SharpnessMonitor logs no stability threshold: "
                f"{self._threshold.reason}{hint}.",
            )
        self.history.append(
            SharpnessRecord(
                step, eigenvalues, threshold, result.num_products, result.converged
            )
        )

        self.progress_bar_metrics = {"λ₁": eigenvalues[0]}
        if threshold is not None:
            self.progress_bar_metrics["threshold"] = threshold
        metrics = {f"sharpness/lambda_{i + 1}": v for i, v in enumerate(eigenvalues)}
        metrics["sharpness/hvps"] = float(result.num_products)
        if threshold is not None:
            metrics["sharpness/threshold"] = threshold
            metrics["sharpness/ratio"] = eigenvalues[0] / threshold
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

    @staticmethod
    def _optimizer_threshold(trainer: pl.Trainer) -> StabilityThreshold:
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            return StabilityThreshold(
                None, reason=f"the run has {len(optimizers)} optimizers, not one"
            )
        return stability_threshold(optimizers[0])
