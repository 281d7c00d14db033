"""Log the diagnostics of the curvature-aware optimizers during fit."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_eos._validation import check_bool, check_int


class OptimizerStatsLogger(Callback):
    """Write each optimizer's ``last_stats`` and counters to the loggers.

    The optimizers of :mod:`lightning_eos.optim` keep the diagnostics of their
    latest step in ``last_stats`` (for example ‖ε‖ and the perturbed loss of SAM;
    CG iterations, negative-curvature steps, damping and step length of Newton-CG;
    σ, model decrease and acceptance ratio of cubic Newton) and cumulative
    ``counters`` (closure calls with and without a backward pass, curvature
    products, third-order products). An optimizer knows no logger, and a closure
    optimizer cannot call ``self.log`` without re-running it in every pass, so
    this callback writes them, after every ``every_n_steps``-th optimizer step,
    as ``<prefix>/<key>`` (``<prefix>/<i>/<key>`` with several optimizers) at
    ``step=trainer.global_step`` on every logger, whatever ``log_every_n_steps``
    is. Counters appear as ``<prefix>/count_<name>``. Optimizers without
    ``last_stats`` (torch.optim's) are skipped. The losses and gradient norms
    are those of the objective the optimizer descends: with a penalty attached
    by :class:`~lightning_eos.penalties.PenaltyCallback` to a second-order
    optimizer, of :math:`L + P`.

    When training starts it also checks the Trainer against each optimizer that
    can check it (gradient accumulation, strategy, gradient clipping), so a
    misconfiguration fails before the first step. The latest metrics written are
    kept in :attr:`last_metrics`.

    Args:
        every_n_steps: Log after every this many optimizer steps, at least 1.
        prefix: Prefix of the logged names, a string.
        counters: Also log the cumulative counters.

    Raises:
        ValueError: If ``every_n_steps`` is not a positive integer, ``prefix`` is not
            a string or ``counters`` is not a bool.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from lightning_eos.callbacks import OptimizerStatsLogger
        >>> trainer = Trainer(callbacks=[OptimizerStatsLogger()])  # doctest: +SKIP
    """

    def __init__(
        self, every_n_steps: int = 1, prefix: str = "optim", counters: bool = True
    ) -> None:
        self.every_n_steps = check_int("every_n_steps", every_n_steps)
        if not isinstance(prefix, str):
            raise ValueError(f"`prefix` must be a string, got {prefix!r}.")
        self.prefix = prefix
        self.counters = check_bool("counters", counters)
        self.last_metrics: dict[str, float] = {}
        self._last_step = -1

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            check = getattr(optimizer, "check_trainer", None)
            if callable(check):
                check(trainer)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if step == self._last_step or step % self.every_n_steps != 0:
            return
        self._last_step = step
        metrics: dict[str, float] = {}
        several = len(trainer.optimizers) > 1
        for index, optimizer in enumerate(trainer.optimizers):
            stats = getattr(optimizer, "last_stats", None)
            if not isinstance(stats, dict):
                continue
            name = f"{self.prefix}/{index}" if several else self.prefix
            metrics.update({f"{name}/{key}": float(v) for key, v in stats.items()})
            counts = getattr(optimizer, "counters", None)
            if self.counters and isinstance(counts, dict):
                metrics.update(
                    {f"{name}/count_{key}": float(v) for key, v in counts.items()}
                )
        if not metrics:
            return
        self.last_metrics = metrics
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
