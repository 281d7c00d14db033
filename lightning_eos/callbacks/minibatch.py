"""Curvature of minibatch losses: the edge of stochastic stability."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import IterableDataset
from typing_extensions import override

from lightning_eos._validation import check_int
from lightning_eos.callbacks._base import _DTYPES, check_eigensolver
from lightning_eos.callbacks._probe_set import _collated_chunks, training_dataloader
from lightning_eos.callbacks._shared import (
    EigenpairSource,
    SharedEigenpairsCallback,
    Sharing,
    not_finite_message,
)
from lightning_eos.curvature.hessian import HessianOperator
from lightning_eos.curvature.lanczos import lanczos
from lightning_eos.curvature.objective import ProbeObjective, fixed_randomness
from lightning_eos.curvature.thresholds import stability_threshold


@dataclass
class MinibatchRecord:
    """One measurement of :class:`MinibatchSharpnessMonitor`.

    Attributes:
        step: The optimizer step.
        full_sharpness: λ₁ of the probe-set Hessian.
        minibatch_sharpness: λ₁(H_B) of each minibatch drawn.
        batch_sharpness: g_Bᵀ H_B g_B / ‖g_B‖² of each minibatch.
        threshold: The stability threshold of the step, or ``None``.
        indices: The dataset indices of each minibatch.
    """

    step: int
    full_sharpness: float
    minibatch_sharpness: list[float]
    batch_sharpness: list[float]
    threshold: float | None
    indices: list[Tensor]


class MinibatchSharpnessMonitor(SharedEigenpairsCallback):
    r"""Log the sharpness of minibatch losses beside that of the full probe set.

    With minibatch SGD the step follows the gradient of a minibatch loss
    :math:`L_B`, and the curvature that matters for stability is that of
    :math:`L_B` rather than of the full loss :math:`L`. At each measurement this
    callback draws ``num_batches`` minibatches :math:`B` of ``batch_size`` training
    examples (uniformly, without replacement within a minibatch) with its own
    generator and logs, with their standard errors over the minibatches:

    * ``minibatch/lambda_1_mean``: :math:`\mathbb{E}_B[\lambda_1(\nabla^2 L_B)]`,
      the expected top eigenvalue of minibatch Hessians (Lanczos per minibatch,
      warm-started from the full-batch top eigenvector);
    * ``minibatch/batch_sharpness``: :math:`\mathbb{E}_B[g_B^\top H_B g_B /
      \lVert g_B\rVert^2]` with :math:`g_B = \nabla L_B`, :math:`H_B = \nabla^2
      L_B`: the curvature of the minibatch loss along the step SGD takes, which
      Andreyev and Beneventano (2024) find to hover at :math:`2/\eta` (the edge of
      stochastic stability) while :math:`\lambda_1(H)` stays below it;
    * ``minibatch/lambda_1_full``: :math:`\lambda_1(\nabla^2 L)` on the probe set
      (shared with a :class:`~lightning_eos.callbacks.SharpnessMonitor` of the same
      probe settings when there is one, see ``eigenpairs``);
    * ``minibatch/threshold``: the stability threshold of the optimizer's step
      (:math:`2/\eta` for SGD), and ``minibatch/ratio``, batch sharpness over it.

    Each minibatch loss is the module's batch loss on that minibatch, in the layer
    mode of ``mode`` (train mode: BatchNorm with the minibatch's statistics, one
    dropout mask per minibatch). Under data parallelism every process draws the
    same minibatches and computes the same numbers without communication, so
    ``batch_size`` should be the global batch of a step.

    Args:
        num_batches: Minibatches per measurement, at least 1 (2 for an error).
        batch_size: Examples per minibatch; by default the training loader's batch
            size times the number of processes.
        every_n_steps: Measure when the step count is a multiple of this.
        probe_size: Examples in the probe set of the full sharpness.
        chunk_size: Examples per chunk.
        eigenpairs: ``"auto"`` (share the full sharpness) or ``"own"``.
        tol: Lanczos tolerance, in (0, 1).
        max_iter: Lanczos steps per eigensolve.
        loss_fn: ``loss_fn(module(inputs), targets)``, or ``None`` to use the
            module's ``curvature_loss(batch)``.
        mode: ``"train"`` or ``"eval"``.
        dtype: ``"float64"`` to probe a float32 model in double precision.
        seed: Seed of the probe set, the minibatches and random vectors, in
            ``[0, 2**32 - 1]``.

    Raises:
        ValueError: At construction, for an argument out of range.
        MisconfigurationException: When training starts, for an iterable dataset
            (minibatches cannot be drawn from it) or a loader without a batch size
            when ``batch_size`` is not given.

    Example:
        >>> from lightning_eos.callbacks import MinibatchSharpnessMonitor
        >>> monitor = MinibatchSharpnessMonitor(num_batches=8, batch_size=64)

    References:
        Andreyev, Beneventano (2024). Edge of stochastic stability: revisiting the
        edge of stability for SGD. arXiv:2412.20553.
    """

    def __init__(
        self,
        num_batches: int = 8,
        batch_size: int | None = None,
        every_n_steps: int = 10,
        probe_size: int = 2048,
        chunk_size: int = 2048,
        eigenpairs: Sharing = "auto",
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
        self.num_batches = check_int("num_batches", num_batches)
        self.batch_size = (
            None if batch_size is None else check_int("batch_size", batch_size)
        )
        _, self.tol, self.max_iter = check_eigensolver(1, tol, max_iter)
        self.history: list[MinibatchRecord] = []
        self.source = EigenpairSource(1, eigenpairs, self.tol, self.max_iter)
        self._threshold: float | None = None
        self._minibatch_size = 0

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            num_batches=self.num_batches, every_n_steps=self.every_n_steps
        )

    @override
    def on_prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        name = type(self).__name__
        loader = training_dataloader(trainer, name)
        if isinstance(loader.dataset, IterableDataset) or not hasattr(
            loader.dataset, "__len__"
        ):
            raise MisconfigurationException(
                f"{name} draws minibatches by index, but the training dataset is "
                "iterable."
            )
        size = self.batch_size
        if size is None:
            if loader.batch_size is None:
                raise MisconfigurationException(
                    f"{name}: the training loader has no batch_size; pass "
                    "`batch_size=`."
                )
            size = loader.batch_size * trainer.world_size
        self._minibatch_size = min(size, len(loader.dataset))
        self._threshold = self._read_threshold(trainer)
        self.add_charts(
            trainer,
            "minibatch sharpness",
            {
                "minibatch and full sharpness": [
                    "minibatch/lambda_1_mean",
                    "minibatch/batch_sharpness",
                    "minibatch/lambda_1_full",
                    "minibatch/threshold",
                ]
            },
        )

    @override
    def on_train_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # Read before the step: a per-step scheduler moves the rate afterwards.
        self._threshold = self._read_threshold(trainer)

    @override
    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, float]:
        step = trainer.global_step
        full = HessianOperator(self.objective(trainer, pl_module))
        pairs = self.source.get(trainer, pl_module, full, self.generator)
        if not pairs.finite:
            self.warn_once("non-finite", not_finite_message(type(self).__name__, step))
        start = pairs.eigenvectors[:1] if pairs.finite else None

        top_values, along_gradient = [], []
        indices, batches = self._draw_minibatches(trainer)
        for batch in batches:
            operator = HessianOperator(self._minibatch_objective(pl_module, batch))
            gradient = operator.gradient()
            norm2 = float(gradient.double() @ gradient.double())
            curvature = float(operator.matvec(gradient).double() @ gradient.double())
            along_gradient.append(curvature / norm2 if norm2 > 0 else math.nan)
            result = lanczos(
                operator,
                1,
                tol=self.tol,
                max_iter=self.max_iter,
                init=start,
                block_size=min(2, operator.dim),
                generator=self.generator,
            )
            top_values.append(float(result.eigenvalues[0]))

        record = MinibatchRecord(
            step,
            float(pairs.eigenvalues[0]),
            top_values,
            along_gradient,
            self._threshold,
            indices,
        )
        self.history.append(record)
        mean_top, error_top = _mean_and_error(top_values)
        mean_along, error_along = _mean_and_error(along_gradient)
        metrics = {
            "minibatch/lambda_1_full": record.full_sharpness,
            "minibatch/lambda_1_mean": mean_top,
            "minibatch/lambda_1_stderr": error_top,
            "minibatch/batch_sharpness": mean_along,
            "minibatch/batch_sharpness_stderr": error_along,
        }
        if self._threshold is not None:
            metrics["minibatch/threshold"] = self._threshold
            metrics["minibatch/ratio"] = mean_along / self._threshold
        return metrics

    def _draw_minibatches(self, trainer: pl.Trainer) -> tuple[list[Tensor], list[Any]]:
        loader = training_dataloader(trainer, type(self).__name__)
        total = len(loader.dataset)
        drawn, batches = [], []
        # Fixed global randomness: random data transformations then neither differ
        # between processes nor move the training stream.
        with fixed_randomness(self.seed, torch.device("cpu")):
            for _ in range(self.num_batches):
                order = torch.randperm(total, generator=self.generator)
                indices = order[: self._minibatch_size].sort().values
                (batch,) = _collated_chunks(loader, indices, self._minibatch_size)
                drawn.append(indices)
                batches.append(trainer.strategy.batch_to_device(batch))
        return drawn, batches

    def _minibatch_objective(
        self, pl_module: pl.LightningModule, batch: Any
    ) -> ProbeObjective:
        if self.loss_fn is not None:
            loss = {"loss_fn": self.loss_fn}
        else:
            loss = {"batch_loss": lambda module, b: module.curvature_loss(b)}
        return ProbeObjective(
            pl_module,
            [batch],
            **loss,
            dtype=_DTYPES[self.dtype] if self.dtype else None,
            train_mode=self.mode == "train",
            seed=self.seed,
        )

    def _read_threshold(self, trainer: pl.Trainer) -> float | None:
        if len(trainer.optimizers) != 1:
            return None
        return stability_threshold(trainer.optimizers[0]).value

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["source"] = self.source.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.source.load_state_dict(state_dict["source"])


def _mean_and_error(values: list[float]) -> tuple[float, float]:
    data = torch.tensor(values, dtype=torch.float64)
    if data.numel() < 2:
        return float(data.mean()), math.nan
    return float(data.mean()), float(data.std(correction=1) / math.sqrt(data.numel()))
