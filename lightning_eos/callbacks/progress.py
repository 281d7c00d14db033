"""A progress bar that counts optimizer steps, for full-batch runs."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from typing_extensions import override

from lightning_eos._validation import check_bool, check_int
from lightning_eos.callbacks._base import CurvatureCallback


class StepProgressBar(TQDMProgressBar):
    """Lightning's progress bar, counting optimizer steps up to ``max_steps``.

    Full-batch gradient descent has one batch per epoch, so Lightning's default bar
    restarts at every step and never shows how far the run is. This bar runs once
    from the first to the last optimizer step, with the time left, the metrics logged
    with ``prog_bar=True`` and the latest value of every curvature callback (λ₁ and
    the threshold for :class:`SharpnessMonitor`). Use it in place of the default bar:
    ``Trainer(callbacks=[StepProgressBar(), ...])``.

    Args:
        refresh_rate: Redraw the bar every this many steps, at least 0 (0 disables it).
        leave: Keep the finished bar on screen.

    Raises:
        ValueError: If ``refresh_rate`` is not an integer of at least 0 or ``leave``
            is not a bool.
    """

    def __init__(self, refresh_rate: int = 1, leave: bool = True) -> None:
        check_int("refresh_rate", refresh_rate, low=0)
        check_bool("leave", leave)
        super().__init__(refresh_rate=refresh_rate, leave=leave)

    @property
    @override
    def train_description(self) -> str:
        return "Steps"

    @override
    def init_train_tqdm(self) -> Any:
        bar = super().init_train_tqdm()
        bar.leave = self._leave
        return bar

    @override
    def on_train_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        total = trainer.max_steps if trainer.max_steps > 0 else None
        self.train_progress_bar.reset(total=total)
        self.train_progress_bar.initial = trainer.global_step
        self.train_progress_bar.n = trainer.global_step

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        pass  # one bar for the whole run

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
        bar = self.train_progress_bar
        if bar is None or not self._should_update(step, bar.total):
            return
        bar.n = step
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.refresh()

    @override
    def on_train_epoch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> None:
        pass  # the bar closes when training ends

    @override
    def get_metrics(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, int | str | float | dict[str, float]]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        for callback in trainer.callbacks:
            if isinstance(callback, CurvatureCallback):
                metrics.update(callback.progress_bar_metrics)
        return metrics
